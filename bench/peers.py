"""Our SAE architectures against the peer libraries' implementations of the same ones, on the
same activations, token budget, latents and batches in the same order.

    # a venv beside the project's environment (SAELens pulls in TransformerLens and its own torch):
    #   python -m venv --system-site-packages V && V/bin/pip install sae-lens==6.54.12 eai-sparsify dictionary-learning
    PY="env PYTHONPATH=$PWD V/bin/python"               # from the repository root
    $PY bench/peers.py --token-budget 40000 --epochs 1                      # smoke run, every contender
    $PY bench/peers.py --contenders ours:topk,ours:batchtopk,saelens:topk,saelens:batchtopk,\\
        sparsify:default,dictionary_learning:topk,dictionary_learning:batchtopk   # the k-family, demo budget
    $PY bench/peers.py --sweep --svg-out frontier.svg --json-out peers.json  # + coefficient sweeps
    $PY bench/peers.py --merge a.json --merge b.json --svg-out frontier.svg  # join runs made apart
    $PY bench/peers.py --config configs/smollm2-135m-topk.yaml --set harvest.cache_dir=... \\
        --cache-dir /tmp/peers-smollm                                        # SmolLM2-135M layer 15

Activations: the config's one hook point, harvested once into ``--cache-dir`` and materialized
as a list of batches (``bench/quality.py``'s loader); every contender trains on exactly these
batches in this order, with ``num_latents`` (or expansion x d) latents and k = the config's
``sae.k`` (32) for the k-family. Each contender uses its implementation's OWN recommended
settings (lr, schedule, warmup, coefficients, init, normalisation); the JSON records every
setting and where it came from. Step-count defaults that exceed a short run (warmups of
1000/2000 steps, dictionary_learning's threshold start at step 1000) are capped at 5% of the
run's steps, as our own ``train.warmup_steps`` rule does; at >= 20k steps they are the defaults.

Contenders (``impl:arch``; ``impl:arch@KEY=VALUE@...`` changes settings, e.g.
``ours:relu@sae.l1_coefficient=10``, ``saelens:standard@l1_coefficient=10``):

- ``ours:<arch>`` for every name in ``sae.architectures.ARCHITECTURES`` (topk, batchtopk, relu,
  jumprelu, gated, matryoshka): ``sae.training.trainer.Trainer.step`` per
  batch with the config's settings and ``sae.architecture=<arch>`` (sae keys of other
  architectures dropped) but no lr override (the config's ``train.lr`` is ignored: each
  architecture's own rate); scored as ``trained_sae``.
- ``saelens:<arch>`` (standard, topk, batchtopk, jumprelu, gated, matryoshka_batchtopk):
  SAELens 6.54's TrainingSAE classes trained by its own ``SAETrainer.fit()`` (no model needed:
  ``data_provider`` is an iterator over our batches), with LanguageModelSAERunnerConfig's defaults
  (lr 3e-4 constant, no warmup, Adam(0.9, 0.999), lr_end = lr / 10, dead window 1000 steps) and
  each architecture's recommended settings from its docs (docs/training_saes.md): standard as
  the tutorial run (lr 5e-5, l1 5, l1 warm-up 5%, lr decay over the last 20%,
  expected_average_only_in), jumprelu as the recommended tanh setup (l0 5, bandwidth 2,
  init threshold 0.1, pre-act loss 3e-6, l0 warm-up over the whole run, decay 20%,
  expected_average_only_in), gated l1 5, matryoshka widths d_sae/4, d_sae/2, d_sae. When
  inputs are normalized, the scale is estimated by SAELens's ActivationScaler on a separate
  pass over our batches (fit() would otherwise consume them). Saved with
  ``save_inference_model`` and read back by ``sae.formats.load_sae``.
- ``sparsify:default``: sparsify 1.3.3's trainer step reproduced on our batches (its Trainer
  needs a model): SparseCoder, b_dec = mean of the first batch, decoder renormalized before each
  forward, loss fvu (+ auxk_alpha * auxk, default 0: no AuxK), gradient parallel to the decoder
  rows removed, ``SignSGD`` wrapped in ``ScheduleFreeWrapper(momentum 0.95)`` at lr
  5e-3 / sqrt(M / 2^14), scored at the schedule-free average (``optimizer.eval()``, as its
  checkpoints are); saved with ``save_to_disk``, read back by ``load_sae``.
- ``sparsify:adam``: the same step with sparsify's ``optimizer=adam`` option: Adam at
  2e-4 / sqrt(M / 2^14), transformers' linear warmup (1000 steps, capped) and linear decay.
  (``bench/quality.py``'s ``sparsify`` contender is a third variant: Adam with OUR schedule.)
- ``dictionary_learning:<arch>`` (topk, batchtopk, matryoshka_batchtopk, standard,
  standard_april, jumprelu, gated): its trainer classes with their constructor defaults,
  trained by its own ``training.trainSAE`` loop with ``normalize_activations=True`` (the
  maintainers' demo.py), matryoshka group fractions of its demo_config; jumprelu's sparsity is
  its target_l0 (default 20). Its ae is rebuilt as our module from its tensors.

Scoring, one path for all: every trained SAE becomes one of our modules; the module's output
is checked against the implementation's own inference forward on 4096 held-out tokens
(``conversion_err``: |ours - theirs| / |x - mean x|); then ``quality.held_out_metrics`` (FVU,
L0, dead, dense on the config's held-out split) and ``sae.evaluation.splice.splice_metrics``
(CE loss recovered, the model run with the SAE's reconstruction spliced in at the hook).
ms/step = training wall / steps; step ratio = interleaved step time (``--timing-rounds`` rounds
x ``--timing-steps`` steps on one batch, contenders alternating, fresh instances) over that of
``ours:<same architecture>``. ``--sweep`` also trains the coefficient values of ``SWEEPS`` for
the coefficient-set architectures and draws held-out FVU against L0 (``--svg-out``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import inspect
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (  # noqa: E402
    activation_options,
    activation_overrides,
    held_out_metrics,
    load_model_and_activations,
    sae_commit,
)
from svg_plot import frontier_svg  # noqa: E402

from sae.activations.stream import contexts_for  # noqa: E402
from sae.architectures import ARCHITECTURES  # noqa: E402
from sae.config import (  # noqa: E402
    architecture_configs,
    config_from_dict,
    parse_override,
    read_yaml,
)
from sae.evaluation.heldout import eval_config  # noqa: E402
from sae.evaluation.splice import splice_metrics  # noqa: E402
from sae.formats import load_sae  # noqa: E402
from sae.training.trainer import Trainer  # noqa: E402

# The architecture of ours each peer architecture is timed against (same name otherwise).
SAME_ARCH = {
    "standard": "relu",
    "standard_april": "relu",
    "matryoshka_batchtopk": "matryoshka",
    "default": "topk",
    "adam": "topk",
}
# Coefficient sweeps (--sweep): the setting and its values; each list holds the recommended
# value (the contender's main run), and goes below and above it.
SWEEPS = {
    "ours:relu": ("sae.l1_coefficient", [2.5, 5.0, 10.0, 20.0]),
    "ours:jumprelu": ("sae.l0_coefficient", [0.5, 1.0, 2.0, 4.0]),
    "ours:gated": ("sae.l1_coefficient", [0.5, 1.0, 2.0, 4.0]),
    "saelens:standard": ("l1_coefficient", [2.5, 5.0, 10.0, 20.0]),
    "saelens:jumprelu": ("l0_coefficient", [2.5, 5.0, 10.0, 20.0]),
    "saelens:gated": ("l1_coefficient", [2.5, 5.0, 10.0, 20.0]),
    "dictionary_learning:standard": ("l1_penalty", [0.05, 0.1, 0.2, 0.4]),
    "dictionary_learning:standard_april": ("l1_penalty", [0.05, 0.1, 0.2, 0.4]),
    "dictionary_learning:gated": ("l1_penalty", [0.05, 0.1, 0.2, 0.4]),
    "dictionary_learning:jumprelu": ("target_l0", [10, 20, 40, 80]),
}
CONVERSION_TOKENS = 4096


def capped(default: int, steps: int) -> int:
    """A step-count default, at most 5% of this run's steps (see the module docstring)."""
    return min(int(default), steps // 20)


@dataclass
class Setup:
    """What every contender is given: the activations and the shape of the SAE."""

    config: str
    overrides: list[str]
    cfg: object  # the config's RunConfig (as read, architecture and all)
    batches: list[torch.Tensor]
    workdir: Path
    seed: int
    hook: str = field(init=False)
    d: int = field(init=False)
    M: int = field(init=False)
    k: int = field(init=False)
    steps: int = field(init=False)
    N: int = field(init=False)

    def __post_init__(self):
        self.hook = self.cfg.hooks[0]
        self.N, self.d = self.batches[0].shape
        self.M = self.cfg.sae.num_latents or self.cfg.sae.expansion_factor * self.d
        self.k = getattr(self.cfg.sae, "k", 32)
        self.steps = len(self.batches)


def parse_settings(items: list[str]) -> dict:
    """['key=value', ...] -> {key: value read as YAML}."""
    out = {}
    for text in items:
        key, sep, raw = text.partition("=")
        if not sep:
            raise click.UsageError(f"contender setting {text!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(raw)
    return out


# ---- ours -------------------------------------------------------------------------------


def ours_config(setup: Setup, arch: str, extra: list[str]):
    """The config file with ``train.lr`` null (each architecture's own rate, unless --set or
    ``extra`` gives one), the run's overrides, ``sae.architecture=arch`` and ``extra``; sae
    keys of other architectures (the config's k for relu, say) are dropped."""
    values = _merge(read_yaml(setup.config), {"train": {"lr": None}})
    for text in [*setup.overrides, f"sae.architecture={arch}", *extra]:
        values = _merge(values, parse_override(text))
    keep = {f.name for f in dataclasses.fields(architecture_configs()[arch])}
    values["sae"] = {k: v for k, v in values.get("sae", {}).items() if k in keep}
    return config_from_dict(values)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class OursRun:
    """Our trainer, one ``Trainer.step`` per batch."""

    def __init__(self, setup: Setup, arch: str, extra: list[str]):
        self.setup, self.arch = setup, arch
        self.cfg = ours_config(setup, arch, extra)
        self.trainer = Trainer(self.cfg, {setup.hook: setup.d}, total_steps=setup.steps)

    def step(self, x):
        self.trainer.step({self.setup.hook: x})

    def train(self, batches):
        for x in batches:
            self.step(x)
        self.trainer.check_finite()

    def export(self, folder):
        return self.trainer.trained_sae(self.setup.hook).eval(), None

    def settings(self) -> dict:
        t, hook = self.trainer, self.setup.hook
        st = t.states[hook]
        sae = st.sae
        return {
            "sae": dataclasses.asdict(sae.cfg),
            "lr": st.peak_lr,
            "schedule": f"linear warmup {t.warmup_steps} steps, constant, linear decay over the "
            f"last {self.cfg.train.decay_fraction:.0%}",
            "adam_betas": list(sae.adam_betas),
            "grad_clip": t.grad_clip(hook),
            "scale_inputs": t.scales_inputs(hook),
            "unit_norm_decoder": sae.unit_norm_decoder,
            "init": f"decoder rows norm {sae.init_decoder_norm}, W_enc = "
            f"{sae.init_encoder_scale:.3g} W_dec",
            "dead_tokens": t.dead_tokens,
            "source": f"{type(sae).__module__} (recipe and config defaults); train.* null "
            "rules of sae/config.py and sae/training/trainer.py run_schedule",
        }

    def summary(self) -> str:
        s = self.settings()
        coef = {
            k: v
            for k, v in s["sae"].items()
            if k.endswith("coefficient") or k in ("k", "aux_alpha")
        }
        return (
            f"lr {s['lr']:.2g}, warmup {self.trainer.warmup_steps}, decay 20%, "
            + ", ".join(f"{k} {v:g}" for k, v in coef.items())
            + (", inputs scaled" if s["scale_inputs"] else "")
        )


# ---- SAELens ----------------------------------------------------------------------------

SAELENS_COMMON = (
    "sae_lens/config.py LanguageModelSAERunnerConfig defaults (lr 3e-4, constant schedule, "
    "no warmup, Adam(0.9, 0.999), lr_end = lr / 10, dead_feature_window 1000, "
    "feature_sampling_window 2000); sae_trainer.py (grad-norm clip 1.0); TrainingSAEConfig "
    "(decoder_init_norm 0.1, W_enc = W_dec^T, apply_b_dec_to_input True)"
)
# arch: (TrainingSAE class, its config class, sae settings, trainer settings, source).
# ("k",): the run's k; ("steps", f): f x the run's steps; ("widths", fs): f x d_sae each.
SAELENS = {
    "standard": (
        "StandardTrainingSAE",
        "StandardTrainingSAEConfig",
        {
            "l1_coefficient": 5.0,
            "l1_warm_up_steps": ("steps", 0.05),
            "normalize_activations": "expected_average_only_in",
        },
        {"lr": 5e-5, "lr_decay_steps": ("steps", 0.2)},
        "docs/training_saes.md tutorial run",
    ),
    "topk": ("TopKTrainingSAE", "TopKTrainingSAEConfig", {"k": ("k",)}, {}, "config defaults"),
    "batchtopk": (
        "BatchTopKTrainingSAE",
        "BatchTopKTrainingSAEConfig",
        {"k": ("k",)},
        {},
        "config defaults",
    ),
    "matryoshka_batchtopk": (
        "MatryoshkaBatchTopKTrainingSAE",
        "MatryoshkaBatchTopKTrainingSAEConfig",
        {"k": ("k",), "matryoshka_widths": ("widths", [0.25, 0.5, 1.0])},
        {},
        "docs/training_saes.md example widths (d_sae/4, d_sae/2, d_sae)",
    ),
    "jumprelu": (
        "JumpReLUTrainingSAE",
        "JumpReLUTrainingSAEConfig",
        {
            "l0_coefficient": 5.0,
            "jumprelu_sparsity_loss_mode": "tanh",
            "jumprelu_tanh_scale": 4.0,
            "jumprelu_bandwidth": 2.0,
            "jumprelu_init_threshold": 0.1,
            "pre_act_loss_coefficient": 3e-6,
            "normalize_activations": "expected_average_only_in",
            "l0_warm_up_steps": ("steps", 1.0),
        },
        {"lr_decay_steps": ("steps", 0.2)},
        "docs/training_saes.md recommended tanh JumpReLU (Anthropic's setup)",
    ),
    "gated": (
        "GatedTrainingSAE",
        "GatedTrainingSAEConfig",
        {"l1_coefficient": 5.0},
        {},
        "docs/training_saes.md gated example",
    ),
}


def resolve(value, setup: Setup):
    """A recipe value: ("k",), ("steps", f) and ("widths", fs) filled in for this run."""
    if isinstance(value, tuple) and value[0] == "k":
        return setup.k
    if isinstance(value, tuple) and value[0] == "steps":
        return int(setup.steps * value[1])
    if isinstance(value, tuple) and value[0] == "widths":
        return [int(setup.M * f) for f in value[1]]
    return value


class SAELensRun:
    """A SAELens TrainingSAE and its SAETrainer; ``train`` is ``SAETrainer.fit()``."""

    def __init__(self, setup: Setup, arch: str, extra: list[str]):
        import sae_lens
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        self.setup, self.arch = setup, arch
        sae_name, cfg_name, sae_kw, tr_kw, self.source = SAELENS[arch]
        cfg_cls = getattr(sae_lens, cfg_name)
        sae_kw = {k: resolve(v, setup) for k, v in sae_kw.items()}
        tr_kw = {k: resolve(v, setup) for k, v in tr_kw.items()}
        sae_fields = {f.name for f in dataclasses.fields(cfg_cls)}
        tr_fields = {f.name for f in dataclasses.fields(SAETrainerConfig)}
        for key, value in parse_settings(extra).items():
            if key not in sae_fields | tr_fields:
                raise click.UsageError(f"saelens:{arch}: no setting {key!r}")
            (sae_kw if key in sae_fields else tr_kw)[key] = value
        tr_kw.setdefault("lr_end", tr_kw.get("lr", 3e-4) / 10)  # the runner's __post_init__
        torch.manual_seed(setup.seed)
        sae_cfg = cfg_cls(d_in=setup.d, d_sae=setup.M, dtype="float32", device="cpu", **sae_kw)
        self.sae = getattr(sae_lens, sae_name)(sae_cfg)
        self.tcfg = SAETrainerConfig(
            total_training_samples=setup.steps * setup.N,
            train_batch_size_samples=setup.N,
            **tr_kw,
        )
        self.trainer = SAETrainer(cfg=self.tcfg, sae=self.sae, data_provider=iter(()))
        self.normalize = sae_cfg.normalize_activations  # fit() folds it and sets "none"
        if self.normalize == "expected_average_only_in":
            n = min(self.tcfg.n_batches_for_norm_estimate, setup.steps)
            self.trainer.activation_scaler.estimate_scaling_factor(setup.d, iter(setup.batches), n)
        self.scaling_factor = self.trainer.activation_scaler.scaling_factor

    def step(self, x):
        self.trainer.maybe_reset_sparsity()
        self.trainer.step(x)
        self.trainer.n_training_steps += 1

    def train(self, batches):
        self.trainer.data_provider = iter(batches)
        self.trainer.fit()

    def export(self, folder):
        from sae_lens import SAE

        self.trainer.sae.save_inference_model(folder)
        theirs = SAE.load_from_disk(str(folder), device="cpu")
        return load_sae(folder), lambda x: theirs(x)

    def settings(self) -> dict:
        skip = {"metadata", "d_in", "d_sae", "device", "dtype"}
        sae = {k: v for k, v in dataclasses.asdict(self.sae.cfg).items() if k not in skip}
        trainer = {k: v for k, v in dataclasses.asdict(self.tcfg).items() if k != "logger"}
        return {
            "sae": sae,
            "trainer": trainer,
            "grad_clip": 1.0,
            "normalize_activations_in_training": self.normalize,
            "scaling_factor": self.scaling_factor,
            "source": f"SAELens {md.version('sae_lens')}: {SAELENS_COMMON}; {self.source}",
        }

    def summary(self) -> str:
        c, t = self.sae.cfg, self.tcfg
        parts = [f"lr {t.lr:.2g} {t.lr_scheduler_name}"]
        if t.lr_decay_steps:
            parts.append(f"decay {t.lr_decay_steps}")
        for key in ("k", "l1_coefficient", "l0_coefficient", "aux_loss_coefficient"):
            if hasattr(c, key):
                parts.append(f"{key} {getattr(c, key):g}")
        if self.normalize != "none":
            parts.append("inputs scaled")
        return ", ".join(parts)


# ---- sparsify -----------------------------------------------------------------------------


class SparsifyRun:
    """sparsify's Trainer step on our batches (``optimizer``: signum or adam)."""

    def __init__(self, setup: Setup, optimizer: str, extra: list[str]):
        if not torch.cuda.is_available():  # its Triton decoder needs a GPU: sparsify's own switch
            os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
        from sparsify import SparseCoder, SparseCoderConfig

        self.setup, self.optimizer_name, self.count = setup, optimizer, 0
        coder_fields = {f.name for f in dataclasses.fields(SparseCoderConfig)}
        self.train_cfg = {
            "lr": None,
            "auxk_alpha": 0.0,
            "dead_feature_threshold": 10_000_000,
            "lr_warmup_steps": capped(1000, setup.steps),
        }
        coder = {"num_latents": setup.M, "k": setup.k}
        for key, value in parse_settings(extra).items():
            if key not in coder_fields | set(self.train_cfg):
                raise click.UsageError(f"sparsify:{optimizer}: no setting {key!r}")
            (coder if key in coder_fields else self.train_cfg)[key] = value
        torch.manual_seed(setup.seed)  # its Trainer seeds before building each SparseCoder
        self.sae = SparseCoder(setup.d, SparseCoderConfig(**coder), "cpu", dtype=torch.float32)
        self.opt, self.schedulers = self._optimizer()
        self.since_fired = torch.zeros(setup.M, dtype=torch.long)

    def _optimizer(self):
        """sparsify/trainer.py's optimizer and schedulers for ``optimizer_name``."""
        M, cfg = self.setup.M, self.train_cfg
        if self.optimizer_name == "signum":
            from schedulefree import ScheduleFreeWrapper
            from sparsify.sign_sgd import SignSGD

            cfg["lr"] = cfg["lr"] or 5e-3 / (M / 2**14) ** 0.5
            opt = ScheduleFreeWrapper(
                SignSGD([dict(params=self.sae.parameters(), lr=cfg["lr"])]), momentum=0.95
            )
            opt.train()
            return opt, []
        from transformers import get_linear_schedule_with_warmup

        cfg["lr"] = cfg["lr"] or 2e-4 / (M / 2**14) ** 0.5
        opt = torch.optim.Adam([dict(params=self.sae.parameters(), lr=cfg["lr"])])
        sched = get_linear_schedule_with_warmup(opt, cfg["lr_warmup_steps"], self.setup.steps)
        return opt, [sched]

    def step(self, x):
        sae, cfg = self.sae, self.train_cfg
        if self.count == 0:  # "ensure the preactivations are centered at initialization"
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = self.since_fired > cfg["dead_feature_threshold"] if cfg["auxk_alpha"] > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead, total_variance=total_variance)
        loss = out.fvu + cfg["auxk_alpha"] * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        for sched in self.schedulers:
            sched.step()
        with torch.no_grad():
            self.since_fired += x.shape[0]
            self.since_fired[out.latent_indices.flatten()] = 0
        self.count += 1

    def train(self, batches):
        for x in batches:
            self.step(x)

    def export(self, folder):
        if self.optimizer_name == "signum":
            self.opt.eval()  # the schedule-free average, as sparsify's checkpoints hold
        path = Path(folder) / self.setup.hook
        self.sae.save_to_disk(path)

        def theirs(x):
            acts, idx, _ = self.sae.encode(x)
            return self.sae.decode(acts, idx)

        return load_sae(path), theirs

    def settings(self) -> dict:
        return {
            "coder": self.sae.cfg.to_dict(),
            "optimizer": "SignSGD in ScheduleFreeWrapper(momentum 0.95)"
            if self.optimizer_name == "signum"
            else "Adam, linear warmup then linear decay (transformers)",
            **self.train_cfg,
            "source": f"sparsify {md.version('eai-sparsify')}: config.py TrainConfig / "
            "SparseCoderConfig defaults, trainer.py (optimizers, lr rule, b_dec init, "
            "decoder normalization)",
        }

    def summary(self) -> str:
        c = self.train_cfg
        opt = "signum+schedule-free" if self.optimizer_name == "signum" else "Adam"
        return f"{opt}, lr {c['lr']:.2g}, k {self.sae.cfg.k}, auxk {c['auxk_alpha']:g}"


# ---- dictionary_learning ------------------------------------------------------------------

DL_DEMO_GROUPS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32]
# arch: (trainers module, trainer class, extra constructor arguments)
DICTIONARY_LEARNING = {
    "topk": ("top_k", "TopKTrainer", {"k": ("k",)}),
    "batchtopk": ("batch_top_k", "BatchTopKTrainer", {"k": ("k",)}),
    "matryoshka_batchtopk": (
        "matryoshka_batch_top_k",
        "MatryoshkaBatchTopKTrainer",
        {"k": ("k",), "group_fractions": DL_DEMO_GROUPS},
    ),
    "standard": ("standard", "StandardTrainer", {}),
    "standard_april": ("standard", "StandardTrainerAprilUpdate", {}),
    "jumprelu": ("jumprelu", "JumpReluTrainer", {}),
    "gated": ("gdm", "GatedSAETrainer", {}),
}
DL_STEP_DEFAULTS = ("warmup_steps", "sparsity_warmup_steps", "threshold_start_step")


