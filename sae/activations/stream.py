"""From a RunConfig to shuffled activation batches: data -> harvester (-> disk cache) -> buffer.

    model, tokenizer = load_model(cfg.model)
    for batch in activation_batches(cfg, model, tokenizer):
        batch["layers.2"]     # [cfg.train.batch_tokens, d] (one process)

With ``harvest.cache_dir`` set, the first run writes the cache while it harvests; a run
after an interruption serves the shards already written and harvests only the rest; once
the cache is complete, later runs read it and never run the model.

The row stream (the rows of every source item, concatenated; the same for every hook) is
a pure function of the config: epoch 1 is harvest order whether it comes from the model,
a cold, partial or complete cache; epochs 2..harvest.cache_epochs (cache only) read the
shards in an order seeded by (train.seed, epoch). So a source can start at any row, and a
training run can resume bit-identically:

    state = buffer.state_dict()                      # between two batches
    buffer = activation_batches(cfg, model, tokenizer, resume=state)

Filling the buffer before the first batch is a run's first long phase: ``first_batch``
takes that batch and turns Ctrl-C or SIGTERM meanwhile into one line saying what was kept.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.activations.buffer import ShuffleBuffer
from sae.activations.cache import CacheReader, CacheWriter, read_manifest, tokenizer_fingerprint
from sae.activations.capture import check_context_length
from sae.activations.harvest import Harvester
from sae.activations.hooks import resolve_hooks
from sae.config import RunConfig
from sae.data.text import (
    BUILTIN_CORPORA,
    context_batches,
    context_bos_id,
    describe_split,
    document_separator_id,
    legacy_context_bos_id,
    load_text_dataset,
    split_source,
)
from sae.distributed import Shard
from sae.errors import ConfigError, TrainingStopped


def cache_identity(
    cfg: RunConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    shard: Shard | None = None,
) -> dict:
    """Everything that decides which activations a harvest produces."""
    d, h = cfg.data, cfg.harvest
    return {
        **({"shard": shard.label()} if shard is not None else {}),
        "model": cfg.model.name_or_path,
        **({"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file is not None else {}),
        "hooks": list(cfg.hooks),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "width": model.config.hidden_size,
        "dataset": {
            "dataset": d.dataset,
            "subset": d.subset,
            "split": d.split,
            "text_column": d.text_column,
            "context_tokens": d.context_tokens,
            "token_budget": d.token_budget,
            "streaming": d.streaming,
            # a built-in corpus differs between Python (or gensim) versions
            "builtin_sha256": (
                BUILTIN_CORPORA[d.dataset].fingerprint(d.split)
                if d.dataset in BUILTIN_CORPORA
                else None
            ),
            # local data and hub data without a test split: which documents the split holds
            **(
                {"held_out": describe_split(d.dataset, d.split, d.subset)}
                if split_source(d.dataset, d.split, d.subset).part
                else {}
            ),
        },
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        # Only where the start and separator rules changed the tokens, so older caches stay valid elsewhere.
        **(
            {"context_start_id": start}
            if (start := context_bos_id(tokenizer)) != legacy_context_bos_id(tokenizer)
            else {}
        ),
        **(
            {"document_separator_id": sep}
            if (sep := document_separator_id(tokenizer)) != tokenizer.eos_token_id
            else {}
        ),
        "masking": {
            "exclude_special_tokens": h.exclude_special_tokens,
            "max_norm_ratio": h.max_norm_ratio,
            # the norm filter's median is per batch of contexts
            "batch_contexts": h.batch_contexts if h.max_norm_ratio is not None else None,
        },
    }


def contexts_for(
    cfg: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    skip_contexts: int = 0,
    shard: Shard | None = None,
) -> Iterator[torch.Tensor]:
    """The run's packed token contexts, [harvest.batch_contexts, data.context_tokens] per
    batch (this process's share of them, for several processes)."""
    d = cfg.data
    dataset = load_text_dataset(d.dataset, d.split, d.text_column, d.subset, d.streaming)
    return context_batches(
        dataset,
        tokenizer,
        text_column=d.text_column,
        context_tokens=d.context_tokens,
        token_budget=d.token_budget,
        batch_contexts=cfg.harvest.batch_contexts,
        skip_contexts=skip_contexts,
        shard=shard,
    )


def make_harvester(
    cfg: RunConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    skip_contexts: int = 0,
    shard: Shard | None = None,
) -> Harvester:
    """The run's harvester, from context ``skip_contexts`` on (skipped contexts are tokenized
    and packed to find where the stream is, but never run through the model)."""
    h = cfg.harvest
    contexts = contexts_for(cfg, tokenizer, skip_contexts, shard)
    harvester = Harvester(
        model,
        tokenizer,
        contexts,
        cfg.hooks,
        exclude_special_tokens=h.exclude_special_tokens,
        max_norm_ratio=h.max_norm_ratio,
        prefetch=h.prefetch,
        expect_data=skip_contexts == 0,
    )
    return harvester


def stream_fingerprint(
    cfg: RunConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    shard: Shard | None = None,
) -> dict:
    """Everything that decides the row stream (a JSON-able dict): a saved buffer state is
    only valid for a run with the same fingerprint.

    The cache's identity, plus the harvest batch (restart points and the model's batched
    numerics depend on it even without the norm filter), the seed, and the epochs with the
    shard size that orders epochs 2.. (``cache_dir`` itself is left out: epoch 1 is the same
    stream with or without a cache).
    """
    h = cfg.harvest
    epochs = h.cache_epochs if h.cache_dir is not None else 1
    return {
        **cache_identity(cfg, model, tokenizer, shard),
        "batch_contexts": h.batch_contexts,
        "seed": cfg.train.seed,
        "epochs": epochs,
        "cache_shard_tokens": h.cache_shard_tokens if epochs > 1 else None,
    }


@dataclass(frozen=True)
class StreamPosition:
    """A place in the row stream: ``rows`` rows in.

    ``contexts``, when known, is a context count at a harvest-batch boundary whose first
    harvested row is stream row ``rows_before_contexts`` (<= rows): a harvest restarts
    there, runs the model from that batch on and drops ``rows - rows_before_contexts``
    rows. (0, 0) is always valid, only slow; None (unknown) means the same. A harvest that
    writes a cache always restarts where the cache ends instead, so the cache has no hole.
    """

    rows: int = 0
    contexts: int | None = 0
    rows_before_contexts: int | None = 0

    @classmethod
    def from_dict(cls, position: dict) -> StreamPosition:
        """From the JSON dict a ShuffleBuffer saves ({"rows": R, "contexts": c, "rows_before_contexts": R_c})."""
        try:
            rows, contexts, before = (
                position["rows"],
                position.get("contexts"),
                position.get("rows_before_contexts"),
            )
            ok = (
                isinstance(rows, int)
                and rows >= 0
                and (contexts is None) == (before is None)
                and (
                    contexts is None
                    or (
                        isinstance(contexts, int)
                        and isinstance(before, int)
                        and 0 <= contexts
                        and 0 <= before <= rows
                    )
                )
            )
        except (KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise ConfigError(
                f"resume: {position!r} is not a stream position (rows, contexts, rows_before_contexts)"
            )
        return cls(rows, contexts, before)


class ActivationStream:
    """Iterable of unshuffled {hook: [n, d]} items: the run's row stream from ``start`` on.

    From a complete cache it seeks to the shard holding ``start.rows``; with a partial
    cache it serves the listed shards from there, then harvests the rest (writing it to
    the cache, as a fresh run would) and reads epochs 2.. from the finished cache; without
    a cache it harvests from ``start.contexts``. Rows before ``start.rows`` are dropped.

    ``item_start`` (after each item served): {"contexts": c, "rows_before_contexts": R_c}
    locating a harvest restart point at or before the item's first row (both None where
    unknown, e.g. epochs 2..): a ShuffleBuffer saves it, with the rows it has placed, as
    its resume position. Iterate once.
    """

    def __init__(
        self,
        cfg: RunConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        start: StreamPosition,
        writer: CacheWriter | None,
        identity: dict | None,
        shard: Shard | None = None,
    ):
        self.cfg, self.model, self.tokenizer, self.start, self.shard = (
            cfg,
            model,
            tokenizer,
            start,
            shard,
        )
        self.writer, self.identity = writer, identity
        self.start_row = start.rows
        self.item_start: dict = {
            "contexts": start.contexts,
            "rows_before_contexts": start.rows_before_contexts,
        }

    def _read(
        self, epochs: int, start_row: int, require_complete: bool = True
    ) -> Iterator[dict[str, torch.Tensor]]:
        h = self.cfg.harvest
        reader = CacheReader(
            h.cache_dir,
            self.cfg.hooks,
            epochs=epochs,
            seed=self.cfg.train.seed,
            identity=self.identity,
            require_complete=require_complete,
            start_row=start_row,
        )
        for acts in reader:
            self.item_start = reader.item_start
            yield acts

    def _harvest(self, skip_contexts: int, first_row: int) -> Iterator[dict[str, torch.Tensor]]:
        """Harvested items from context ``skip_contexts`` (whose first row is stream row
        ``first_row``) on, each added to the cache writer if any; rows before the start are
        dropped (whole items without being yielded)."""
        harvester = make_harvester(
            self.cfg, self.model, self.tokenizer, skip_contexts=skip_contexts, shard=self.shard
        )
        row, contexts = first_row, skip_contexts
        for acts in harvester:
            # The contexts after the previous item are a batch boundary from which the next
            # rows harvested are this item's (batches in between kept no row).
            item_start = {"contexts": contexts, "rows_before_contexts": row}
            contexts = skip_contexts + harvester.contexts_done
            if self.writer is not None:
                self.writer.add(acts, contexts)
            n = next(iter(acts.values())).shape[0]
            drop = max(0, self.start.rows - row)
            row += n
            if drop < n:
                self.item_start = item_start
                yield {name: a[drop:] for name, a in acts.items()} if drop else acts

    def close(self) -> None:
        """Release the cache folder this stream writes, if any (a stopped or failed run)."""
        if self.writer is not None:
            self.writer.close()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        h, writer, rows = self.cfg.harvest, self.writer, self.start.rows
        if writer is None:  # no cache: one pass over the data
            if self.start.contexts is None:
                yield from self._harvest(0, 0)
            else:
                yield from self._harvest(self.start.contexts, self.start.rows_before_contexts)
            return
        if writer.complete:
            yield from self._read(h.cache_epochs, rows)
            return
        # Epoch 1 = the shards listed so far, then a harvest from where they end.
        yield from self._read(1, rows, require_complete=False)
        yield from self._harvest(writer.contexts_done, writer.tokens)
        writer.finish()
        # Epochs 2..: the finished cache, from the start row or the end of epoch 1.
        yield from self._read(h.cache_epochs, max(rows, writer.tokens))


def activation_source(
    cfg: RunConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    start: StreamPosition | int = 0,
    shard: Shard | None = None,
) -> ActivationStream:
    """Unshuffled {hook: [n, d]} items of the run's row stream, from ``start`` on (a row
    number, or a StreamPosition that also says where a harvest may restart). ``shard``:
    this process's share of the contexts; its cache is ``harvest.cache_dir/rank<r>-of-<w>``.

    Checks hooks, context length and the cache's identity now; reads or harvests lazily.
    """
    if shard is not None and cfg.harvest.cache_dir is not None:
        cfg = replace(
            cfg,
            harvest=replace(
                cfg.harvest, cache_dir=str(Path(cfg.harvest.cache_dir) / shard.label())
            ),
        )
    h = cfg.harvest
    if isinstance(start, int):
        start = StreamPosition(rows=start)  # a harvest without cache then restarts from context 0
    resolve_hooks(model, cfg.hooks)  # bad hook names fail here, before a cache folder is touched
    check_context_length(model, cfg.data.context_tokens)
    if h.cache_dir is None:
        return ActivationStream(cfg, model, tokenizer, start, None, None, shard)
    identity = cache_identity(cfg, model, tokenizer, shard)
    writer = CacheWriter(h.cache_dir, identity, h.cache_shard_tokens)
    return ActivationStream(cfg, model, tokenizer, start, writer, identity, shard)


def buffer_capacity(cfg: RunConfig, batch_rows: int) -> int:
    """Rows per hook the run's shuffling buffer holds, serving batches of ``batch_rows``."""
    # No point holding more rows than the whole run will ever see.
    run_tokens = cfg.data.token_budget * cfg.harvest.cache_epochs
    return max(batch_rows, min(cfg.harvest.buffer_tokens, run_tokens))


def activation_batches(
    cfg: RunConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    resume: dict | None = None,
    shard: Shard | None = None,
    progress: bool = False,
) -> ShuffleBuffer:
    """Shuffled {hook: [rows, d]} batches for training: rows = train.batch_tokens, or with
    ``shard`` (one process of several) this process's share of it (``Shard.rows``).

    ``resume``: a ``ShuffleBuffer.state_dict()`` of an earlier buffer of this config (its
    tensors and meta as saved, e.g. read back from safetensors + JSON): the new buffer
    serves exactly the batches that one would have served next. A state of another data
    stream or buffer size is refused with a ConfigError before any cache is touched.
    ``progress``: a bar while the buffer fills before the first batch (rank 0 of a run only).
    """
    device = (
        next(model.parameters()).device
        if cfg.harvest.buffer_device == "model"
        else torch.device("cpu")
    )
    fingerprint = stream_fingerprint(cfg, model, tokenizer, shard)
    rows = shard.rows(cfg.train.batch_tokens) if shard is not None else cfg.train.batch_tokens
    capacity = buffer_capacity(cfg, rows)
    start = StreamPosition()
    if resume is not None:
        # Refuse another run's state before a cache folder is touched or a model runs.
        ShuffleBuffer.check_resume(resume, capacity, rows, fingerprint=fingerprint)
        start = StreamPosition.from_dict(resume["meta"]["position"])
    return ShuffleBuffer(
        activation_source(cfg, model, tokenizer, start, shard),
        capacity,
        rows,
        device=device,
        seed=cfg.train.seed,
        fingerprint=fingerprint,
        resume=resume,
        progress=progress,
    )


class StoppedWhileFilling(TrainingStopped):
    """Ctrl-C or SIGTERM while the shuffle buffer filled, before the run's first step (of
    this start): no checkpoint was written; the message says what was kept. A TrainingStopped,
    so callers that handle a stop request (train.py: exit 130, nothing more printed) handle
    this one alike."""

    def __init__(self, step: int, message: str):
        super().__init__(step)
        self.args = (message,)


def first_batch(
    buffer: ShuffleBuffer,
    batches: Iterator[dict[str, torch.Tensor]],
    run_dir: Path,
    resumed_step: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, torch.Tensor] | None:
    """``next(batches, None)`` of ``iter(buffer)``: the whole fill of the buffer.

    Ctrl-C, or SIGTERM (turned into the same for the fill: its default would end the
    process without a word), logs one line saying what was kept and raises
    StoppedWhileFilling. There is nothing to checkpoint yet: no step has run, and a run
    folder is only written after this batch. ``run_dir``: the run's folder;
    ``resumed_step``: the step of the checkpoint this run resumes from, if any.
    """
    try:
        with _sigterm_as_interrupt():
            return next(batches, None)
    except KeyboardInterrupt:
        message = fill_stopped_message(buffer, run_dir, resumed_step)
        log(message)
        raise StoppedWhileFilling(resumed_step or 0, message) from None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, like Ctrl-C (handlers: main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fill_stopped_message(
    buffer: ShuffleBuffer, run_dir: Path, resumed_step: int | None = None
) -> str:
    """One line: how far the fill got, what of the harvest is kept, and the run folder's state."""
    head = f"stopped while filling the shuffle buffer ({buffer.filled:,} of {buffer.capacity:,} activation vectors)"
    writer = getattr(buffer.source, "writer", None)
    if writer is None:
        kept = "what it harvested is not kept (no harvest.cache_dir)"
    else:
        manifest = read_manifest(writer.folder)  # what is on disk; rows not yet in a shard are lost
        if manifest["complete"]:
            kept = f"the activation cache in {writer.folder} is complete and unchanged"
        else:
            kept = (
                f"the activation cache in {writer.folder} keeps the {manifest['tokens']:,} tokens of its "
                f"{len(manifest['shards'])} shard(s), and the next start harvests on from there"
            )
    if resumed_step is not None:
        run = (
            f"the checkpoint of step {resumed_step:,} is unchanged; continue with: "
            f"python train.py --resume {run_dir}"
        )
    elif (
        run_dir / "config.yaml"
    ).exists():  # a finished run of the same config, which a new start would replace
        run = f"{run_dir} is not changed (a run writes its folder after the first batch)"
    else:
        run = "no run folder was created"
    return f"{head}: {kept}; {run}"
