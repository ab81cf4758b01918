"""The shuffling buffer: mixes activations from many contexts into training batches.

Activations of one context are strongly correlated; an SAE trained on them in order sees
one topic at a time. The buffer holds ``capacity_tokens`` rows per hook point in
preallocated storage, serves a shuffled share of them in batches, refills the served
slots from the source, and repeats; rows of every hook point move together.

Memory: the storage (capacity x d x itemsize per hook) plus at most one source batch of
rows waiting to be placed. Nothing else grows with the run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from sae.errors import ConfigError


class ShuffleBuffer:
    """Iterable of {hook name: [batch_tokens, d]} batches drawn from ``source``.

    source: iterable of {hook name: [n, d]} (a Harvester, or a cache reader); every dict
        has the same keys and each hook keeps its width and dtype.
    capacity_tokens: rows held per hook (>= batch_tokens).
    refill_fraction: share of the buffer served between refills; smaller mixes better,
        larger pulls fewer source batches per served batch.
    device: where the storage lives (host memory by default; a GPU to skip copies).

    The batches served are views copied out of the storage (safe to keep). When the source
    runs out, the rows left are served shuffled, and a final incomplete batch is dropped.
    A buffer is iterated once: a second ``iter`` raises.
    """

    def __init__(self, source: Iterable[dict[str, torch.Tensor]], capacity_tokens: int, batch_tokens: int, *,
                 refill_fraction: float = 0.5, device: torch.device | str = "cpu", seed: int = 0):
        if batch_tokens < 1 or capacity_tokens < batch_tokens:
            raise ValueError(f"need 1 <= batch_tokens ({batch_tokens}) <= capacity_tokens ({capacity_tokens})")
        if not 0 < refill_fraction <= 1:
            raise ValueError(f"refill_fraction must be in (0, 1], got {refill_fraction}")
        self.source, self.capacity, self.batch = source, capacity_tokens, batch_tokens
        self.refill_fraction, self.device = refill_fraction, torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.storage: dict[str, torch.Tensor] = {}
        self.occupied = self._allocating(lambda: torch.zeros(capacity_tokens, dtype=torch.bool), capacity_tokens)
        self.tokens_served = 0
        self._started = False

    def nbytes(self) -> int:
        """Bytes held by the storage (the buffer's configured size once allocated)."""
        return sum(t.numel() * t.element_size() for t in self.storage.values())

    def _allocating(self, make, nbytes: int):
        """make() with a failed allocation turned into one line naming the setting."""
        try:
            return make()
        except (RuntimeError, MemoryError):  # torch reports a failed allocation as RuntimeError
            raise ConfigError(f"harvest.buffer_tokens: cannot allocate {self.capacity:,} rows per hook "
                              f"({nbytes / 2**30:,.1f} GiB) on {self.device}; use a smaller buffer") from None

    def _allocate(self, first: dict[str, torch.Tensor]) -> None:
        nbytes = sum(self.capacity * rows.shape[1] * rows.element_size() for rows in first.values())
        self.storage = self._allocating(lambda: {
            name: torch.empty(self.capacity, rows.shape[1], dtype=rows.dtype, device=self.device)
            for name, rows in first.items()}, nbytes)

    def _fill(self, source: Iterator[dict[str, torch.Tensor]], pending: dict[str, torch.Tensor] | None):
        """Write rows into free slots until none is free or the source ends.

        Returns the rows of the last source batch that did not fit (or None) and whether the
        source is exhausted.
        """
        free = (~self.occupied).nonzero().squeeze(1)
        placed = 0
        while placed < len(free):
            if pending is None:
                pending = next(source, None)
                if pending is None:
                    return None, True
                if not self.storage:
                    self._allocate(pending)
            n = min(len(free) - placed, next(iter(pending.values())).shape[0])
            slots = free[placed:placed + n]
            slots_dev = slots.to(self.device)
            for name, rows in pending.items():
                # non_blocking only host->GPU: a GPU->host copy must finish before the CPU reads it
                self.storage[name][slots_dev] = rows[:n].to(self.device, non_blocking=self.device.type == "cuda")
            self.occupied[slots] = True
            placed += n
            rest = {name: rows[n:] for name, rows in pending.items()}
            pending = rest if next(iter(rest.values())).shape[0] else None
        return pending, False

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._started:
            raise RuntimeError("a ShuffleBuffer is iterated once; make a new one for another pass")
        self._started = True
        source = iter(self.source)
        pending, exhausted = self._fill(source, None)
        while True:
            held = self.occupied.nonzero().squeeze(1)
            order = held[torch.randperm(len(held), generator=self.generator)]
            share = len(held) if exhausted else max(self.batch, int(len(held) * self.refill_fraction))
            n_batches = share // self.batch
            if n_batches == 0:
                return
            for i in range(n_batches):
                slots = order[i * self.batch:(i + 1) * self.batch]
                slots_dev = slots.to(self.device)
                batch = {name: store[slots_dev] for name, store in self.storage.items()}
                self.occupied[slots] = False
                self.tokens_served += self.batch
                yield batch
            if exhausted:
                return
            pending, exhausted = self._fill(source, pending)