class Clones:
    """Our batches as dictionary_learning's ``data``: re-iterable (its norm estimate reads
    them first), a copy each (trainSAE divides them in place)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return (x.clone() for x in self.batches)


class DictionaryLearningRun:
    """A dictionary_learning trainer; ``train`` is its ``training.trainSAE`` loop."""

    def __init__(self, setup: Setup, arch: str, extra: list[str]):
        import importlib

        self.setup, self.arch, self.count = setup, arch, 0
        module, cls_name, kw = DICTIONARY_LEARNING[arch]
        self.cls = getattr(
            importlib.import_module(f"dictionary_learning.trainers.{module}"), cls_name
        )
        params = inspect.signature(self.cls.__init__).parameters
        self.kwargs = dict(
            steps=setup.steps,
            activation_dim=setup.d,
            dict_size=setup.M,
            layer=setup.hook,
            lm_name=str(setup.cfg.model.name_or_path),
            device="cpu",
            seed=setup.seed,
            **{k: resolve(v, setup) for k, v in kw.items()},
        )
        for key in DL_STEP_DEFAULTS:
            if key in params and params[key].default is not None:
                self.kwargs[key] = capped(params[key].default, setup.steps)
        self.normalize = True
        for key, value in parse_settings(extra).items():
            if key == "normalize_activations":
                self.normalize = bool(value)
            elif key in params:
                self.kwargs[key] = value
            else:
                raise click.UsageError(f"dictionary_learning:{arch}: no setting {key!r}")
        torch.manual_seed(setup.seed)
        self.trainer = self.cls(**self.kwargs)
        self.norm = self._norm_factor() if self.normalize else 1.0

    def _norm_factor(self) -> float:
        from dictionary_learning.training import get_norm_factor

        return get_norm_factor(Clones(self.setup.batches), steps=100)

    def step(self, x):
        self.trainer.update(self.count, x / self.norm)
        self.count += 1

    def train(self, batches):
        from dictionary_learning.training import trainSAE

        save_dir = Path(tempfile.mkdtemp(dir=self.setup.workdir))
        torch.manual_seed(self.setup.seed)
        trainSAE(
            data=Clones(batches),
            trainer_configs=[{"trainer": self.cls, **self.kwargs}],
            steps=len(batches),
            save_dir=str(save_dir),
            normalize_activations=self.normalize,
            device="cpu",
        )
        state = torch.load(save_dir / "trainer_0" / "ae.pt", weights_only=True)
        self.trainer.ae.load_state_dict(state)

    def export(self, folder):
        ae = self.trainer.ae.eval()
        return dictionary_module(self.arch, ae, self.setup), lambda x: ae(x)

    def settings(self) -> dict:
        p = inspect.signature(self.cls.__init__).parameters
        defaults = {
            k: v.default
            for k, v in p.items()
            if v.default is not inspect.Parameter.empty and k not in ("device", "wandb_name")
        }
        used = {k: v for k, v in self.kwargs.items() if k not in ("layer", "lm_name", "device")}
        config = {k: v for k, v in self.trainer.config.items() if isinstance(v, (int, float, str))}
        return {
            "trainer": self.cls.__name__,
            "constructor_defaults": {k: repr(v) for k, v in defaults.items()},
            "passed": used,
            "trainer_config": config,
            "normalize_activations": self.normalize,
            "norm_factor": self.norm,
            "source": f"dictionary_learning {md.version('dictionary_learning')}: "
            f"trainers/{DICTIONARY_LEARNING[self.arch][0]}.py constructor defaults, "
            "training.trainSAE; normalize_activations=True and the matryoshka group "
            "fractions from its maintainers' demo (demo.py, demo_config.py)",
        }

    def summary(self) -> str:
        c = self.trainer.config
        parts = [f"lr {c.get('lr', float('nan')):.2g}", f"warmup {self.kwargs.get('warmup_steps')}"]
        for key in ("k", "l1_penalty", "target_l0", "sparsity_penalty", "auxk_alpha"):
            if key in c:
                parts.append(f"{key} {c[key]:g}")
        if self.normalize:
            parts.append("inputs normalized")
        return ", ".join(parts)


def dictionary_module(arch: str, ae, setup: Setup):
    """Our module computing what dictionary_learning's ``ae`` computes at inference."""
    t, M = {}, setup.M
    if arch in ("topk", "batchtopk", "standard", "standard_april"):
        t = {"W_enc": ae.encoder.weight.T, "b_enc": ae.encoder.bias, "W_dec": ae.decoder.weight.T}
        t["b_dec"] = ae.bias if arch.startswith("standard") else ae.b_dec
    elif arch in ("matryoshka_batchtopk", "jumprelu"):
        t = {"W_enc": ae.W_enc, "b_enc": ae.b_enc, "W_dec": ae.W_dec, "b_dec": ae.b_dec}
    elif arch == "gated":
        t = {"W_enc": ae.encoder.weight.T, "W_dec": ae.decoder.weight.T}
        t.update(b_dec=ae.decoder_bias, b_gate=ae.gate_bias, r_mag=ae.r_mag, b_mag=ae.mag_bias)
    if arch in ("batchtopk", "matryoshka_batchtopk", "jumprelu"):
        t["threshold"] = ae.threshold.detach().float().expand(M).clamp(min=0)
    ours = {
        "topk": "topk",
        "standard": "relu",
        "standard_april": "relu",
        "gated": "gated",
    }.get(arch, "jumprelu")
    apply = arch != "jumprelu"  # JumpReluAutoEncoder.apply_b_dec_to_input is False
    return our_module(ours, setup, t, apply)


