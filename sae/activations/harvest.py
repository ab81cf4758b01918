"""The harvester: token contexts in, per-hook activation rows out, for training.

    from sae.activations import harvest
    for acts in harvest.Harvester(model, tokenizer, contexts, ["layers.2"]):
        acts["layers.2"]   # [n_kept_tokens, d], on the model's device, in its dtype

One forward pass per batch of contexts feeds every hook point, and stops after the
deepest one. Which tokens are kept is ``sae.activations.capture``'s rule: special tokens
(BOS, EOS, pad, ...) are dropped by default, since their norms are 10-100x larger and
would dominate both training and metrics; optionally, tokens whose activation norm
exceeds ``max_norm_ratio`` x the batch median are dropped too (attention sinks), at every
hook point together so rows stay aligned. Here the kept rows are flattened and counted,
and the contexts may be prepared in a background thread.
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Iterable, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.activations.capture import MaskedCapture
from sae.errors import ConfigError


class Harvester:
    """Iterable of {hook name: activations [n, d]} dicts, one per batch of contexts that
    keeps a token.

    contexts: iterable of LongTensor [B, T] (see ``sae.data.text.context_batches``).
    Counters after (or during) iteration: ``contexts_done``, ``tokens_seen``,
    ``tokens_kept``. ``prefetch`` prepares the next contexts (tokenization, packing) in a
    background thread while the model runs. ``expect_data=False`` accepts an empty
    stream (a resumed harvest that had already consumed everything).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        contexts: Iterable[torch.Tensor],
        hooks: list[str],
        *,
        exclude_special_tokens: bool = True,
        max_norm_ratio: float | None = None,
        prefetch: bool = False,
        expect_data: bool = True,
    ):
        self.contexts, self.prefetch, self.expect_data = contexts, prefetch, expect_data
        self.capture = MaskedCapture(
            model,
            tokenizer,
            hooks,
            exclude_special_tokens=exclude_special_tokens,
            max_norm_ratio=max_norm_ratio,
        )
        self.contexts_done = self.tokens_seen = self.tokens_kept = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        contexts = _prefetched(self.contexts) if self.prefetch else self.contexts
        for batch in self.capture.batches(contexts):
            self.contexts_done += batch.ids.shape[0]
            self.tokens_seen += batch.ids.numel()
            n_kept = int(batch.keep.sum())
            self.tokens_kept += n_kept
            if n_kept:
                yield batch.kept()
        if self.tokens_seen == 0 and self.expect_data:
            raise ConfigError(
                "data.dataset: no complete context could be packed from the data; "
                "is the dataset empty or data.context_tokens too long?"
            )
        if self.tokens_seen and self.tokens_kept == 0:
            raise ConfigError(
                f"every one of {self.tokens_seen} tokens was masked (special tokens or norm outliers); "
                "check harvest.exclude_special_tokens and harvest.max_norm_ratio"
            )


# Prefetch threads still running, {stop event: thread}: stopped and joined at exit, because
# a daemon thread still inside native code (tokenizer, torch) while the interpreter shuts
# down can abort the process ("terminate called without an active exception"), which
# happened once when a run stopped on SIGTERM left its harvester unclosed.
_RUNNING: dict[threading.Event, threading.Thread] = {}


@atexit.register
def _stop_prefetch_threads() -> None:
    for stop, thread in list(_RUNNING.items()):
        stop.set()
        thread.join(timeout=5)


def _prefetched(items: Iterable, depth: int = 4) -> Iterator:
    """Iterate ``items`` in a daemon thread, ``depth`` ahead; its exceptions are re-raised here.

    When the consumer stops early (or the process exits), the thread notices within 0.1 s
    and ends.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)
        finally:  # listed until it really ends (it may be inside the tokenizer when told to stop)
            _RUNNING.pop(stop, None)

    thread = threading.Thread(target=produce, daemon=True, name="sae-prefetch")
    _RUNNING[stop] = thread
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
