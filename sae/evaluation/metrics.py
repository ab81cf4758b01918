"""SAE quality metrics, defined once (docs/design.md §3) and used everywhere.

FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the whole eval set (not a mean of
per-batch ratios); L0 = mean active latents per token; dead fraction = latents that never
fired on the eval set; dense fraction = latents active on more than 10% of its tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sae.architectures import SparseAutoencoder


class Metrics:
    """Accumulates the metrics of one SAE over activation batches; sums in float64."""

    def __init__(self, sae: SparseAutoencoder, dense_threshold: float = 0.1):
        self.sae, self.dense_threshold = sae, dense_threshold
        M, d = sae.W_dec.shape
        device = sae.W_dec.device
        self.sq_err = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_x_sq = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(d, dtype=torch.float64, device=device)
        self.fires = torch.zeros(M, dtype=torch.long, device=device)
        self.n = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """x: activations [n, d]."""
        x = x.to(self.sae.W_dec.device, torch.float32)
        z = self.sae.encode(x)
        self.sq_err += (x - self.sae.decode(z)).double().pow(2).sum()
        self.sum_x += x.double().sum(0)
        self.sum_x_sq += x.double().pow(2).sum()
        self.fires += (z > 0).sum(0)
        self.n += x.shape[0]

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("no evaluation tokens")
        total_var = self.sum_x_sq - self.sum_x @ self.sum_x / self.n  # sum ||x - mean||^2
        rate = self.fires.double() / self.n
        return {
            "fvu": (self.sq_err / total_var).item(),
            "l0": self.fires.sum().item() / self.n,
            "dead_fraction": (self.fires == 0).double().mean().item(),
            "dense_fraction": (rate > self.dense_threshold).double().mean().item(),
            "tokens": self.n,
        }


def evaluate(sae: SparseAutoencoder, batches: Iterable[torch.Tensor]) -> dict:
    """Metrics of ``sae`` over activation batches [n, d]."""
    m = Metrics(sae)
    for x in batches:
        m.update(x)
    return m.result()
