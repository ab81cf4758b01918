"""Training SAEs on activation batches: one SAE per hook point and sweep variant, all fed
by one harvest.

Per step and SAE (docs/design.md §2): the architecture's loss (for the TopK family the
fused FVU + AuxK loss) and backward; for unit-norm decoders the decoder-row-parallel part
of W_dec's gradient removed; optional gradient clipping; Adam; decoder rows
renormalized. On the first batch b_dec starts at the geometric median (architectures
that subtract it at the input) and the input scale s (E|x s| = sqrt(d)) is fixed
(architectures that train on scaled inputs). The learning rate warms up linearly, stays
flat, and decays linearly to zero over the last ``decay_fraction`` of the steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae.architectures import ARCHITECTURES, SparseAutoencoder
from sae.architectures.base import BatchTotals
from sae.config import RunConfig, SAEConfig, TrainConfig, sae_variants
from sae.distributed import Dist
from sae.errors import (
    CheckpointError,
    DivergedError,
    TrainingStopped,
)
from sae.training.parallel import parallelism
from sae.training.resample import resample_dead, resample_window


def learning_rate(
    step: int, total_steps: int, peak: float, warmup_steps: int, decay_fraction: float
) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    warmup = min(warmup_steps, total_steps)
    decay = decay_start(total_steps, decay_fraction)
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= decay:
        return peak * (total_steps - step) / max(1, total_steps - decay)
    return peak


def decay_start(total_steps: int, decay_fraction: float) -> int:
    """The first step of the learning rate's linear decay to zero."""
    return total_steps - int(decay_fraction * total_steps)


