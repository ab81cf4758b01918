"""Held-out metrics of SAEs: FVU, L0, dead and dense fractions, and the splice metrics
(docs/design.md §3), for a run that just trained them or for saved SAEs of any format."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.activations.harvest import Harvester
from sae.activations.stream import contexts_for, make_harvester
from sae.architectures import SparseAutoencoder
from sae.architectures.base import CONFIG_FILE
from sae.atomic_io import write_text_atomic
from sae.config import RunConfig, config_from_dict, to_dict
from sae.data.text import describe_split
from sae.errors import ConfigError
from sae.evaluation.metrics import Metrics
from sae.evaluation.splice import splice_metrics
from sae.formats import NATIVE, build_sae, read_sae, sae_folders
from sae.formats.run_config import analysis_config, run_config_of
from sae.hub import resolve_sae_path
from sae.models.loading import load_model


def eval_config(cfg: RunConfig) -> RunConfig:
    """The run's config pointed at the held-out split and its token count."""
    values = to_dict(cfg)
    values["data"].update(split=cfg.data.eval_split, token_budget=cfg.data.eval_tokens)
    values["train"]["batch_tokens"] = min(cfg.train.batch_tokens, cfg.data.eval_tokens)
    values["harvest"].update(cache_dir=None, cache_epochs=1)
    return config_from_dict(values)


