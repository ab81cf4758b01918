"""TopK SAE (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024), trained with the fused
loss of ``sae.architectures.fused_topk``.

TopK:      z = TopK_k(ReLU(W_enc (x - b_dec) + b_enc)), per token.
BatchTopK: in training, the N*k largest pre-activations of the batch (so the number per
           token varies around k); at inference, z = ReLU(pre) * (pre > threshold), with
           the threshold a running average of the smallest value training selected.
Both: AuxK on dead latents; optional multi-TopK term L(4k) / 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.architectures.base import SparseAutoencoder
from sae.architectures.fused_topk import FusedTopKLoss, TopKSpec


@dataclass
class TopKConfig:
    d_in: int
    num_latents: int
    k: int = 32
    k_aux: int | None = None    # None: d_in // 2 (Gao et al., appendix B.1)
    aux_alpha: float = 1 / 32
    multi_topk: bool = False    # add the reconstruction loss of the top 4k latents, weighted 1/8

    def __post_init__(self):
        if not 1 <= self.k <= self.num_latents:
            raise ValueError(f"k = {self.k} must be between 1 and num_latents = {self.num_latents}")


class TopKSAE(SparseAutoencoder):
    architecture = "topk"
    Config = TopKConfig
    batch_topk = False
    uses_workspace = True
    # Encoder rows start at norm 1/sqrt(3) (what sparsify's nn.Linear init gives), not 1:
    # on the demo (427 steps) held-out FVU 0.116 against 0.146 with unit rows
    # (bench/quality.py, BENCHMARKS.md). Adam's steps are then larger relative to the weights.
    init_encoder_scale = 3 ** -0.5

    def spec(self) -> TopKSpec:
        return TopKSpec(self.cfg.k, self.cfg.k_aux or self.cfg.d_in // 2, self.cfg.aux_alpha, self.cfg.multi_topk,
                        self.batch_topk)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.topk(self.cfg.k, dim=1)
        return torch.zeros_like(pre).scatter_(1, idx, vals.relu())

    def training_loss(self, x, dead=None, workspace=None, progress=1.0, totals=None):
        loss, fvu, fires, _ = FusedTopKLoss.apply(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.spec(),
                                                  dead, workspace, totals and totals.var)
        return loss, fvu, fires


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_momentum: float = 0.99    # running average of the batch's smallest selected value


class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"
    Config = BatchTopKConfig
    batch_topk = True

    def __init__(self, cfg, device="cpu", dtype=torch.float32):
        super().__init__(cfg, device, dtype)
        # Stored per latent (all equal) so the file reads as a JumpReLU SAE elsewhere.
        self.register_buffer("threshold", torch.zeros(cfg.num_latents, device=device, dtype=dtype))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long, device=device))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu() * (pre > self.threshold)

    def training_loss(self, x, dead=None, workspace=None, progress=1.0, totals=None):
        loss, fvu, fires, min_active = FusedTopKLoss.apply(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec,
                                                           self.spec(), dead, workspace, totals and totals.var)
        if totals is not None:  # every process must keep the same threshold: the smallest of all
            min_active = totals.reduce_min(min_active)
        with torch.no_grad():  # on the device: no host sync
            beta = self.cfg.threshold_momentum
            ema = torch.where(self.threshold_updates > 0, beta * self.threshold + (1 - beta) * min_active,
                              min_active.expand_as(self.threshold))
            self.threshold.copy_(torch.where(torch.isfinite(min_active), ema, self.threshold))
            self.threshold_updates += torch.isfinite(min_active).long()
        return loss, fvu, fires

    def disk_tensors(self):
        return {**super().disk_tensors(), "threshold": self.threshold}

    def load_disk_tensors(self, tensors):
        super().load_disk_tensors(tensors)
        with torch.no_grad():
            self.threshold.copy_(tensors["threshold"])
            self.threshold_updates.fill_(1)
