"""TopK SAE (Gao et al. 2024): z = TopK(ReLU(W_enc (x - b_dec) + b_enc)), trained with
the fused MSE + AuxK loss of ``sae.fused_topk``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.architectures.base import SparseAutoencoder
from sae.fused_topk import FusedTopKLoss


@dataclass
class TopKConfig:
    d_in: int
    num_latents: int
    k: int = 32
    k_aux: int | None = None    # None: d_in // 2 (Gao et al., appendix B.1)
    aux_alpha: float = 1 / 32


class TopKSAE(SparseAutoencoder):
    architecture = "topk"
    Config = TopKConfig

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each [N, k], of the k active latents per token."""
        pre = (x - self.b_dec) @ self.W_enc.t() + self.b_enc
        vals, idx = pre.topk(self.cfg.k, dim=1)
        return vals.relu(), idx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.encode_sparse(x)
        return torch.zeros(x.shape[0], self.cfg.num_latents, dtype=vals.dtype, device=x.device).scatter_(1, idx, vals)

    def training_loss(self, x: torch.Tensor, dead: torch.Tensor | None,
                      workspace: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, batch FVU, fires [M]) for x [N, d]; see FusedTopKLoss for ``workspace``."""
        k_aux = self.cfg.k_aux or self.cfg.d_in // 2
        return FusedTopKLoss.apply(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.cfg.k, dead, k_aux,
                                   self.cfg.aux_alpha, workspace)
