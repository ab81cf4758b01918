"""JumpReLU SAE (Rajamanoharan et al. 2024; Anthropic's 2025 tanh penalty, SAELens's recommended setup).

    pre = W_enc x + b_enc;   z = pre * H(pre - theta)     theta [M], kept >= 0
    L = mean_n |x_n - x_hat_n|^2 + lambda * mean_n P_n + mu * mean_n D_n
    P_n = sum_i tanh(c * z_ni * |W_dec,i|)     (sparsity_loss = "tanh", the default)
    P_n = sum_i H(pre_ni - theta_i)             (sparsity_loss = "step": Gemma Scope's L0)
    D_n = sum_{i dead} ReLU(theta_i - pre_ni) * |W_dec,i|   (pulls dead latents back up)

H has no useful derivative, so theta learns through straight-through estimators with a
rectangle kernel of width ``bandwidth`` (epsilon) around the threshold:
    d z / d theta      = -(theta / eps) * rect((pre - theta) / eps)
    d H / d theta      = -(1 / eps) * rect((pre - theta) / eps)
and pre gets the ordinary gradient through z (none through H).

Why tanh is the default: the step penalty reaches the encoder only through theta, one
number per latent that Adam moves by about lr per step, so in a run of a few hundred steps
L0 barely falls (demo, 427 steps: L0 265 with 53% of latents dense). The tanh penalty
passes through z to W_enc and b_enc, which sparsify quickly (L0 56 at lambda = 1, with FVU
0.10 against 0.21; docs/design.md §2). theta is trained as itself, not as log(theta):
Adam's ~lr-sized steps move log(theta) by a factor of about exp(lr * steps), nothing in a
short run (the reason SAELens 6 changed it too).
The rest is Anthropic's recipe, as for ReLU: inputs scaled to E|x| = sqrt(d) (folded into
the saved weights), decoder rows free and starting at norm 0.1 with W_enc = W_dec, gradient
norm clipped at 1, lambda warmed up linearly over the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sae.architectures.base import SparseAutoencoder
from sae.architectures.relu import batch_fvu, dead_pull, warmed_up
from sae.config import SAEConfig, architecture_field, opt


@dataclass
class JumpReLUConfig(SAEConfig):
    architecture: str = architecture_field("jumprelu")
    l0_coefficient: float = opt(
        1.0,
        "Weight lambda of the sparsity penalty: per token, sum_i tanh(tanh_scale * z_i * "
        "|W_dec,i|) or, with sparsity_loss = step, the L0 (inputs scaled to E|x| = sqrt(d)).",
        ge=0,
    )
    sparsity_loss: str = opt(
        "tanh",
        "Penalty: tanh (Anthropic's, trains the encoder too) or step (Gemma Scope's L0, "
        "trains the thresholds only, so it needs a long run).",
        choices=("tanh", "step"),
    )
    tanh_scale: float = opt(
        4.0, "c in tanh(c * z_i * |W_dec,i|): how soon an activation counts as one.", gt=0
    )
    sparsity_warmup_fraction: float = opt(
        1.0,
        "Fraction of training over which the sparsity penalty ramps up linearly from 0 "
        "(all of it, as Anthropic's recipe: a faster ramp kills most latents in a short run).",
        ge=0,
        le=1,
    )
    bandwidth: float = opt(
        2.0, "Width of the straight-through estimator's kernel around the threshold.", gt=0
    )
    init_threshold: float = opt(
        0.1, "Every latent's threshold at the start of training (on the scaled inputs).", gt=0
    )
    dead_coefficient: float = opt(
        3e-6,
        "Weight mu of the pull on dead latents, sum_(i dead) ReLU(theta_i - pre_i) |W_dec,i| "
        "(0 = none).",
        ge=0,
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
    unit_norm_decoder = False  # Anthropic's recipe, as relu: the penalties weigh rows by norm
    init_decoder_norm = 0.1
    grad_clip = 1.0

    def __init__(
        self,
        cfg: JumpReLUConfig,
        d_in: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(cfg, d_in, device, dtype)
        self.threshold = nn.Parameter(
            torch.full((self.cfg.num_latents,), cfg.init_threshold, device=device, dtype=dtype)
        )
        self.register_load_state_dict_pre_hook(_threshold_from_log)

    @classmethod
    def default_lr(cls, num_latents: int) -> float:
        return 7e-5

    def reset_parameters(self, generator=None):
        super().reset_parameters(generator)
        if hasattr(self, "threshold") and not self.threshold.is_meta:
            with torch.no_grad():
                self.threshold.fill_(self.cfg.init_threshold)

    @torch.no_grad()
    def after_step(self) -> None:
        # theta < 0 would let negative pre-activations through
        self.threshold.clamp_(min=0)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold)

    def training_loss(self, x, dead=None, workspace=None, progress=1.0, totals=None):
        pre = self.pre_activations(x)
        theta, eps = self.threshold, self.cfg.bandwidth
        z = JumpReLUFn.apply(pre, theta, eps)
        sq_err = (x - self.decode(z)).pow(2).sum()
        lam = warmed_up(self.cfg.l0_coefficient, progress, self.cfg.sparsity_warmup_fraction)
        norms = self.W_dec.norm(dim=1)
        if self.cfg.sparsity_loss == "tanh":
            penalty = torch.tanh(self.cfg.tanh_scale * z * norms).sum()
        else:
            penalty = StepFn.apply(pre, theta, eps).sum()
        loss = sq_err + lam * penalty
        if dead is not None and self.cfg.dead_coefficient > 0:
            loss = loss + self.cfg.dead_coefficient * dead_pull(pre, theta, dead, norms)
        loss = loss / (totals.n if totals is not None else x.shape[0])
        return loss, batch_fvu(x, sq_err, totals), (z != 0).sum(0)

    def disk_tensors(self):
        return {**super().disk_tensors(), "threshold": self.threshold.detach()}

    def load_disk_tensors(self, tensors):
        super().load_disk_tensors(tensors)
        with torch.no_grad():
            # relu(pre) * (pre > t) with t <= 0 is relu(pre): a threshold of 0 means the same,
            # and this activation (pre * (pre > t)) needs t >= 0 to match.
            self.threshold.copy_(tensors["threshold"].clamp(min=0))


def _threshold_from_log(module, state_dict, prefix, *args) -> None:
    """Training states written before the threshold was trained as itself hold log_threshold."""
    old = state_dict.pop(prefix + "log_threshold", None)
    if old is not None:
        state_dict[prefix + "threshold"] = old.exp()
