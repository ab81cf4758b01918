"""Training SAEs on activation batches: one SAE per hook point, all fed by one harvest.

Per step and hook (DESIGN.md section 2, TopK recipe): fused loss (FVU + AuxK on dead
latents) and backward, the decoder-row-parallel part of W_dec's gradient removed, Adam,
decoder rows renormalized. b_dec starts at the geometric median of the first batch. The
learning rate warms up linearly, stays flat, and decays linearly to zero over the last
``decay_fraction`` of the steps; by default it follows lr = 2e-4 / sqrt(M / 2^14).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae.architectures import TopKConfig, TopKSAE
from sae.config import RunConfig
from sae.errors import ConfigError


def default_lr(num_latents: int) -> float:
    """Gao et al.'s scaling rule: 2e-4 at 2^14 latents, falling as 1/sqrt(M)."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int, decay_fraction: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    warmup = min(warmup_steps, total_steps)
    decay_start = total_steps - int(decay_fraction * total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= decay_start:
        return peak * (total_steps - step) / max(1, total_steps - decay_start)
    return peak


@torch.no_grad()
def geometric_median(x: torch.Tensor, iterations: int = 100, eps: float = 1e-8) -> torch.Tensor:
    """Point minimizing the summed Euclidean distance to the rows of x [N, d] (Weiszfeld)."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iterations):
        w = 1 / (x - m).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() < eps * (1 + m.norm()):
            return new
        m = new
    return m


class Trainer:
    """Trains one TopK SAE per hook point. ``step(batch)`` takes {hook: [N, d]}."""

    def __init__(self, cfg: RunConfig, widths: dict[str, int], total_steps: int,
                 device: torch.device | str = "cpu"):
        if cfg.sae.architecture != "topk":
            raise ConfigError(f"sae.architecture: {cfg.sae.architecture!r} is not available yet; valid: topk")
        self.cfg, self.total_steps, self.device = cfg, total_steps, torch.device(device)
        self.step_count, self.tokens_seen = 0, 0
        generator = torch.Generator().manual_seed(cfg.train.seed)
        self.saes: dict[str, TopKSAE] = {}
        self.optimizers: dict[str, torch.optim.Adam] = {}
        self.since_fired: dict[str, torch.Tensor] = {}
        self.nonfinite: dict[str, torch.Tensor] = {}
        self.window_fires: dict[str, torch.Tensor] = {}  # firing counts since the last density log
        self.window_tokens: dict[str, int] = {}
        self.workspace: dict[str, torch.Tensor] = {}  # reused N x M pre-activation buffer per hook
        self.checked_step = 0
        self.peak_lr: dict[str, float] = {}
        for hook, d in widths.items():
            M = cfg.sae.num_latents or cfg.sae.expansion_factor * d
            if cfg.sae.k > M:
                raise ConfigError(f"sae.k: {cfg.sae.k} is larger than the {M} latents of {hook}; use at most {M}")
            sae = TopKSAE(TopKConfig(d_in=d, num_latents=M, k=cfg.sae.k), device=self.device)
            sae.reset_parameters(generator)
            self.saes[hook] = sae
            self.peak_lr[hook] = cfg.train.lr or default_lr(M)
            fused = self.device.type in ("cuda", "cpu")
            self.optimizers[hook] = torch.optim.Adam(sae.parameters(), lr=self.peak_lr[hook], fused=fused)
            self.since_fired[hook] = torch.zeros(M, dtype=torch.long, device=self.device)
            self.nonfinite[hook] = torch.zeros((), dtype=torch.bool, device=self.device)
            self.window_fires[hook] = torch.zeros(M, dtype=torch.long, device=self.device)
            self.window_tokens[hook] = 0

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """One optimizer step per SAE. Returns per-hook stats as 0-d tensors (no host sync)."""
        stats = {}
        for hook, sae in self.saes.items():
            x = batch[hook].to(self.device, torch.float32, non_blocking=True)
            # Recorded on the device, checked in check_finite(): no host sync per step.
            self.nonfinite[hook] |= ~torch.isfinite(x).all()
            if self.step_count == 0:
                with torch.no_grad():
                    sae.b_dec.copy_(geometric_median(x))
            dead = self.since_fired[hook] >= self.cfg.train.dead_tokens
            need = x.shape[0] * sae.cfg.num_latents
            if self.workspace.get(hook) is None or self.workspace[hook].numel() < need:
                self.workspace[hook] = torch.empty(need, dtype=x.dtype, device=self.device)
            loss, fvu, fires = sae.training_loss(x, dead, self.workspace[hook])
            loss.backward()
            opt = self.optimizers[hook]
            with torch.no_grad():
                W, g = sae.W_dec, sae.W_dec.grad
                g -= (g * W).sum(1, keepdim=True) * W  # keep rows on the unit sphere to first order
                for group in opt.param_groups:
                    group["lr"] = learning_rate(self.step_count, self.total_steps, self.peak_lr[hook],
                                                self.cfg.train.warmup_steps, self.cfg.train.decay_fraction)
                opt.step()
                opt.zero_grad(set_to_none=True)
                W.copy_(F.normalize(W, dim=1))
                since = self.since_fired[hook]
                since += x.shape[0]
                since.masked_fill_(fires > 0, 0)
                self.window_fires[hook] += fires
                self.window_tokens[hook] += x.shape[0]
            stats[hook] = {"loss": loss.detach(), "fvu": fvu, "l0": fires.sum() / x.shape[0],
                           "dead_fraction": dead.float().mean()}
        self.step_count += 1
        self.tokens_seen += next(iter(batch.values())).shape[0]
        return stats

    def check_finite(self) -> None:
        """Stop with one line if any activations since the last check held NaN or inf."""
        for hook, flag in self.nonfinite.items():
            if flag:
                raise ConfigError(f"activations at {hook} held NaN or inf in steps {self.checked_step}.."
                                  f"{self.step_count - 1}; check model.dtype or drop outliers with "
                                  "harvest.max_norm_ratio")
        self.checked_step = self.step_count

    def fit(self, batches, progress: bool = True, log_every: int = 50,
            on_log: Callable[[Trainer, dict[str, dict[str, float]]], None] | None = None) -> dict[str, dict[str, float]]:
        """Steps over ``batches`` (at most total_steps); returns the last stats as floats.

        Every ``log_every`` steps (the only host syncs of the loop) the progress bar is
        refreshed and ``on_log(trainer, stats)`` is called, e.g. a TensorBoardLogger.
        """
        last: dict[str, dict[str, float]] = {}
        with tqdm(total=self.total_steps, desc="train", unit="step", disable=not progress) as bar:
            for batch in batches:
                if self.step_count >= self.total_steps:
                    break
                stats = self.step(batch)
                bar.update(1)
                if self.step_count % log_every == 0 or self.step_count == self.total_steps:
                    self.check_finite()
                    last = {h: {k: float(v) for k, v in s.items()} for h, s in stats.items()}
                    first = next(iter(last.values()))
                    bar.set_postfix(fvu=f"{first['fvu']:.3f}", l0=f"{first['l0']:.1f}",
                                    dead=f"{first['dead_fraction']:.1%}")
                    if on_log is not None:
                        on_log(self, last)
        self.check_finite()
        return last

    def take_window_density(self, hook: str) -> torch.Tensor:
        """Per-latent firing rate [M] since the last call (for density histograms)."""
        rate = self.window_fires[hook].double() / max(1, self.window_tokens[hook])
        self.window_fires[hook].zero_()
        self.window_tokens[hook] = 0
        return rate


class TensorBoardLogger:
    """``on_log`` callback writing losses, FVU, L0, dead fraction, lr, tokens/s and a
    histogram of log10 feature density to ``folder`` (one run per folder)."""

    def __init__(self, folder: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))
        self.last_time, self.last_tokens = time.perf_counter(), 0

    def __call__(self, trainer: Trainer, stats: dict[str, dict[str, float]]) -> None:
        step, now = trainer.step_count, time.perf_counter()
        rate = (trainer.tokens_seen - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, trainer.tokens_seen
        for hook, values in stats.items():
            for name, value in values.items():
                self.writer.add_scalar(f"{hook}/{name}", value, step)
            self.writer.add_scalar(f"{hook}/lr", trainer.optimizers[hook].param_groups[0]["lr"], step)
            density = trainer.take_window_density(hook)
            self.writer.add_histogram(f"{hook}/log10_density", torch.log10(density.clamp_min(1e-10)).cpu(), step)
        self.writer.add_scalar("tokens_per_s", rate, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