def our_module(arch: str, setup: Setup, tensors: dict, apply_b_dec: bool):
    """One of our SAEs with these tensors (our disk names and layouts)."""
    cfg = {
        "architecture": arch,
        "d_in": setup.d,
        "num_latents": setup.M,
        "apply_b_dec_to_input": apply_b_dec,
    }
    if arch in ("topk", "batchtopk"):
        cfg["k"] = setup.k
    tensors = {k: v.detach().float().contiguous().clone() for k, v in tensors.items()}
    return ARCHITECTURES[arch].from_stored(cfg, tensors, f"dictionary_learning {arch}").eval()


# ---- the contenders -------------------------------------------------------------------------


def registry() -> dict[str, tuple[str, str, object]]:
    """{contender name: (implementation, architecture, factory(setup, extra) -> run)}."""
    out = {}
    for arch in ARCHITECTURES:
        out[f"ours:{arch}"] = ("ours", arch, lambda s, e, a=arch: OursRun(s, a, e))
    for arch in SAELENS:
        out[f"saelens:{arch}"] = ("saelens", arch, lambda s, e, a=arch: SAELensRun(s, a, e))
    out["sparsify:default"] = ("sparsify", "default", lambda s, e: SparsifyRun(s, "signum", e))
    out["sparsify:adam"] = ("sparsify", "adam", lambda s, e: SparsifyRun(s, "adam", e))
    for arch in DICTIONARY_LEARNING:
        out[f"dictionary_learning:{arch}"] = (
            "dictionary_learning",
            arch,
            lambda s, e, a=arch: DictionaryLearningRun(s, a, e),
        )
    return out


