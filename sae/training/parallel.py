"""How the processes of a run share its work: one class per ``distributed.mode``
(docs/design.md §1). The trainer's step calls the same methods in every mode; each class
says what its mode does at that point, so the step itself never asks which mode it is in.

    OneProcess       a single process (also any mode with a world of 1)
    DataParallel     data: each process steps on its share of every batch; losses divide
                     by the whole batch's size and variance, so the shares' gradients sum
                     to the whole batch's
    HookParallel     hooks: each process trains the SAEs of 1/N of the hook points on the
                     whole batch, gathered to it from every process
    LatentParallel   latents: each process holds 1/N of every TopK SAE's latents and trains
                     on the whole batch (``sae.architectures.sharded_topk``)

Every process harvests its own share of the contexts in every mode; what differs is where
the rows go and which sums cross processes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar

import torch

from sae.architectures import SparseAutoencoder
from sae.architectures.base import BatchTotals
from sae.architectures.sharded_topk import sharded_topk_loss
from sae.config import TrainConfig
from sae.distributed import Dist, sharded
from sae.errors import ConfigError, DistributedError

Loss = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (loss, fvu, fires [M])


class OneProcess:
    """The base of every mode: what a single process does. A subclass overrides where its
    mode differs."""

    every_rank_saves: ClassVar[bool] = (
        False  # every process takes part in saving SAEs and checkpoints
    )
    writes_own_saes: ClassVar[bool] = (
        False  # each process writes the SAEs it trains (else rank 0 writes)
    )

    def __init__(self, dist: Dist, hooks: list[str]):
        self.dist, self.hooks = dist, hooks
        self.latent_shares = 1  # the parts each SAE's latents are split into

    def build_device(self, device: torch.device) -> torch.device:
        """Where a new SAE is built and initialised, before ``prepare``."""
        return device

    def owns(self, hook: str) -> bool:
        """Whether this process trains the SAEs of ``hook``."""
        return True

    def prepare(
        self, sae: SparseAutoencoder, name: str, train: TrainConfig, device: torch.device
    ) -> SparseAutoencoder:
        """The part of a freshly initialised SAE this process trains, on ``device``."""
        return sae

    def inputs(
        self, batch: dict[str, torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """{hook: rows [n, d]} (float32, on device) for the hooks this process trains, from
        this process's batch {hook: [n_local, d]}: one entry per hook, shared by a sweep's SAEs."""
        return {
            hook: batch[hook].to(device, torch.float32, non_blocking=True) for hook in self.hooks
        }

    def totals(self, x: torch.Tensor) -> BatchTotals | None:
        """The whole batch's size and variance when x [n, d] is a share of it, else None."""
        return None

    def batch_sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the processes that share a batch."""
        return t

    def batch_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The whole batch's rows, when x is a share of it."""
        return x

    def loss(
        self,
        sae: SparseAutoencoder,
        x: torch.Tensor,
        dead: torch.Tensor,
        own_loss: Callable[[], Loss],
    ) -> Loss:
        """(loss, fvu, fires) of one SAE on x: its architecture's (``own_loss()``) unless
        the mode computes it otherwise."""
        return own_loss()

    def after_backward(
        self, sae: SparseAutoencoder, loss: torch.Tensor, fvu: torch.Tensor, fires: torch.Tensor
    ) -> Loss:
        """Gradients and figures of the whole batch, from this process's."""
        return loss, fvu, fires

    def whole_counts(
        self, fired: torch.Tensor, dead: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(firings, dead latents) of the whole SAE (0-d each), from this process's latents'."""
        return fired, dead

    def gather_stats(self, stats: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """Every process's SAEs' logged figures, from this process's."""
        return stats

    def gather_rates(self, rates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{SAE: firing rate [M]} of every SAE of the run, from this process's (a collective
        where SAEs or latents are split)."""
        return rates

    def whole_sae(self, sae: SparseAutoencoder) -> SparseAutoencoder:
        """A copy of the whole SAE (a collective where latents are split)."""
        return copy.deepcopy(sae)


class DataParallel(OneProcess):
    """distributed.mode: data. Each process's loss is its share's part of the whole batch's
    (``BatchTotals``), so summing the gradients gives the whole batch's."""

    def totals(self, x: torch.Tensor) -> BatchTotals:
        """Size and total variance of the whole batch that x [n, d] is this process's share of
        (two-pass, as one process computes it). Every share has the same size (the buffers
        serve fixed batches and ``sae.training.run.in_step`` keeps the processes in step), so
        the size needs no collective and the step no host sync."""
        with torch.no_grad():
            n = x.shape[0] * self.dist.world
            mean = self.dist.sum_(x.sum(0)) / n
            var = self.dist.sum_((x - mean).pow(2).sum())
        return BatchTotals(n, var, self.dist.min_)

    def batch_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.dist.sum_(t)

    def batch_rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.dist.gather_rows(x)

    def after_backward(self, sae, loss, fvu, fires):
        for p in sae.parameters():
            if p.grad is not None:
                self.dist.sum_(p.grad)
        fires = self.dist.sum_(fires)
        loss_fvu = self.dist.sum_(torch.stack([loss.detach(), fvu]))
        return loss_fvu[0], loss_fvu[1], fires


class HookParallel(OneProcess):
    """distributed.mode: hooks. The hook points are split evenly and contiguously; each
    hook's whole batch is gathered to the process that trains its SAEs."""

    every_rank_saves = writes_own_saes = True

    def __init__(self, dist: Dist, hooks: list[str]):
        super().__init__(dist, hooks)
        sharded(hooks, dist.world, "hook points")
        per = len(hooks) // dist.world
        self.owner = {hook: i // per for i, hook in enumerate(hooks)}

    def owns(self, hook: str) -> bool:
        return self.owner[hook] == self.dist.rank

    def inputs(self, batch, device):
        inputs = {}
        for hook in self.hooks:  # every process takes part in every hook's gather
            whole = self.dist.gather_to(batch[hook].to(device, torch.float32), self.owner[hook])
            if whole is not None:
                inputs[hook] = whole
        return inputs

    def gather_stats(self, stats):
        return {h: s for part in self.dist.gather_objects(stats) for h, s in part.items()}

    def gather_rates(self, rates):
        return {
            name: r
            for part in self.dist.gather_objects({n: r.cpu() for n, r in rates.items()})
            for name, r in part.items()
        }


class LatentParallel(OneProcess):
    """distributed.mode: latents. Rank r of w holds latents [r M/w, (r+1) M/w) of every
    TopK SAE and trains them on the whole batch."""

    every_rank_saves = True

    def __init__(self, dist: Dist, hooks: list[str]):
        super().__init__(dist, hooks)
        self.latent_shares = dist.world

    def build_device(self, device):
        return torch.device("cpu")  # the whole SAE is made once, then sliced

    def prepare(self, sae, name, train, device):
        clip = sae.grad_clip if train.grad_clip is None else train.grad_clip
        part = shard_latents(sae, self.dist, name, train.autocast).to(device)
        if clip:
            raise ConfigError(
                f"train.grad_clip: {clip} cannot be applied with distributed.mode: latents (each "
                "process holds part of the gradient); set train.grad_clip=0"
            )
        return part

    def inputs(self, batch, device):
        return {hook: self.dist.gather_rows(x) for hook, x in super().inputs(batch, device).items()}

    def loss(self, sae, x, dead, own_loss):
        spec = sae.spec()
        return sharded_topk_loss(
            x,
            sae.W_enc,
            sae.b_enc,
            sae.W_dec,
            sae.b_dec,
            spec.k,
            self.dist,
            dead,
            spec.k_aux,
            spec.aux_alpha,
        )

    def whole_counts(self, fired, dead):
        fired, dead = self.dist.sum_(torch.stack([fired, dead]))
        return fired, dead

    def gather_rates(self, rates):
        return {name: self.dist.gather_rows(r) for name, r in rates.items()}

    def whole_sae(self, sae):
        return gather_latents(sae, self.dist)


MODES: dict[str, type[OneProcess]] = {
    "data": DataParallel,
    "hooks": HookParallel,
    "latents": LatentParallel,
}


def parallelism(mode: str, dist: Dist, hooks: list[str]) -> OneProcess:
    """The strategy of ``distributed.mode`` for this process (``OneProcess`` when alone)."""
    return MODES[mode](dist, hooks) if dist.active else OneProcess(dist, hooks)


def shard_latents(
    sae: SparseAutoencoder, dist: Dist, name: str, autocast: bool
) -> SparseAutoencoder:
    """This rank's slice (latents [r M/w, (r+1) M/w)) of a TopK SAE, as a TopK SAE."""
    multi = getattr(sae.cfg, "multi_topk", False)
    if not sae.shards_latents or multi or autocast:
        raise DistributedError(
            f"distributed.mode: latents trains TopK SAEs without multi_topk and train.autocast; "
            f"{name} is {sae.architecture}"
            + (" with multi_topk" if multi else "")
            + (" with train.autocast" if autocast else "")
        )
    M = sae.cfg.num_latents
    if M % dist.world:
        raise DistributedError(
            f"distributed.mode: latents: the {M} latents of {name} do not divide over "
            f"{dist.world} processes; use a latent count divisible by {dist.world}"
        )
    m = M // dist.world
    part = type(sae)(replace(sae.cfg, num_latents=m), sae.d_in)
    mine = slice(dist.rank * m, (dist.rank + 1) * m)
    with torch.no_grad():
        for p_name in ("W_enc", "b_enc", "W_dec"):
            getattr(part, p_name).copy_(getattr(sae, p_name)[mine])
        part.b_dec.copy_(sae.b_dec)
    return part


def gather_latents(part: SparseAutoencoder, dist: Dist) -> SparseAutoencoder:
    """The whole SAE from every rank's slice (a collective: every rank calls it)."""
    whole = type(part)(
        replace(part.cfg, num_latents=part.cfg.num_latents * dist.world),
        part.d_in,
        device=part.W_dec.device,
    )
    with torch.no_grad():
        for p_name in ("W_enc", "b_enc", "W_dec"):
            getattr(whole, p_name).copy_(dist.gather_rows(getattr(part, p_name).detach()))
        whole.b_dec.copy_(part.b_dec)
    return whole
