"""ReLU SAE with the L1 penalty of Anthropic's April 2024 update (docs/design.md §2).

    z = ReLU(W_enc x + b_enc)             (no b_dec subtracted at the input)
    x_hat = z @ W_dec + b_dec
    L = mean_n |x_n - x_hat_n|^2 + lambda * mean_n sum_i z_ni |W_dec,i|
          + mu * mean_n sum_(i dead) ReLU(-pre_ni) |W_dec,i|

Trained on inputs scaled so that E|x| = sqrt(d) (the trainer folds the scale into the saved
weights); decoder rows are free (the penalty weighs each latent by its row norm), start at
norm 0.1, and lambda warms up linearly over the first ``sparsity_warmup_fraction`` of
training. Latents silent for ``train.dead_tokens`` are pulled back towards firing by
mu * ReLU(-pre) |W_dec,i| (the pre-activation loss of Anthropic's 2025 JumpReLU recipe, which
JumpReLU uses too): ReLU passes a silent latent no gradient, so nothing else revives it.
This needs the dense N x M latents; there is nothing sparse to fuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.architectures.base import BatchTotals, SparseAutoencoder, total_variance
from sae.config import SAEConfig, architecture_field, opt


@dataclass
class ReLUConfig(SAEConfig):
    architecture: str = architecture_field("relu")
    l1_coefficient: float = opt(
        5.0, "Weight of the L1 penalty sum_i z_i |W_dec,i| (inputs scaled to E|x| = sqrt(d)).", ge=0
    )
    sparsity_warmup_fraction: float = opt(
        0.05,
        "Fraction of training over which the sparsity penalty ramps up linearly from 0.",
        ge=0,
        le=1,
    )
    dead_coefficient: float = opt(
        0.01,
        "Weight mu of the pull on dead latents, mu * sum_(i dead) ReLU(-pre_i) |W_dec,i| per "
        "token (0 = none; dead: silent for train.dead_tokens).",
        ge=0,
    )
    resample_dead: bool = opt(
        False,
        "Every train.dead_tokens until the decay, give each dead latent the direction of a "
        "badly reconstructed input (sae/training/resample.py; off in the published recipe).",
    )


def warmed_up(coefficient: float, progress: float, warmup_fraction: float) -> float:
    """A penalty coefficient ramped linearly from 0 over the first warmup_fraction of training."""
    return (
        coefficient * min(1.0, progress / warmup_fraction) if warmup_fraction > 0 else coefficient
    )


def dead_pull(
    pre: torch.Tensor, threshold: torch.Tensor | float, dead: torch.Tensor, norms: torch.Tensor
) -> torch.Tensor:
    """sum_n sum_(i dead) ReLU(threshold_i - pre_ni) |W_dec,i| (0-d) for pre [N, M], dead [M]
    (bool) and norms [M]: the pre-activation loss that pulls silent latents back up to their
    threshold (0 for ReLU), where the activation passes them no gradient. No dead.any(): a
    GPU sync."""
    return ((threshold - pre).relu() * (dead * norms)).sum()


def batch_fvu(
    x: torch.Tensor, sq_err: torch.Tensor, totals: BatchTotals | None = None
) -> torch.Tensor:
    """Sum of squared errors over the batch's total variance (no gradient)."""
    var = totals.var if totals is not None else total_variance(x)
    return (sq_err / var).detach()


class ReLUSAE(SparseAutoencoder):
    Config = ReLUConfig
    saelens_writes, saelens_reads = "standard", ("standard",)
    apply_b_dec_to_input = False
    unit_norm_decoder = False
    scale_inputs = True
    grad_clip = 1.0
    init_decoder_norm = 0.1
    # Anthropic's 5e-5 is for long runs; a short one needs far more than TopK's sqrt rule:
    # demo, 427 steps, lambda 2: FVU 0.136 at L0 49 at 1e-3 (x20), against 0.288 at L0 37
    # with lambda 5 at 4e-4 (x8) and 0.321 at L0 58 at 2.2e-4 (x4.4). BENCHMARKS.md, ReLU.
    short_run_lr_power = 1.0
    short_run_lr_cap = 20.0

    @classmethod
    def default_lr(cls, num_latents: int) -> float:
        return 5e-5

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu()

    def resamples_dead(self) -> bool:
        return self.cfg.resample_dead

    def training_loss(self, x, dead=None, workspace=None, progress=1.0, totals=None):
        pre = self.pre_activations(x)
        z = pre.relu()
        sq_err = (x - self.decode(z)).pow(2).sum()
        lam = warmed_up(self.cfg.l1_coefficient, progress, self.cfg.sparsity_warmup_fraction)
        norms = self.W_dec.norm(dim=1)
        loss = sq_err + lam * (z * norms).sum()
        if dead is not None and self.cfg.dead_coefficient > 0:
            loss = loss + self.cfg.dead_coefficient * dead_pull(pre, 0.0, dead, norms)
        loss = loss / (totals.n if totals is not None else x.shape[0])
        return loss, batch_fvu(x, sq_err, totals), (z > 0).sum(0)
