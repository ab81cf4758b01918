"""JumpReLU SAE (Rajamanoharan et al. 2024; the Gemma Scope recipe).

    pre = W_enc x + b_enc;   z = pre * H(pre - theta),  theta = exp(log_threshold) [M]
    L = mean_n |x_n - x_hat_n|^2 + lambda * mean_n sum_i H(pre_ni - theta_i)     (an L0 penalty)

H has no useful derivative, so theta learns through straight-through estimators with a
rectangle kernel of width ``bandwidth`` (epsilon) around the threshold:
    d z / d theta      = -(theta / eps) * rect((pre - theta) / eps)
    d H / d theta      = -(1 / eps) * rect((pre - theta) / eps)
and pre gets the ordinary gradient through z (none through H). Inputs are scaled to
E|x| = sqrt(d) (folded into the saved weights), decoder rows kept at unit norm, lambda
warmed up linearly, Adam with beta1 = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sae.architectures.base import SparseAutoencoder
from sae.architectures.relu import batch_fvu, warmed_up
from sae.config import SAEConfig, architecture_field, opt


@dataclass
class JumpReLUConfig(SAEConfig):
    architecture: str = architecture_field("jumprelu")
    l0_coefficient: float = opt(
        1.0, "Weight of the L0 penalty (inputs scaled to E|x| = sqrt(d)).", ge=0
    )
    sparsity_warmup_fraction: float = opt(
        0.05,
        "Fraction of training over which the sparsity penalty ramps up linearly from 0.",
        ge=0,
        le=1,
    )
    bandwidth: float = opt(
        0.05, "Width of the straight-through estimator's kernel around the threshold.", gt=0
    )
    init_threshold: float = opt(
        0.1, "Every latent's threshold at the start of training (on the scaled inputs).", gt=0
    )


class _ThresholdFn(torch.autograd.Function):
    """Shared by the two functions below: forward keeps pre and the threshold; backward
    needs rect((pre - threshold) / eps) / eps, the kernel estimate of a delta at the threshold."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pre, threshold, bandwidth = inputs
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth

    @staticmethod
    def kernel(ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        return pre, threshold, ((pre - threshold).abs() < eps / 2).to(pre.dtype) / eps


class JumpReLUFn(_ThresholdFn):
    """z = JumpReLUFn.apply(pre [N, M], threshold [M], bandwidth) = pre * (pre > threshold)."""

    @staticmethod
    def forward(pre, threshold, bandwidth: float):
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, g):
        pre, threshold, k = _ThresholdFn.kernel(ctx)
        return g * (pre > threshold), (-threshold * k * g).sum(0), None


class StepFn(_ThresholdFn):
    """H = StepFn.apply(pre [N, M], threshold [M], bandwidth) = 1[pre > threshold]."""

    @staticmethod
    def forward(pre, threshold, bandwidth: float):
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        _, _, k = _ThresholdFn.kernel(ctx)
        return None, (-k * g).sum(0), None


class JumpReLUSAE(SparseAutoencoder):
    Config = JumpReLUConfig
    saelens_writes, saelens_reads = "jumprelu", ("jumprelu",)
    apply_b_dec_to_input = False
    scale_inputs = True
    adam_betas = (0.0, 0.999)

    def __init__(
        self,
        cfg: JumpReLUConfig,
        d_in: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(cfg, d_in, device, dtype)
        self.log_threshold = nn.Parameter(
            torch.full(
                (self.cfg.num_latents,), math.log(cfg.init_threshold), device=device, dtype=dtype
            )
        )

    @classmethod
    def default_lr(cls, num_latents: int) -> float:
        return 7e-5

    def reset_parameters(self, generator=None):
        super().reset_parameters(generator)
        if hasattr(self, "log_threshold"):
            with torch.no_grad():
                self.log_threshold.fill_(math.log(self.cfg.init_threshold))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold)

    def training_loss(self, x, dead=None, workspace=None, progress=1.0, totals=None):
        pre = self.pre_activations(x)
        theta = self.threshold
        z = JumpReLUFn.apply(pre, theta, self.cfg.bandwidth)
        sq_err = (x - self.decode(z)).pow(2).sum()
        lam = warmed_up(self.cfg.l0_coefficient, progress, self.cfg.sparsity_warmup_fraction)
        l0 = StepFn.apply(pre, theta, self.cfg.bandwidth).sum()
        loss = (sq_err + lam * l0) / (totals.n if totals is not None else x.shape[0])
        return loss, batch_fvu(x, sq_err, totals), (z != 0).sum(0)

    def disk_tensors(self):
        return {**super().disk_tensors(), "threshold": self.threshold.detach()}

    def load_disk_tensors(self, tensors):
        super().load_disk_tensors(tensors)
        with torch.no_grad():
            # relu(pre) * (pre > t) with t <= 0 is relu(pre): a threshold of 0 means the same,
            # and this activation (pre * (pre > t)) needs t >= 0 to match.
            self.log_threshold.copy_(tensors["threshold"].clamp(min=0).log())
