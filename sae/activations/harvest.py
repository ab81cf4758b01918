"""The harvester: token contexts in, per-hook activation rows out.

    from sae.activations import harvest
    for acts in harvest.Harvester(model, tokenizer, contexts, ["layers.2"]):
        acts["layers.2"]   # [n_kept_tokens, d], on the model's device, in its dtype

One forward pass per batch of contexts feeds every hook point, and stops after the
deepest one. Special tokens (BOS, EOS, pad, ...) are dropped by default: their norms are
10-100x larger and would dominate both training and metrics. Optionally, tokens whose
activation norm exceeds ``max_norm_ratio`` x the batch median are dropped too (attention
sinks); a token dropped at one hook point is dropped at all, so rows stay aligned.
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Iterable, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.activations.hooks import ActivationCapture, resolve_hooks
from sae.errors import ConfigError


def max_context_tokens(model: PreTrainedModel) -> int | None:
    """The longest context the model's position scheme allows (None if unbounded)."""
    return getattr(model.config, "max_position_embeddings", None)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """LongTensor of the tokenizer's special ids (BOS, EOS, pad, ...): never harvested or spliced."""
    return torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)


def check_context_length(model: PreTrainedModel, context_tokens: int) -> None:
    limit = max_context_tokens(model)
    if limit is not None and context_tokens > limit:
        raise ConfigError(f"data.context_tokens: {context_tokens} is longer than this model allows; "
                          f"use at most {limit}")


class Harvester:
    """Iterable of {hook name: activations [n, d]} dicts, one per batch of contexts.

    contexts: iterable of LongTensor [B, T] (see ``sae.data.text.context_batches``).
    Counters after (or during) iteration: ``contexts_done``, ``tokens_seen``,
    ``tokens_kept``. ``prefetch`` prepares the next contexts (tokenization, packing) in a
    background thread while the model runs. ``expect_data=False`` accepts an empty
    stream (a resumed harvest that had already consumed everything).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, contexts: Iterable[torch.Tensor],
                 hooks: list[str], *, exclude_special_tokens: bool = True, max_norm_ratio: float | None = None,
                 prefetch: bool = False, expect_data: bool = True):
        self.model, self.contexts, self.prefetch, self.expect_data = model, contexts, prefetch, expect_data
        self.points = resolve_hooks(model, hooks)
        self.excluded = special_token_ids(tokenizer) if exclude_special_tokens else torch.empty(0, dtype=torch.long)
        self.max_norm_ratio = max_norm_ratio
        self.device = next(model.parameters()).device
        self.contexts_done = self.tokens_seen = self.tokens_kept = 0

    def keep_mask(self, ids: torch.Tensor, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bool [B, T]: tokens to keep: not special, and, with ``max_norm_ratio``, finite and
        not a norm outlier at any hook. Each hook's median is taken over the non-special
        tokens, independently of the other hooks (so hook order does not matter)."""
        keep = ~torch.isin(ids, self.excluded.to(ids.device))
        if self.max_norm_ratio is not None and keep.any():
            candidates = keep.clone()
            for a in acts.values():
                norms = a.float().norm(dim=-1)
                median = norms[candidates].nanmedian()
                keep &= torch.isfinite(norms) & (norms <= self.max_norm_ratio * median)
        return keep

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = _prefetched(self.contexts) if self.prefetch else iter(self.contexts)
        capture = ActivationCapture(self.model, self.points)
        for ids in batches:
            ids = ids.to(self.device, non_blocking=True)
            check_context_length(self.model, ids.shape[1])
            acts = capture.run(input_ids=ids)
            for name, a in acts.items():
                if a.shape[:2] != ids.shape:
                    raise ConfigError(f"hooks: {name!r} gives activations of shape {tuple(a.shape)}, not "
                                      f"[batch, tokens, width] = {tuple(ids.shape)} + [width]; hook another module")
            keep = self.keep_mask(ids, acts)
            self.contexts_done += ids.shape[0]
            self.tokens_seen += ids.numel()
            n_kept = int(keep.sum())
            self.tokens_kept += n_kept
            if n_kept:
                yield {name: a[keep] for name, a in acts.items()}
        if self.tokens_seen == 0 and self.expect_data:
            raise ConfigError("data.dataset: no complete context could be packed from the data; "
                              "is the dataset empty or data.context_tokens too long?")
        if self.tokens_seen and self.tokens_kept == 0:
            raise ConfigError(f"every one of {self.tokens_seen} tokens was masked (special tokens or norm outliers); "
                              "check harvest.exclude_special_tokens and harvest.max_norm_ratio")


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
