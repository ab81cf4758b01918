"""TopK SAE (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024), trained with the fused
loss of ``sae.architectures.fused_topk``.

TopK:      z = TopK_k(ReLU(W_enc (x - b_dec) + b_enc)), per token.
BatchTopK: in training, the N*k largest pre-activations of the batch (so the number per
           token varies around k); at inference, z = ReLU(pre) * (pre > threshold), with
           the threshold a running average of the smallest value training selected.
Both: AuxK on dead latents; optional multi-TopK term L(4k) / 8, ramped up over training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.architectures.base import BatchTotals, SparseAutoencoder
from sae.architectures.fused_topk import FusedTopKLoss, TopKSpec
from sae.config import SAEConfig, architecture_field, opt
from sae.errors import CheckpointError, ConfigError


@dataclass
class TopKConfig(SAEConfig):
    architecture: str = architecture_field("topk")
    k: int = opt(32, "Active latents per token (batchtopk: on average over the batch).", ge=1)
    k_aux: int | None = opt(
        None,
        "Dead latents AuxK reconstructs the residual with; null = d_in / 2 (Gao et "
        "al., appendix B.1).",
        ge=1,
    )
    aux_alpha: float = opt(1 / 32, "Weight of the AuxK loss.", ge=0)
    multi_topk: bool = opt(
        False,
        "Also train the top 4k latents to reconstruct (loss L(k) + w L(4k), w rising to "
        "1/8: see multi_topk_ramp_power), so the SAE can be used with a larger k later.",
    )
    multi_topk_ramp_power: float = opt(
        2.0,
        "multi_topk: the L(4k) term's weight grows as (fraction of training done) ** this, "
        "times 1/8; 0 = 1/8 from the start (Gao et al.).",
        ge=0,
    )

    def for_width(self, d_in: int) -> TopKConfig:
        cfg = super().for_width(d_in)
        if cfg.k > cfg.num_latents:
            raise ConfigError(
                f"sae.k: {cfg.k} is larger than the {cfg.num_latents} latents for width {d_in}; "
                f"use at most {cfg.num_latents}"
            )
        return cfg


class TopKSAE(SparseAutoencoder):
    Config = TopKConfig
    batch_topk = False
    uses_workspace = True
    shards_latents = True
    saelens_writes, saelens_reads = "topk", ("topk",)
    # Encoder rows start at norm 1/sqrt(3) (what sparsify's nn.Linear init gives), not 1:
    # on the demo (427 steps) held-out FVU 0.116 against 0.146 with unit rows
    # (bench/quality.py, BENCHMARKS.md). Adam's steps are then larger relative to the weights.
    init_encoder_scale = 3**-0.5

    @classmethod
    def saelens_fields(cls, native: dict) -> dict:
        return {"k": native["k"], "rescale_acts_by_decoder_norm": False}

    @classmethod
    def fields_from_saelens(cls, cfg: dict, where: str) -> dict:
        # pre-6.0 files: architecture standard with activation_fn_kwargs {k: ...}
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if not isinstance(k, int):
            raise CheckpointError(f"{where}: no integer k; not a complete SAELens config")
        return {"k": k}

    def spec(self, progress: float = 1.0) -> TopKSpec:
        """The loss at ``progress`` (the fraction of training done). multi-TopK's L(4k) term
        ramps up: at its full 1/8 from the start, 15% of the latents never reached the top k
        on held-out text (they served only the 4k code); ramped as progress ** 2, 0.6%, and
        FVU at k is 1.4% below plain TopK's (demo, 427 steps; BENCHMARKS.md, multi-TopK)."""
        weight = progress**self.cfg.multi_topk_ramp_power / 8
        return TopKSpec(
            self.cfg.k,
            self.cfg.k_aux or self.d_in // 2,
            self.cfg.aux_alpha,
            self.cfg.multi_topk and weight > 0,
            self.batch_topk,
            multi_topk_weight=weight,
        )

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.topk(self.cfg.k, dim=1)
        return torch.zeros_like(pre).scatter_(1, idx, vals.relu())

    def training_loss(self, x, dead=None, workspace=None, progress=1.0, totals=None):
        loss, fvu, fires, _ = self.fused_loss(x, dead, workspace, totals, progress)
        return loss, fvu, fires

    def fused_loss(
        self,
        x: torch.Tensor,
        dead: torch.Tensor | None,
        workspace: torch.Tensor | None,
        totals: BatchTotals | None,
        progress: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, fvu, fires [M], the smallest selected pre-activation) of x [N, d] at
        ``progress``, the fraction of training done."""
        args = (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.spec(progress))
        return FusedTopKLoss.apply(x, *args, dead, workspace, totals and totals.var)


@dataclass
class BatchTopKConfig(TopKConfig):
    architecture: str = architecture_field("batchtopk")
    # 0.9, not the peers' 0.99: the selected values fall all through training, and a
    # 100-step average trails them (demo, 427 steps: inference L0 28.4 at k = 32, FVU
    # 0.133); a 10-step one ends at L0 32.0, FVU 0.124 (BENCHMARKS.md, BatchTopK).
    threshold_momentum: float = opt(
        0.9,
        "Momentum of the running average of the smallest value each batch "
        "selects: the inference threshold.",
        ge=0,
        lt=1,
    )


class BatchTopKSAE(TopKSAE):
    Config = BatchTopKConfig
    batch_topk = True
    shards_latents = False
    saelens_writes, saelens_reads = (
        "jumprelu",
        (),
    )  # at inference it is a JumpReLU with one threshold

    def __init__(
        self,
        cfg: BatchTopKConfig,
        d_in: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(cfg, d_in, device, dtype)
        # Stored per latent (all equal) so the file reads as a JumpReLU SAE elsewhere.
        self.register_buffer(
            "threshold", torch.zeros(self.cfg.num_latents, device=device, dtype=dtype)
        )
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long, device=device))

    @classmethod
    def saelens_fields(cls, native: dict) -> dict:
        return {}

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu() * (pre > self.threshold)

    def training_loss(self, x, dead=None, workspace=None, progress=1.0, totals=None):
        loss, fvu, fires, min_active = self.fused_loss(x, dead, workspace, totals, progress)
        if totals is not None:  # every process must keep the same threshold: the smallest of all
            min_active = totals.reduce_min(min_active)
        with torch.no_grad():  # on the device: no host sync
            beta = self.cfg.threshold_momentum
            ema = torch.where(
                self.threshold_updates > 0,
                beta * self.threshold + (1 - beta) * min_active,
                min_active.expand_as(self.threshold),
            )
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