def run_schedule(train: TrainConfig, total_steps: int) -> tuple[int, int]:
    """(warmup steps, tokens after which a silent latent is dead) for a run of total_steps:
    the settings, or for null ones values that scale with the run, capped at the published
    ones (docs/design.md §2). A short run then gets a warmup that ends and a dead window
    that AuxK can act on; a long one the published 1000 steps and 10M tokens."""
    warmup = train.warmup_steps
    if warmup is None:
        warmup = min(1000, max(1, total_steps // 20))
    dead = train.dead_tokens
    if dead is None:
        dead = min(10_000_000, max(train.batch_tokens, total_steps * train.batch_tokens // 10))
    return warmup, dead


# A run of fewer steps than this gets a larger learning rate than the architecture's
# published one, which was fitted on long runs: x sqrt(LONG_RUN_STEPS / steps), at most
# x SHORT_RUN_LR_CAP. Demo, 2048 latents: the FVU keeps falling up to x16 at 107 steps and
# x8 at 214 and 427, but at 427 steps x8 leaves 4.6% of the latents dead on held-out text
# (x4: 0.3%), so the multiple falls with the run (BENCHMARKS.md, "Learning rate for short runs").
LONG_RUN_STEPS = 8_192
SHORT_RUN_LR_CAP = 8.0


def short_run_lr_scale(
    total_steps: int, cap: float = SHORT_RUN_LR_CAP, power: float = 0.5
) -> float:
    """The multiple of an architecture's published learning rate a run of total_steps uses
    when train.lr is null: 1 for long runs, (LONG_RUN_STEPS / total_steps) ** power up to
    cap (the architecture's ``short_run_lr_power`` and ``short_run_lr_cap``) for short ones."""
    return min(cap, max(1.0, (LONG_RUN_STEPS / max(1, total_steps)) ** power))


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


def make_sae(
    settings: SAEConfig, d_in: int, device: torch.device | str = "cpu"
) -> SparseAutoencoder:
    """The SAE ``settings`` (a config's sae section) describe for inputs of width d_in,
    initialized, not trained."""
    return ARCHITECTURES[settings.architecture](settings, d_in, device=device)


def sae_id(hook: str, variant: str) -> str:
    """Name of one trained SAE, also its folder under the run: the hook, or hook/variant in a sweep."""
    return f"{hook}/{variant}" if variant else hook


@dataclass
class SAEState:
    """One SAE in training and everything its steps carry besides the batch."""

    sae: SparseAutoencoder
    hook: str  # the hook point it trains on
    optimizer: torch.optim.Adam
    peak_lr: float
    lr_scale: float  # peak_lr / the architecture's published rate (1 when train.lr is set)
    since_fired: (
        torch.Tensor
    )  # [M] long: tokens since each latent last fired (dead: >= train.dead_tokens)
    window_fires: torch.Tensor  # [M] long: firings since the last density log
    input_scale: torch.Tensor  # 0-d: s with E|x s| = sqrt(d), set on the first batch
    nonfinite: torch.Tensor  # 0-d bool: inputs held NaN or inf since the last check
    diverged: torch.Tensor  # 0-d bool: the loss was NaN or inf since the last check
    window_tokens: int = 0  # tokens since the last density log
    workspace: torch.Tensor | None = None  # reused N x M pre-activation buffer


class Trainer:
    """Trains one SAE per hook point and sweep variant, all on the same batches.
    ``step(batch)`` takes {hook: [N, d]}; the dicts below are keyed by ``sae_id``.

    The architecture's class attributes say what each step does besides the loss: whether
    b_dec starts at the geometric median, decoder rows stay unit-norm (gradient projected,
    rows renormalized), inputs are scaled by one constant, and the gradient is clipped.
    """

    def __init__(
        self,
        cfg: RunConfig,
        widths: dict[str, int],
        total_steps: int,
        device: torch.device | str = "cpu",
        dist: Dist | None = None,
    ):
        """dist: the processes this trainer is one of; None or a world of 1 for one process.
        With ``distributed.mode: data`` each steps on its share of every batch; with
        ``latents`` each holds a slice of every SAE's latents and trains on the whole batch
        (``sae.architectures.sharded_topk``)."""
        self.cfg, self.total_steps, self.device = cfg, total_steps, torch.device(device)
        self.dist = dist or Dist()
        self.hooks = list(widths)
        self.parallel = parallelism(cfg.distributed.mode, self.dist, self.hooks)
        self.warmup_steps, self.dead_tokens = run_schedule(cfg.train, total_steps)
        self.resample_every = resample_window(self.dead_tokens, cfg.train.batch_tokens)
        self.resample_until = decay_start(total_steps, cfg.train.decay_fraction)
        self.densities: dict[
            str, torch.Tensor
        ] = {}  # per SAE, set at each log step (for TensorBoard)
        self.step_count, self.tokens_seen = 0, 0
        self.states: dict[str, SAEState] = {}  # this process's SAEs, by name
        self.checked_step = 0
        self.last_checkpoint_step: int | None = None
        # every SAE of the run, this process's or not: {name: hook point}
        self.all_saes = {
            sae_id(hook, variant): hook for hook in widths for variant in sae_variants(cfg)
        }
        for hook, d in widths.items():
            if not self.parallel.owns(hook):
                continue
            for variant, settings in sae_variants(cfg).items():
                self._add(
                    sae_id(hook, variant),
                    hook,
                    make_sae(settings, d, self.parallel.build_device(self.device)),
                )

    def _add(self, name: str, hook: str, sae: SparseAutoencoder) -> None:
        """Register ``sae`` as ``name``, trained on the activations at ``hook``."""
        # Each SAE's init depends on the seed and its shape only: a sweep variant starts
        # (and, on the same batches, ends) exactly as the same SAE trained alone.
        sae.reset_parameters(torch.Generator().manual_seed(self.cfg.train.seed))
        scale = (
            1.0
            if self.cfg.train.lr
            else short_run_lr_scale(self.total_steps, sae.short_run_lr_cap, sae.short_run_lr_power)
        )
        peak_lr = self.cfg.train.lr or sae.default_lr(sae.cfg.num_latents) * scale
        sae = self.parallel.prepare(sae, name, self.cfg.train, self.device)
        M, dev = sae.cfg.num_latents, self.device
        self.states[name] = SAEState(
            sae=sae,
            hook=hook,
            peak_lr=peak_lr,
            lr_scale=scale,
            optimizer=torch.optim.Adam(
                sae.parameters(),
                lr=peak_lr,
                betas=sae.adam_betas,
                fused=dev.type in ("cuda", "cpu"),
            ),
            since_fired=torch.zeros(M, dtype=torch.long, device=dev),
            window_fires=torch.zeros(M, dtype=torch.long, device=dev),
            input_scale=torch.ones((), device=dev),
            nonfinite=torch.zeros((), dtype=torch.bool, device=dev),
            diverged=torch.zeros((), dtype=torch.bool, device=dev),
        )

    @property
    def saes(self) -> dict[str, SparseAutoencoder]:
        """This process's SAEs, by name (``<hook>`` or ``<hook>/<variant>``)."""
        return {name: st.sae for name, st in self.states.items()}

    @property
    def hook_of(self) -> dict[str, str]:
        """The hook point each of this process's SAEs trains on."""
        return {name: st.hook for name, st in self.states.items()}

    def scales_inputs(self, hook: str) -> bool:
        setting = self.cfg.train.scale_inputs
        return self.states[hook].sae.scale_inputs if setting is None else setting

    def grad_clip(self, hook: str) -> float | None:
        setting = self.cfg.train.grad_clip
        return self.states[hook].sae.grad_clip if setting is None else (setting or None)

    def _workspace(self, hook: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        need = n * self.states[hook].sae.cfg.num_latents
        ws = self.states[hook].workspace
        if ws is None or ws.numel() < need or ws.dtype != dtype:
            ws = self.states[hook].workspace = torch.empty(need, dtype=dtype, device=self.device)
        return ws

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """One optimizer step per SAE. Returns per-SAE stats as 0-d tensors (no host sync).

        batch: {hook: [n, d]}, this process's rows. Per SAE: its input (``self.parallel``
        says which rows), the first step's initialisation, the loss, the update."""
        stats = {}
        inputs = self.parallel.inputs(batch, self.device)
        for name, sae in self.saes.items():
            x = inputs[self.states[name].hook]
            # Recorded on the device, checked in check_finite(): no host sync per step.
            self.states[name].nonfinite |= ~torch.isfinite(x).all()
            if self.step_count == 0:
                self._initialise(name, sae, x)
            if self.scales_inputs(name):
                x = x * self.states[name].input_scale
            totals = self.parallel.totals(x)
            dead = self.states[name].since_fired >= self.dead_tokens
            loss, fvu, fires = self.parallel.loss(
                sae, x, dead, partial(self._loss, name, sae, x, dead, totals)
            )
            self.states[name].diverged |= ~torch.isfinite(loss.detach())
            loss.backward()
            n = totals.n if totals is not None else x.shape[0]
            loss, fvu, fires = self._update(name, sae, loss, fvu, fires, n)
            if sae.resamples_dead() and self._resamples_now():
                self._resample(name, sae, x)
            fired, n_dead = self.parallel.whole_counts(fires.sum(), dead.sum())
            stats[name] = {
                "loss": loss.detach(),
                "fvu": fvu,
                "l0": fired / n,
                # Not fired for train.dead_tokens (what AuxK trains); the held-out
                # "dead_fraction" is another count: never fired on the evaluation text.
                "silent_fraction": n_dead / (dead.numel() * self.parallel.latent_shares),
                "lr": self.states[name].optimizer.param_groups[0]["lr"],
            }
        self.step_count += 1
        self.tokens_seen += self.cfg.train.batch_tokens
        return stats

    def _resamples_now(self) -> bool:
        """Whether this step ends a dead window before the learning rate's decay: a latent
        resampled later would have no steps left to learn its new direction."""
        done = self.step_count + 1
        return done % self.resample_every == 0 and done < self.resample_until

    def _resample(self, name: str, sae: SparseAutoencoder, x: torch.Tensor) -> None:
        """New directions for the latents dead after this step (all the batch's rows: every
        data-parallel rank resamples alike), which then count as fresh."""
        since = self.states[name].since_fired
        dead = since >= self.dead_tokens
        resample_dead(sae, self.states[name].optimizer, self.parallel.batch_rows(x), dead)
        since.masked_fill_(dead, 0)

    @torch.no_grad()
    def _initialise(self, name: str, sae: SparseAutoencoder, x: torch.Tensor) -> None:
        """First step only: the input scale (recipes that scale inputs) and b_dec at the
        geometric median of the first batch (recipes that subtract b_dec first)."""
        if self.scales_inputs(name):
            norms = self.parallel.batch_sum(
                torch.stack([x.norm(dim=1).sum(), torch.tensor(x.shape[0], device=x.device)])
            )
            self.states[name].input_scale.copy_(x.shape[1] ** 0.5 / (norms[0] / norms[1]))
        if sae.apply_b_dec_to_input:
            sae.b_dec.copy_(
                geometric_median(self.parallel.batch_rows(x) * self.states[name].input_scale)
            )

    def _loss(
        self,
        name: str,
        sae: SparseAutoencoder,
        x: torch.Tensor,
        dead: torch.Tensor,
        totals: BatchTotals | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, fvu, fires [M]) of one SAE on x [n, d]: its architecture's loss."""
        ws = (
            self._workspace(
                name, x.shape[0], torch.bfloat16 if self.cfg.train.autocast else x.dtype
            )
            if sae.uses_workspace
            else None
        )
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.autocast
        ):
            return sae.training_loss(
                x, dead, ws, progress=self.step_count / self.total_steps, totals=totals
            )

    @torch.no_grad()
    def _update(
        self,
        name: str,
        sae: SparseAutoencoder,
        loss: torch.Tensor,
        fvu: torch.Tensor,
        fires: torch.Tensor,
        n: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The optimizer step after backward: shares' gradients summed (data parallel), the
        decoder kept at unit norm where the recipe says so, clipping, the scheduled learning
        rate; then the firing counters. Returns (loss, fvu, fires) of the whole batch."""
        loss, fvu, fires = self.parallel.after_backward(sae, loss, fvu, fires)
        W = sae.W_dec
        if sae.unit_norm_decoder:
            g = W.grad
            g -= (g * W).sum(1, keepdim=True) * W  # keep rows on the unit sphere to first order
        clip = self.grad_clip(name)
        if clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
        opt = self.states[name].optimizer
        for group in opt.param_groups:
            group["lr"] = learning_rate(
                self.step_count,
                self.total_steps,
                self.states[name].peak_lr,
                self.warmup_steps,
                self.cfg.train.decay_fraction,
            )
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sae.unit_norm_decoder:
            W.copy_(F.normalize(W, dim=1))
        sae.after_step()
        since = self.states[name].since_fired
        since += n
        since.masked_fill_(fires > 0, 0)
        self.states[name].window_fires += fires
        self.states[name].window_tokens += n
        return loss, fvu, fires

    def trained_sae(self, hook: str) -> SparseAutoencoder:
        """The SAE for ``hook`` as it should be used and saved: a copy taking unscaled inputs.
        With latents sharded every rank must call this (the slices are gathered)."""
        sae = self.parallel.whole_sae(self.states[hook].sae)
        if self.scales_inputs(hook):
            sae.fold_input_scale(float(self.states[hook].input_scale))
        return sae

    def check_finite(self) -> None:
        """Stop with one line if activations or a loss since the last check were NaN or inf.

        Called before every checkpoint, so a checkpoint never holds a diverged state.
        """
        kept = (
            f"; the last good checkpoint (step {self.last_checkpoint_step}) is kept"
            if self.last_checkpoint_step is not None
            else ""
        )
        if self.dist.active:  # all processes stop together, or none does
            flags = torch.stack(
                [
                    torch.stack([st.nonfinite for st in self.states.values()]).any(),
                    torch.stack([st.diverged for st in self.states.values()]).any(),
                ]
            ).long()
            if self.dist.max_(flags.clone()).any() and not flags.any():
                raise DivergedError(
                    f"another process saw NaN or inf in steps {self.checked_step}..{self.step_count - 1}"
                    f"; see its message{kept}"
                )
        for hook in self.saes:
            steps = f"steps {self.checked_step}..{self.step_count - 1}"
            if self.states[hook].nonfinite:
                raise DivergedError(
                    f"activations at {self.states[hook].hook} held NaN or inf in {steps}; check model.dtype or drop "
                    f"outliers with harvest.max_norm_ratio{kept}"
                )
            if self.states[hook].diverged:
                raise DivergedError(
                    f"training of the SAE at {hook} diverged (loss NaN or inf) in {steps}; "
                    f"lower train.lr{kept}"
                )
        self.checked_step = self.step_count

    # ---- resumable state -----------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able meta): everything a resumed run needs to continue bit-identically."""
        tensors: dict[str, torch.Tensor] = {}
        for hook, sae in self.saes.items():
            for name, t in sae.state_dict().items():
                tensors[f"{hook}/sae/{name}"] = t
            for i, slots in self.states[hook].optimizer.state_dict()["state"].items():
                for key, t in slots.items():
                    tensors[f"{hook}/adam/{i}/{key}"] = t
            tensors[f"{hook}/since_fired"] = self.states[hook].since_fired
            tensors[f"{hook}/window_fires"] = self.states[hook].window_fires
            tensors[f"{hook}/input_scale"] = self.states[hook].input_scale
        tensors["torch_rng"] = torch.get_rng_state()
        meta = {
            "step": self.step_count,
            "tokens_seen": self.tokens_seen,
            "total_steps": self.total_steps,
            "checked_step": self.checked_step,
            "window_tokens": {name: st.window_tokens for name, st in self.states.items()},
            "widths": {hook: sae.d_in for hook, sae in self.saes.items()},
            "num_latents": {hook: sae.cfg.num_latents for hook, sae in self.saes.items()},
        }
        return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore ``state_dict()``'s output; a state for other hooks or shapes is refused in one line."""
        mine = {hook: (sae.d_in, sae.cfg.num_latents) for hook, sae in self.saes.items()}
        theirs = {
            hook: (meta["widths"][hook], meta["num_latents"][hook]) for hook in meta["widths"]
        }
        if mine != theirs or meta["total_steps"] != self.total_steps:
            raise CheckpointError(
                f"resume: the checkpoint holds SAEs {theirs} over {meta['total_steps']} steps "
                f"(hook: (d_in, latents)), this config makes {mine} over {self.total_steps}"
            )
        self._check_state_shapes(tensors, stepped=meta["step"] > 0)
        for hook, sae in self.saes.items():
            sae.load_state_dict({name: tensors[f"{hook}/sae/{name}"] for name in sae.state_dict()})
            opt = self.states[hook].optimizer
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, t in tensors.items():
                if key.startswith(f"{hook}/adam/"):
                    i, slot = key.removeprefix(f"{hook}/adam/").split("/")
                    state.setdefault(int(i), {})[slot] = t
            opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
            for name in ("since_fired", "window_fires", "input_scale"):
                getattr(self.states[hook], name).copy_(tensors[f"{hook}/{name}"])
        torch.set_rng_state(tensors["torch_rng"])
        self.step_count, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.checked_step = meta["checked_step"]
        for name, tokens in meta["window_tokens"].items():
            self.states[name].window_tokens = tokens
        self.last_checkpoint_step = self.step_count

    def _check_state_shapes(self, tensors: dict[str, torch.Tensor], stepped: bool) -> None:
        """Every tensor a state must hold is there with this trainer's shape: a checkpoint
        whose JSON half agrees but whose tensors do not is damaged or another run's.
        stepped: the state is of a trainer that has stepped (its Adam state exists)."""
        expected: dict[str, torch.Size | None] = {"torch_rng": torch.get_rng_state().shape}
        for hook, sae in self.saes.items():
            params = list(sae.parameters())  # Adam numbers its state by this order
            expected |= {f"{hook}/sae/{name}": t.shape for name, t in sae.state_dict().items()}
            expected |= {
                f"{hook}/{name}": getattr(self.states[hook], name).shape
                for name in ("since_fired", "window_fires", "input_scale")
            }
            saved = [key for key in tensors if key.startswith(f"{hook}/adam/")]
            slots = {key.rsplit("/", 1)[1] for key in saved} or (
                {"step", "exp_avg", "exp_avg_sq"} if stepped else set()
            )
            for i, p in enumerate(params):
                expected |= {
                    f"{hook}/adam/{i}/{slot}": torch.Size([]) if slot == "step" else p.shape
                    for slot in slots
                }
            expected |= {
                key: None for key in saved if key not in expected
            }  # a parameter this SAE lacks
        for key, shape in expected.items():
            got = tuple(tensors[key].shape) if key in tensors else None
            if shape is None or got != tuple(shape):
                raise CheckpointError(
                    f"resume: the checkpoint's {key} has shape {got}, this run needs "
                    f"{None if shape is None else tuple(shape)}; the checkpoint is damaged or belongs to another run"
                )

    def fit(
        self,
        batches,
        progress: bool = True,
        log_every: int = 50,
        on_log: Callable[[Trainer, dict[str, dict[str, float]]], None] | None = None,
        checkpoint_every: int | None = None,
        on_checkpoint: Callable[[Trainer], None] | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> dict[str, dict[str, float]]:
        """Steps over ``batches`` until total_steps; returns the last stats as floats.

        Every ``log_every`` steps (the loop's only host syncs) the progress bar is refreshed
        and ``on_log(trainer, stats)`` is called, e.g. a TensorBoardLogger. Every
        ``checkpoint_every`` steps, and as soon as ``stop_requested()`` turns true,
        ``on_checkpoint(trainer)`` is called once the state is checked finite; after a stop
        request, fit then raises ``TrainingStopped``.
        """
        last: dict[str, dict[str, float]] = {}
        batch_tokens = self.cfg.train.batch_tokens
        stats, logged = None, self.step_count
        # Counted in tokens so the bar shows tokens/s and an ETA.
        with tqdm(
            total=self.total_steps * batch_tokens,
            initial=self.step_count * batch_tokens,
            desc="train",
            unit="tok",
            unit_scale=True,
            disable=not progress,
        ) as bar:
            for batch in batches:
                if self.step_count >= self.total_steps:
                    break
                stats = self.step(batch)
                bar.update(batch_tokens)
                if self.step_count % log_every == 0 or self.step_count == self.total_steps:
                    last, logged = self._log(stats, bar, on_log), self.step_count
                stop = stop_requested()
                due = checkpoint_every is not None and self.step_count % checkpoint_every == 0
                if (
                    on_checkpoint is not None
                    and (stop or due)
                    and self.step_count < self.total_steps
                ):
                    self.check_finite()
                    on_checkpoint(self)
                    self.last_checkpoint_step = self.step_count
                if stop:
                    raise TrainingStopped(self.step_count)
            # The data ran out a little before total_steps (special tokens are dropped): the
            # bar and the log end at the step really reached, not at the last multiple of log_every.
            if stats is not None and logged != self.step_count:
                last = self._log(stats, bar, on_log)
            bar.total = bar.n
            bar.refresh()
        self.check_finite()
        return last

    def _log(
        self,
        stats: dict[str, dict[str, torch.Tensor]],
        bar: tqdm,
        on_log: Callable[[Trainer, dict[str, dict[str, float]]], None] | None,
    ) -> dict[str, dict[str, float]]:
        """Check the state, show ``stats`` (this step's) on the bar and hand them to ``on_log``."""
        self.check_finite()
        last = {h: {k: float(v) for k, v in s.items()} for h, s in stats.items()}
        self.densities = self.take_window_densities()
        last = self.parallel.gather_stats(
            last
        )  # every process's SAEs, for the progress bar and the log
        first = next(iter(last.values()))
        bar.set_postfix(
            step=self.step_count,
            loss=f"{first['loss']:.3g}",
            fvu=f"{first['fvu']:.3f}",
            l0=f"{first['l0']:.1f}",
            silent=f"{first['silent_fraction']:.1%}",
        )
        if on_log is not None:
            on_log(self, last)
        return last

    def take_window_densities(self) -> dict[str, torch.Tensor]:
        """{SAE: per-latent firing rate [M]} since the last call (for density histograms), of
        every process's SAEs; a collective when SAEs are split over processes."""
        rates = {}
        for name in self.saes:
            rate = self.states[name].window_fires.double() / max(1, self.states[name].window_tokens)
            self.states[name].window_fires.zero_()
            self.states[name].window_tokens = 0
            rates[name] = rate
        return self.parallel.gather_rates(rates)


class TensorBoardLogger:
    """``on_log`` callback writing losses, FVU, L0, silent fraction, lr, tokens/s, and over
    the tokens since the last log, the dense fraction (latents firing on > 10%) and a
    histogram of log10 feature density, to ``folder`` (one run per folder)."""

    def __init__(self, folder: str | Path, resumed: Trainer | None = None):
        """resumed: the trainer of a resumed run; events the interrupted run logged after
        its checkpoint are hidden, and tokens/s counts from the resumed step."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=resumed.step_count if resumed else None)
        self.last_time, self.last_tokens = (
            time.perf_counter(),
            resumed.tokens_seen if resumed else 0,
        )

    def __call__(self, trainer: Trainer, stats: dict[str, dict[str, float]]) -> None:
        step, now = trainer.step_count, time.perf_counter()
        rate = (trainer.tokens_seen - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, trainer.tokens_seen
        for hook, values in stats.items():
            for name, value in values.items():
                self.writer.add_scalar(f"{hook}/{name}", value, step)
            density = trainer.densities[hook]
            self.writer.add_scalar(
                f"{hook}/dense_fraction", (density > 0.1).double().mean().item(), step
            )
            self.writer.add_histogram(
                f"{hook}/log10_density", torch.log10(density.clamp_min(1e-10)).cpu(), step
            )
        self.writer.add_scalar("tokens_per_s", rate, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def log_heldout_metrics(folder: str | Path, results: dict[str, dict], step: int) -> None:
    """Write each SAE's held-out metrics (``evaluate_run``'s results) to TensorBoard at
    ``step``, as heldout/<SAE>/<metric>, beside the training curves in ``folder``."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as writer:
        for name, r in results.items():
            values = {k: r[k] for k in ("fvu", "l0", "dead_fraction", "dense_fraction")}
            values.update({k: r["splice"][k] for k in ("ce_loss_recovered", "delta_lm_loss", "kl")})
            for key, value in values.items():
                writer.add_scalar(f"heldout/{name}/{key}", value, step)


def set_aside_old_events(folder: Path) -> Path | None:
    """Move the TensorBoard event files of an earlier run with this folder into a
    sub-folder named by their time (TensorBoard shows it as its own run, not mixed into
    the new curves); where they went, or None when there were none."""
    events = sorted(Path(folder).glob("events.out.tfevents.*"))
    if not events:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(e.stat().st_mtime for e in events)))
    dest = Path(folder) / f"earlier-{stamp}"
    dest.mkdir(exist_ok=True)
    for e in events:
        e.rename(dest / e.name)
    return dest
