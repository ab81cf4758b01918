"""The shuffling buffer: mixes activations from many contexts into training batches.

Activations of one context are strongly correlated; an SAE trained on them in order sees
one topic at a time. The buffer holds ``capacity_tokens`` rows per hook point in
preallocated storage, serves a shuffled share of them in batches, refills the served
slots from the source, and repeats; rows of every hook point move together.

Memory: the storage (capacity x d x itemsize per hook) plus at most one source batch of
rows waiting to be placed. Nothing else grows with the run.

Resuming: between two batches the buffer's whole state is explicit (``state_dict``), and
``ShuffleBuffer(source, ..., resume=state)`` continues bit for bit, given a ``source`` that
starts at the saved ``meta["position"]["rows"]`` (the rows placed into the storage so far;
rows of a source item read but not yet placed are not saved, the source yields them again).

Progress: the fill before the first batch runs a whole buffer's worth of harvest (seconds
to minutes) with nothing else to show; ``progress=True`` shows a bar for it, counting rows
up to the capacity, gone once the buffer is full (training then shows its own bar).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from sae.activations.cache import first_difference
from sae.errors import ConfigError

STATE_FORMAT = 1


class ShuffleBuffer:
    """Iterable of {hook name: [batch_tokens, d]} batches drawn from ``source``.

    source: iterable of {hook name: [n, d]} (a Harvester, or a cache reader); every dict
        has the same keys and each hook keeps its width and dtype. If it has an
        ``item_start`` dict attribute (see ``sae.activations.stream.ActivationStream``), the one of
        the item last drawn is saved in the resume position, so that the source can restart
        near it cheaply.
    capacity_tokens: rows held per hook (>= batch_tokens).
    refill_fraction: share of the buffer served between refills; smaller mixes better,
        larger pulls fewer source batches per served batch.
    device: where the storage lives (host memory by default; a GPU to skip copies).
    fingerprint: JSON-able description of the source's stream, saved with the state; a
        state saved under another fingerprint is refused on resume.
    resume: a ``state_dict()`` of a buffer with the same sizes and fingerprint; ``source``
        must then start at its ``meta["position"]["rows"]``.
    progress: show a bar (stderr) while the buffer fills before its first batch.

    The batches served are views copied out of the storage (safe to keep). When the source
    runs out, the rows left are served shuffled, and a final incomplete batch is dropped.
    A buffer is iterated once: a second ``iter`` raises.
    """

    def __init__(
        self,
        source: Iterable[dict[str, torch.Tensor]],
        capacity_tokens: int,
        batch_tokens: int,
        *,
        refill_fraction: float = 0.5,
        device: torch.device | str = "cpu",
        seed: int = 0,
        fingerprint: dict | None = None,
        resume: dict | None = None,
        progress: bool = False,
    ):
        if batch_tokens < 1 or capacity_tokens < batch_tokens:
            raise ValueError(
                f"need 1 <= batch_tokens ({batch_tokens}) <= capacity_tokens ({capacity_tokens})"
            )
        if not 0 < refill_fraction <= 1:
            raise ValueError(f"refill_fraction must be in (0, 1], got {refill_fraction}")
        self.source, self.capacity, self.batch = source, capacity_tokens, batch_tokens
        self.refill_fraction, self.device, self.fingerprint = (
            refill_fraction,
            torch.device(device),
            fingerprint,
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.storage: dict[str, torch.Tensor] = {}  # hook -> [capacity, d] on self.device
        self.occupied = self._allocating(
            lambda: torch.zeros(capacity_tokens, dtype=torch.bool), capacity_tokens
        )
        self.tokens_served = 0
        self.rows_placed = 0  # source rows written into the storage so far: the source position
        self.exhausted = False  # the source ran out while filling
        # Slots of the current share still to serve, in serving order: LongTensor [k * batch_tokens].
        self._order = torch.empty(0, dtype=torch.long)
        # The rest of the last source item, not yet placed (never saved: re-read on resume).
        self._pending: dict[str, torch.Tensor] | None = None
        self._item_start: dict = dict(getattr(source, "item_start", {}))
        self._source_iter: Iterator[dict[str, torch.Tensor]] | None = None
        self._started = False
        self.progress = progress
        self._served_any = False  # by this object: a fill before that is the silent start of a run
        if resume is not None:
            self._restore(resume)

    @property
    def filled(self) -> int:
        """Rows held now, per hook (the capacity once the buffer is full)."""
        return int(self.occupied.sum())

    def nbytes(self) -> int:
        """Bytes held by the storage (the buffer's configured size once allocated)."""
        return sum(t.numel() * t.element_size() for t in self.storage.values())

    def _allocating(self, make, nbytes: int):
        """make() with a failed allocation turned into one line naming the setting."""
        try:
            return make()
        except (RuntimeError, MemoryError):  # torch reports a failed allocation as RuntimeError
            raise ConfigError(
                f"harvest.buffer_tokens: cannot allocate {self.capacity:,} rows per hook "
                f"({nbytes / 2**30:,.1f} GiB) on {self.device}; use a smaller buffer"
            ) from None

    def _allocate(self, first: dict[str, torch.Tensor]) -> None:
        """Storage [capacity, d] per hook, with the widths and dtypes of ``first``'s rows."""
        nbytes = sum(self.capacity * rows.shape[1] * rows.element_size() for rows in first.values())
        self.storage = self._allocating(
            lambda: {
                name: torch.empty(
                    self.capacity, rows.shape[1], dtype=rows.dtype, device=self.device
                )
                for name, rows in first.items()
            },
            nbytes,
        )

    def _fill(self, on_placed=lambda n: None) -> None:
        """Write rows into free slots until none is free or the source ends (then ``exhausted``);
        ``on_placed(n)`` after each ``n`` rows placed.

        Free slots are filled in ascending order from the row stream, so where source items
        begin and end does not matter: a source restarted mid-item fills the same slots.
        """
        free = (~self.occupied).nonzero().squeeze(1)
        placed = 0
        while placed < len(free):
            if self._pending is None:
                self._pending = next(self._source_iter, None)
                if self._pending is None:
                    self.exhausted = True
                    return
                self._item_start = dict(getattr(self.source, "item_start", {}))
                if not self.storage:
                    self._allocate(self._pending)
            n = min(len(free) - placed, next(iter(self._pending.values())).shape[0])
            slots = free[placed : placed + n]
            slots_dev = slots.to(self.device)
            for name, rows in self._pending.items():
                # non_blocking only host->GPU: a GPU->host copy must finish before the CPU reads it
                self.storage[name][slots_dev] = rows[:n].to(
                    self.device, non_blocking=self.device.type == "cuda"
                )
            self.occupied[slots] = True
            placed += n
            self.rows_placed += n
            on_placed(n)
            rest = {name: rows[n:] for name, rows in self._pending.items()}
            self._pending = rest if next(iter(rest.values())).shape[0] else None

    def _next_batch(self) -> dict[str, torch.Tensor] | None:
        """The next batch, or None at the end. All state lives in attributes between calls."""
        if len(self._order) == 0:  # the share is served: refill, then draw the next share
            if not self.exhausted:
                if self._served_any:
                    self._fill()
                else:
                    self._first_fill()
            held = self.occupied.nonzero().squeeze(1)
            share = (
                len(held)
                if self.exhausted
                else max(self.batch, int(len(held) * self.refill_fraction))
            )
            n_batches = share // self.batch
            if n_batches == 0:  # only when exhausted with fewer than one batch of rows left
                return None
            self._order = held[torch.randperm(len(held), generator=self.generator)][
                : n_batches * self.batch
            ]
        slots, self._order = self._order[: self.batch], self._order[self.batch :]
        slots_dev = slots.to(self.device)
        batch = {name: store[slots_dev] for name, store in self.storage.items()}
        self.occupied[slots] = False
        self.tokens_served += self.batch
        self._served_any = True
        return batch

    def _first_fill(self) -> None:
        """``_fill`` with a progress bar (if ``progress``) up to the capacity. It is left off
        the screen when closed, full, exhausted or interrupted alike: the lines after it (the
        run's log, training's own bar) start on a clean line."""
        with tqdm(
            total=self.capacity,
            initial=self.filled,
            desc="filling shuffle buffer",
            unit="tok",
            unit_scale=True,
            leave=False,
            disable=not self.progress,
        ) as bar:
            self._fill(bar.update)
            bar.refresh()  # the final count, whatever the refresh interval skipped

    def close(self) -> None:
        """Close the source if it holds something open (an activation cache being written)."""
        if hasattr(self.source, "close"):
            self.source.close()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._started:
            raise RuntimeError("a ShuffleBuffer is iterated once; make a new one for another pass")
        self._started = True
        self._source_iter = iter(self.source)
        while (batch := self._next_batch()) is not None:
            yield batch

    @property
    def position(self) -> dict:
        """Where the source must restart: {"rows": rows placed, **item_start of the last item drawn}."""
        return {"rows": self.rows_placed, **self._item_start}

    def state_dict(self) -> dict:
        """Everything needed to continue: {"tensors": {name: CPU tensor}, "meta": JSON-able dict}.

        Take it between batches: after the consumer got batch i and before it asks for
        batch i + 1 (or before the first). A batch fetched ahead of training (a prefetch
        thread) would be lost on resume.

        tensors:
            "occupied": bool [capacity]: slots holding rows not yet served.
            "rows.<hook>": [n_occupied, d_hook] (storage dtype): those rows, in slot order
                (absent before the first source item arrived).
            "order": int64 [k * batch_tokens]: slots of the current share still to serve.
            "generator": uint8: the shuffling generator's state.
        meta: format, capacity_tokens, batch_tokens, refill_fraction, hooks (storage order),
            tokens_served, exhausted, position ({"rows": rows placed, ...}; see
            ``position``), fingerprint.

        Save the tensors with safetensors and the meta as JSON; nothing needs pickle. The
        copy of the occupied rows costs up to the storage's size in host memory.
        """
        held = self.occupied.nonzero().squeeze(1)
        tensors = {
            "occupied": self.occupied.clone(),
            "order": self._order.clone(),
            "generator": self.generator.get_state(),
        }
        held_dev = held.to(self.device)
        for name, store in self.storage.items():
            tensors[f"rows.{name}"] = store[held_dev].cpu()
        meta = {
            "format": STATE_FORMAT,
            "capacity_tokens": self.capacity,
            "batch_tokens": self.batch,
            "refill_fraction": self.refill_fraction,
            "hooks": list(self.storage),
            "tokens_served": self.tokens_served,
            "exhausted": self.exhausted,
            "position": self.position,
            "fingerprint": self.fingerprint,
        }
        return {"tensors": tensors, "meta": meta}

    @staticmethod
    def check_resume(
        state: dict,
        capacity_tokens: int,
        batch_tokens: int,
        refill_fraction: float = 0.5,
        fingerprint: dict | None = None,
    ) -> None:
        """ConfigError (one line) unless ``state`` is a buffer state for these sizes and stream."""
        meta = state.get("meta") if isinstance(state, dict) else None
        if (
            not isinstance(meta, dict)
            or meta.get("format") != STATE_FORMAT
            or not isinstance(state.get("tensors"), dict)
        ):
            raise ConfigError(
                f"resume: the saved buffer state is not a format-{STATE_FORMAT} ShuffleBuffer state"
            )
        diff = first_difference(
            meta.get("fingerprint") or {}, fingerprint or {}, a_has="saved state has"
        )
        if diff:
            raise ConfigError(
                f"resume: the saved buffer state comes from another data stream ({diff}); "
                "resume with the config it was saved under"
            )
        sizes = {
            "capacity_tokens": capacity_tokens,
            "batch_tokens": batch_tokens,
            "refill_fraction": refill_fraction,
        }
        diff = first_difference({k: meta.get(k) for k in sizes}, sizes, a_has="saved state has")
        if diff:
            raise ConfigError(
                f"resume: the saved buffer has other sizes ({diff}); "
                "keep harvest.buffer_tokens and train.batch_tokens when resuming"
            )

    def _restore(self, state: dict) -> None:
        """Load ``state_dict()`` output (possibly read back from safetensors + JSON)."""
        self.check_resume(state, self.capacity, self.batch, self.refill_fraction, self.fingerprint)
        tensors, meta = state["tensors"], state["meta"]

        def damaged(why: str) -> ConfigError:
            return ConfigError(f"resume: the saved buffer state is damaged ({why})")

        try:
            occupied, order, generator = tensors["occupied"], tensors["order"], tensors["generator"]
            rows = {name: tensors[f"rows.{name}"] for name in meta["hooks"]}
            position, tokens_served, exhausted = (
                meta["position"],
                meta["tokens_served"],
                meta["exhausted"],
            )
            rows_placed = position["rows"]
        except (KeyError, TypeError) as e:
            raise damaged(f"missing {e}") from None
        if occupied.dtype != torch.bool or occupied.shape != (self.capacity,):
            raise damaged(
                f"occupied is {occupied.dtype} {tuple(occupied.shape)}, not bool ({self.capacity},)"
            )
        held = occupied.nonzero().squeeze(1)
        if any(r.dim() != 2 or r.shape[0] != len(held) for r in rows.values()):
            raise damaged(f"rows per hook must be [{len(held)}, d], the occupied slots")
        if (
            order.dtype != torch.long
            or order.dim() != 1
            or len(order) % self.batch
            or (
                len(order)
                and not (0 <= order.min() and order.max() < self.capacity and occupied[order].all())
            )
        ):
            raise damaged("order must list occupied slots, whole batches of them")
        source_start = getattr(self.source, "start_row", rows_placed)
        if source_start != rows_placed:
            raise ValueError(
                f"the source starts at row {source_start}, the state at row {rows_placed}"
            )
        if rows:
            self._allocate(rows)
            held_dev = held.to(self.device)
            for name, r in rows.items():
                self.storage[name][held_dev] = r.to(self.device)
        self.occupied.copy_(occupied)
        self._order = order.clone()
        try:
            self.generator.set_state(generator.clone())
        except (RuntimeError, TypeError):
            raise damaged("generator is not a torch.Generator state") from None
        self.tokens_served, self.exhausted, self.rows_placed = tokens_served, exhausted, rows_placed
        self._item_start = {k: v for k, v in position.items() if k != "rows"}