def ours_of(name: str, reg: dict) -> str | None:
    """The ``ours:<arch>`` contender that ``name`` is timed against (None if not registered)."""
    impl, arch, _ = reg[name.split("@")[0]]
    mine = f"ours:{SAME_ARCH.get(arch, arch)}"
    return mine if mine in reg else None


def parse_contenders(text: str, reg: dict) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [n for n in names if n.split("@")[0] not in reg]
    if bad:
        raise click.UsageError(f"unknown contender(s) {bad}; valid: {', '.join(reg)}")
    return names


def with_sweeps(names: list[str], reg: dict) -> list[str]:
    """``names`` and, after each plain one with a sweep, its other coefficient values."""
    out = []
    for name in names:
        out.append(name)
        if name in SWEEPS:
            key, values = SWEEPS[name]
            main = sweep_value(name, reg)
            out += [f"{name}@{key}={v}" for v in values if not math.isclose(v, main)]
    return out


def sweep_value(name: str, reg: dict) -> float:
    """The value of the swept setting in a contender's main run (its recommendation)."""
    key, _ = SWEEPS[name]
    impl, arch, _ = reg[name]
    if impl == "ours":
        return getattr(architecture_configs()[arch](), key.split(".")[-1])
    if impl == "saelens":
        return SAELENS[arch][2].get(key, SAELENS[arch][3].get(key))
    module, cls_name, _ = DICTIONARY_LEARNING[arch]
    import importlib

    cls = getattr(importlib.import_module(f"dictionary_learning.trainers.{module}"), cls_name)
    return inspect.signature(cls.__init__).parameters[key].default