def evaluate_run(
    cfg: RunConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    saes: dict[str, SparseAutoencoder],
    hook_of: dict[str, str] | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Held-out metrics per SAE: FVU, L0, dead, dense, and the splice metrics.

    saes: {name: SAE}; hook_of: {name: hook point} where names are not hook points (sweeps).
    progress: bars (stderr, in tokens of the held-out text) for the pass that measures
    FVU, L0, dead and dense, then for each SAE's splice pass (three forward passes each).
    """
    hook_of = hook_of or {name: name for name in saes}
    ecfg = eval_config(cfg)
    ecfg.hooks = sorted(set(hook_of.values()), key=cfg.hooks.index)
    metrics = {name: Metrics(sae) for name, sae in saes.items()}
    # The tokens the held-out contexts hold: whole contexts, the last one may pass the budget.
    d = ecfg.data
    total = -(-d.token_budget // d.context_tokens) * d.context_tokens
    harvester = make_harvester(ecfg, model, tokenizer)
    _measure_activations(harvester, metrics, saes, hook_of, cfg, total, progress)
    results = {}
    for name, m in metrics.items():
        sae = saes[name]
        splice = splice_metrics(
            model,
            tokenizer,
            hook_of[name],
            lambda x, sae=sae: sae(x.float()),
            contexts_for(ecfg, tokenizer),
            progress=progress,
            desc=f"splice {name}",
            total=total,
        )
        results[name] = {
            **m.result(),
            "hook": hook_of[name],
            "eval_data": eval_source(cfg),
            "splice": splice,
        }
    return results


def _measure_activations(
    harvester: Harvester,
    metrics: dict[str, Metrics],
    saes: dict[str, SparseAutoencoder],
    hook_of: dict[str, str],
    cfg: RunConfig,
    total: int,
    progress: bool,
) -> None:
    """One pass over the held-out activations ({hook: [N, d]} per batch of ``harvester``),
    each SAE's ``metrics`` updated with those of its hook; an SAE whose width does not
    match its hook's is refused. progress: a bar of the ``total`` tokens read."""
    # Counted in tokens read (harvester.tokens_seen), special ones included: they are not
    # measured but cost the same forward pass. Left off the screen when done: the table follows.
    with tqdm(
        total=total,
        desc="held-out metrics",
        unit="tok",
        unit_scale=True,
        leave=False,
        disable=not progress,
    ) as bar:
        for acts in harvester:
            bar.update(harvester.tokens_seen - bar.n)
            for name, m in metrics.items():
                x = acts[hook_of[name]]
                if x.shape[1] != saes[name].d_in:
                    raise ConfigError(
                        f"{name}: the SAE takes inputs of width {saes[name].d_in}, but "
                        f"{hook_of[name]} of {cfg.model.name_or_path} has width {x.shape[1]}"
                    )
                m.update(x)
        bar.update(harvester.tokens_seen - bar.n)  # batches with every token masked yield nothing
        bar.refresh()  # the final count, whatever the refresh interval skipped


def evaluate_saved_run(
    path: str | Path, overrides: Iterable[str] = (), log: Callable[[str], None] = print
) -> dict:
    """Held-out metrics of saved SAEs, printed and written to metrics.json beside each.

    path: one of our run folders (its config.yaml gives model and data), or any SAE folder or
    run of SAELens or sparsify SAEs, local or on the hub (their files give model, data and
    hook points). overrides: ``KEY=VALUE`` changes to that config, e.g. data.eval_tokens=200000.
    """
    root = resolve_sae_path(path)
    folders = sae_folders(root) if root.is_dir() else {}
    if not folders:
        raise ConfigError(
            f"RUN_DIR: no saved SAEs in {str(path)!r} (folders with cfg.json and weights)"
        )
    stored = {
        (folder.name if name == "." else name): read_sae(folder) for name, folder in folders.items()
    }
    cfg, hook_of = evaluation_plan(stored, overrides, path)
    if cfg.data.eval_split is None:
        raise ConfigError(
            "data.eval_split: null; name the held-out split, e.g. --set data.eval_split=test"
        )
    model, tokenizer = load_model(cfg.model)
    device = next(model.parameters()).device
    saes = {name: build_sae(s, device=device) for name, s in stored.items()}
    results = evaluate_run(cfg, model, tokenizer, saes, hook_of)
    print_metrics(results, cfg, log)
    for name, r in results.items():
        write_text_atomic(stored[name].folder / "metrics.json", json.dumps(r, indent=1) + "\n")
    return results


def evaluation_plan(
    stored: dict, overrides: Iterable[str], path: str | Path
) -> tuple[RunConfig, dict[str, str]]:
    """The config (model and data) that SAEs ``stored`` ({name: StoredSAE}) are evaluated
    with, and {name: hook point}. Each SAE brings its own: its run's config.yaml, else its
    files' metadata; SAEs of different models or data (several runs) are refused."""
    configs = {name: analysis_config(s, overrides) for name, s in stored.items()}
    first = next(iter(stored))
    for name, c in configs.items():
        if (c.model, c.data) != (configs[first].model, configs[first].data):
            where = {n: run_config_of(stored[n].folder) or stored[n].folder for n in (first, name)}
            raise ConfigError(
                f"RUN_DIR: {str(path)!r} holds SAEs of different runs or data ({first}: "
                f"{where[first]}; {name}: {where[name]}); evaluate one run at a time"
            )
    missing = [name for name, s in stored.items() if not s.hook]
    if missing:
        raise ConfigError(
            f"{stored[missing[0]].folder}: names no hook point we can map; evaluate it with "
            "analyze.py features --hook ... instead"
        )
    cfg = configs[first]
    if run_config_of(stored[first].folder) is not None and stored[first].format == NATIVE:
        return cfg, {name: sae_hook(s, cfg) for name, s in stored.items()}
    hook_of = {name: s.hook for name, s in stored.items()}
    return replace(
        cfg, hooks=sorted(set(hook_of.values()), key=lambda h: (int(h.split(".")[1]), h))
    ), hook_of


def sae_hook(stored, cfg: RunConfig) -> str:
    """The hook point one of a run's SAEs was trained on (its cfg.json metadata), one of cfg.hooks."""
    if stored.hook not in cfg.hooks:
        raise ConfigError(
            f"{stored.folder / CONFIG_FILE}: metadata.hook_name {stored.hook!r} is not one of the "
            f"run's hooks ({', '.join(cfg.hooks)})"
        )
    return stored.hook


def eval_source(cfg: RunConfig) -> str:
    """The text the metrics are measured on, in words; says so when it is the training text."""
    d = cfg.data
    where = describe_split(d.dataset, d.eval_split, d.subset)
    return where + (
        " -- the training text itself (data.eval_split = data.split)"
        if d.eval_split == d.split
        else ""
    )


def print_metrics(results: dict[str, dict], cfg: RunConfig, log: Callable[[str], None]) -> None:
    """The metrics as a short table, headed by the text they were measured on."""
    kind = (
        "in-sample metrics, NOT held out,"
        if cfg.data.eval_split == cfg.data.split
        else "held-out metrics"
    )
    log(
        f"{kind} on {eval_source(cfg)}\n(CE recovered, delta LM loss and KL with the SAE spliced into the model):"
    )
    width = max(16, *(len(name) for name in results))
    log(
        f"  {'SAE':<{width}} {'FVU':>8} {'L0':>7} {'dead':>7} {'dense':>7} {'CE rec.':>8} {'dLM':>8} {'KL':>8} {'tokens':>8}"
    )
    for name, r in results.items():
        sp = r["splice"]
        log(
            f"  {name:<{width}} {r['fvu']:>8.4f} {r['l0']:>7.1f} {r['dead_fraction']:>7.1%} {r['dense_fraction']:>7.1%} "
            f"{sp['ce_loss_recovered']:>8.3f} {sp['delta_lm_loss']:>8.4f} {sp['kl']:>8.4f} {r['tokens']:>8,}"
        )
