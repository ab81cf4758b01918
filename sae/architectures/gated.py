"""Gated SAE (Rajamanoharan et al. 2024): which latents fire and how strongly are decided
by two paths that share one encoder matrix.

    pi_gate = W_enc (x - b_dec) + b_gate                      [N, M]  (b_gate is our b_enc)
    pi_mag  = exp(r_mag) * (W_enc (x - b_dec)) + b_mag        [N, M]  (W_mag = diag(exp r_mag) W_enc)
    z       = 1[pi_gate > 0] * ReLU(pi_mag)
    L = |x - x_hat|^2 + lambda * sum_i ReLU(pi_gate)_i |W_dec,i| + |x - x_hat_gate|^2

x_hat_gate decodes ReLU(pi_gate) through a frozen copy of the decoder (no gradient to W_dec
or b_dec), so the gate path learns to reconstruct without the penalty shrinking the
magnitudes that z uses. The step 1[pi_gate > 0] passes no gradient: the gate learns
through the penalty and the auxiliary term only. Decoder rows are kept at unit norm (as
in the paper and dictionary_learning; with free norms the gate shrinks its scale instead
of closing), inputs scaled to E|x| = sqrt(d) (folded into the saved weights), lambda
warmed up linearly, and the learning rate is the TopK family's rule.

On disk the tensors have SAELens's names: W_enc [d, M], W_dec, b_dec, b_gate, r_mag, b_mag
(no b_enc), so a folder reads as a SAELens gated SAE and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sae.architectures.base import SparseAutoencoder
from sae.architectures.relu import batch_fvu, warmed_up
from sae.config import SAEConfig, architecture_field, opt


@dataclass
class GatedConfig(SAEConfig):
    architecture: str = architecture_field("gated")
    l1_coefficient: float = opt(
        1.0,
        "Weight of the L1 penalty on the gate, sum_i ReLU(pi_gate)_i |W_dec,i| (inputs scaled to "
        "E|x| = sqrt(d)).",
        ge=0,
    )
    sparsity_warmup_fraction: float = opt(
        0.05,
        "Fraction of training over which the sparsity penalty ramps up linearly from 0.",
        ge=0,
        le=1,
    )


class GatedSAE(SparseAutoencoder):
    Config = GatedConfig
    scale_inputs = True
    saelens_writes, saelens_reads = "gated", ("gated",)
    # A short run needs more than TopK's sqrt rule: demo, 427 steps, rate x8 against the
    # rule's x4.4 gave FVU 0.062 at L0 167 (was 0.068 at 211) with lambda 1, 0.109 at L0 69
    # (was 0.111 at 106) with lambda 2. (8192 / 427) ** 0.7 = 7.9. BENCHMARKS.md, gated.
    short_run_lr_power = 0.7

    def __init__(
        self,
        cfg: GatedConfig,
        d_in: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(cfg, d_in, device, dtype)
        M = self.cfg.num_latents
        self.r_mag = nn.Parameter(torch.zeros(M, device=device, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(M, device=device, dtype=dtype))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        if hasattr(self, "r_mag") and not self.r_mag.is_meta:
            with torch.no_grad():
                self.r_mag.zero_()
                self.b_mag.zero_()

    def magnitudes(self, pre: torch.Tensor) -> torch.Tensor:
        """pi_mag [N, M] from pi_gate [N, M]: the same encoder product, rescaled per latent."""
        return (pre - self.b_enc) * self.r_mag.exp() + self.b_mag

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return (pre > 0) * self.magnitudes(pre).relu()

    def training_loss(self, x, dead=None, workspace=None, progress=1.0, totals=None):
        pre = self.pre_activations(x)
        z = (pre > 0) * self.magnitudes(pre).relu()
        sq_err = (x - self.decode(z)).pow(2).sum()
        gate = pre.relu()
        lam = warmed_up(self.cfg.l1_coefficient, progress, self.cfg.sparsity_warmup_fraction)
        l1 = (gate * self.W_dec.norm(dim=1)).sum()
        via_gate = gate @ self.W_dec.detach() + self.b_dec.detach()
        aux = (x - via_gate).pow(2).sum()
        loss = (sq_err + lam * l1 + aux) / (totals.n if totals is not None else x.shape[0])
        return loss, batch_fvu(x, sq_err, totals), (z > 0).sum(0)

    def disk_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "W_enc": self.W_enc.detach().t(),
            "W_dec": self.W_dec.detach(),
            "b_dec": self.b_dec.detach(),
            "b_gate": self.b_enc.detach(),
            "r_mag": self.r_mag.detach(),
            "b_mag": self.b_mag.detach(),
        }

    @torch.no_grad()
    def load_disk_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.W_enc.copy_(tensors["W_enc"].t())
        self.b_enc.copy_(tensors["b_gate"])
        for name in ("W_dec", "b_dec", "r_mag", "b_mag"):
            getattr(self, name).copy_(tensors[name])