def build(name: str, setup: Setup, reg: dict):
    base, *extra = name.split("@")
    return reg[base][2](setup, extra)


# ---- scoring --------------------------------------------------------------------------------


@torch.no_grad()
def conversion_error(module, theirs, x) -> float | None:
    """|our module(x) - their forward(x)| / |x - mean x| on x (None for ours)."""
    if theirs is None:
        return None
    return ((module(x) - theirs(x)).norm() / (x - x.mean(0)).norm()).item()


def score(module, theirs, setup: Setup, lm, held_out) -> dict:
    """Held-out FVU, L0, dead, dense and the splice metrics of one of our modules."""
    with torch.no_grad():
        result = held_out_metrics(module.encode, module.decode, held_out)
    result["conversion_err"] = conversion_error(module, theirs, held_out[:CONVERSION_TOKENS])
    if lm is not None:
        model, tokenizer = lm
        ecfg = eval_config(setup.cfg)
        result["splice"] = splice_metrics(
            model, tokenizer, setup.hook, lambda h: module(h.float()), contexts_for(ecfg, tokenizer)
        )
    return result


def run_contender(name: str, setup: Setup, reg: dict, lm, held_out) -> dict:
    """Train ``name`` on the batches, export it as our module, score it."""
    run = build(name, setup, reg)
    start = time.perf_counter()
    run.train(setup.batches)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=setup.workdir) as folder:
        module, theirs = run.export(folder)
        scored = time.perf_counter()
        result = score(module, theirs, setup, lm, held_out)
        result["score_seconds"] = time.perf_counter() - scored
    impl, arch, _ = reg[name.split("@")[0]]
    return {
        "contender": name,
        "implementation": impl,
        "architecture": arch,
        "our_module": module.architecture,
        "summary": run.summary(),
        "settings": run.settings(),
        "train_seconds": seconds,
        "ms_per_step": 1e3 * seconds / setup.steps,
        **result,
    }


def interleaved_step_ms(names: list[str], setup: Setup, reg: dict, rounds: int, steps: int):
    """{name: median over rounds of ms per step}: fresh instances, 2 warm-up steps each, then
    ``rounds`` rounds of ``steps`` steps on one batch, contenders alternating (the order
    rotates each round so none always follows the same neighbour)."""
    x = setup.batches[0]
    runs = {name: build(name, setup, reg) for name in names}
    for run in runs.values():
        for _ in range(2):
            run.step(x)
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(steps):
                runs[name].step(x)
            times[name].append(1e3 * (time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


# ---- output ---------------------------------------------------------------------------------


def markdown_table(out: dict) -> str:
    head = (
        f"### {out['config']} ({out['hook']}, d = {out['d']}, {out['latents']} latents, "
        f"{out['steps']} steps x {out['batch_tokens']} tokens)\n\n"
        "| contender | settings | L0 | FVU | dead | dense | CE loss rec. | ms/step | step ratio |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in out["runs"]:
        ce = r.get("splice", {}).get("ce_loss_recovered")
        ratio = r.get("step_ratio")
        rows.append(
            f"| {r['contender']} | {r['summary']} | {r['l0']:.1f} | {r['fvu']:.4f} | "
            f"{r['dead_fraction']:.1%} | {r['dense_fraction']:.1%} | "
            f"{'-' if ce is None else f'{ce:.4f}'} | {r['ms_per_step']:.0f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} |"
        )
    return head + "\n".join(rows) + "\n"


def frontier_series(runs: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """{implementation:architecture: [(L0, FVU), ...]} of the swept contenders: each one's
    runs at its defaults or with only its swept coefficient changed (a run at another
    learning rate is not a point of the same curve). A run with FVU >= 1 (worse than the
    mean) is left to the table: on the plot it would only squash the axes."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        base, *changes = r["contender"].split("@")
        if base not in SWEEPS or r["fvu"] >= 1:
            continue
        if all(change.split("=")[0] == SWEEPS[base][0] for change in changes):
            series.setdefault(base, []).append((r["l0"], r["fvu"]))
    return series


def versions() -> dict:
    out = {"torch": torch.__version__}
    for dist in ("sae_lens", "eai-sparsify", "dictionary_learning"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    code = sae_commit()
    if code:
        out["sae_commit"], out["sae_dirty"] = code["commit"], code["sae_dirty"]
    return out


def base_overrides(config, cache_dir, token_budget, epochs, eval_tokens, overrides, seed):
    """The run's overrides: bench/quality.py's activation set, and the seed."""
    base = activation_overrides(config, cache_dir, token_budget, epochs, eval_tokens, overrides)
    return [*base, f"train.seed={seed}"]


def attach_step_ratios(out: dict, names: list[str], setup: Setup, reg: dict, rounds, steps):
    """Interleaved step times of the plain contenders and their ``ours:<arch>``; each run
    gets its own and its ratio to ours."""
    plain = list(dict.fromkeys(n for n in names if "@" not in n))
    timed = list(dict.fromkeys([*plain, *(o for n in plain if (o := ours_of(n, reg)))]))
    if not timed or rounds < 1:  # only swept variants, or --timing-rounds 0: nothing to time
        return
    print(f"interleaved step timing: {len(timed)} contenders x {rounds} rounds", flush=True)
    ms = interleaved_step_ms(timed, setup, reg, rounds, steps)
    out["interleaved_step_ms"] = ms
    for r in out["runs"]:
        name = r["contender"]
        if name in ms:
            r["interleaved_ms"] = ms[name]
            mine = ours_of(name, reg)
            r["step_ratio"] = ms[name] / ms[mine] if mine in ms else None
            r["step_ratio_to"] = mine


@click.command()
@activation_options
@click.option(
    "--contenders",
    default=None,
    help="Comma-separated impl:arch[@KEY=VALUE...]; default: every registered one.",
)
@click.option(
    "--set", "overrides", multiple=True, help="Config overrides KEY=VALUE (all contenders)."
)
@click.option("--sweep", is_flag=True, help="Also train the SWEEPS coefficient values.")
@click.option("--ce/--no-ce", default=True, show_default=True, help="Measure CE loss recovered.")
@click.option("--timing-rounds", default=5, show_default=True, help="0 = no step timing.")
@click.option("--timing-steps", default=10, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option(
    "--seed", default=0, show_default=True, help="Init seed of every contender, and train.seed."
)
@click.option("--json-out", default=None)
@click.option("--svg-out", default=None, help="FVU-against-L0 plot of the swept contenders.")
@click.option(
    "--merge",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Train nothing: join the runs of these --json-out files (same activations) into one "
    "table, JSON and plot.",
)
def main(config, cache_dir, token_budget, epochs, eval_tokens, contenders, overrides, sweep, ce,
         timing_rounds, timing_steps, threads, seed, json_out, svg_out, merge):  # fmt: skip
    if merge:
        return write_outputs(merged(merge), json_out, svg_out)
    torch.set_num_threads(threads)
    reg = registry()
    names = parse_contenders(contenders or ",".join(reg), reg)
    names = with_sweeps(names, reg) if sweep else names
    base = base_overrides(config, cache_dir, token_budget, epochs, eval_tokens, overrides, seed)
    start = time.perf_counter()
    cfg, model, tokenizer, batches, held_out = load_model_and_activations(config, base)
    with tempfile.TemporaryDirectory(prefix="peers-") as workdir:
        setup = Setup(config, base, cfg, batches, Path(workdir), seed)
        print(
            f"{setup.steps} batches x {setup.N} = {setup.steps * setup.N:,} training tokens, "
            f"{held_out.shape[0]:,} held-out, {setup.hook} d = {setup.d}, {setup.M} latents, "
            f"k = {setup.k} (loaded in {time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        out = {
            "machine": f"cpu, {threads} threads",
            "versions": versions(),
            "config": config,
            "overrides": base,
            "hook": setup.hook,
            "d": setup.d,
            "latents": setup.M,
            "k": setup.k,
            "steps": setup.steps,
            "batch_tokens": setup.N,
            "runs": [],
        }
        lm = (model, tokenizer) if ce else None
        for name in names:
            r = run_contender(name, setup, reg, lm, held_out)
            out["runs"].append(r)
            if json_out:  # after every contender: a stopped run keeps what it measured
                out["wall_seconds"] = time.perf_counter() - start
                Path(json_out).write_text(json.dumps(out, indent=1, default=str) + "\n")
            print(
                f"{name}: FVU {r['fvu']:.4f} L0 {r['l0']:.1f} "
                f"CE rec. {r.get('splice', {}).get('ce_loss_recovered', float('nan')):.4f} "
                f"{r['train_seconds']:.0f} s (conversion err {r['conversion_err']})",
                flush=True,
            )
        attach_step_ratios(out, names, setup, reg, timing_rounds, timing_steps)
    out["wall_seconds"] = time.perf_counter() - start
    write_outputs(out, json_out, svg_out)


def merged(paths: tuple[str, ...]) -> dict:
    """The runs of several ``--json-out`` files as one output; they must share the activation
    set (config, hook, latents, steps, batch size), and a contender run twice keeps its last."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    same = ("config", "hook", "d", "latents", "steps", "batch_tokens")
    for path, doc in zip(paths[1:], docs[1:]):
        differ = [key for key in same if doc[key] != docs[0][key]]
        if differ:
            raise click.UsageError(
                f"{path}: {differ} differ from {paths[0]}'s; not one activation set"
            )
    runs = {r["contender"]: r for doc in docs for r in doc["runs"]}
    return {
        **docs[0],
        "runs": list(runs.values()),
        # a merged file lists its own sources, so merging it again keeps them
        "merged_from": [
            src for p, doc in zip(paths, docs) for src in doc.get("merged_from", [str(p)])
        ],
        "wall_seconds": sum(doc["wall_seconds"] for doc in docs),
    }


def write_outputs(out: dict, json_out, svg_out) -> None:
    print()
    print(markdown_table(out))
    print(f"total wall {out['wall_seconds']:.0f} s")
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    if svg_out:
        series = frontier_series(out["runs"])
        title = f"held-out FVU against L0: {out['config']} {out['hook']}, {out['steps']} steps"
        Path(svg_out).write_text(frontier_svg(series, title, "L0 (log scale)", "held-out FVU"))


if __name__ == "__main__":
    main()
