"""The SAE under analysis: where it is, which model and hook point it reads, which data
describes it, and its cached feature statistics.

    target = open_target("checkpoints/demo")          # a run folder with one SAE, or an SAE folder
    stats = cached_feature_stats(target, StatsSettings(tokens=500_000))

The model, hook and data come from the run's ``config.yaml`` when the SAE sits in a run
folder (``<run>/<hook>/`` or ``<run>/<hook>/<variant>/``), else from the SAE's cfg.json
metadata (``model_name``, ``hook_name``, ``dataset_path``, ``context_size``); ``--set``
overrides change either. An SAE whose width does not match its hook is refused before
any slow work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.activations import contexts_for
from sae.architectures import SparseAutoencoder, load_sae
from sae.architectures.base import CONFIG_FILE, WEIGHTS_FILE
from sae.config import RunConfig, load_config
from sae.data import context_bos_id
from sae.errors import ConfigError
from sae.feature_stats import (FeatureStats, StatsSettings, compute_feature_stats, load_feature_stats,
                               read_stats_info, save_feature_stats)
from sae.hooks import ActivationCapture, resolve_hook
from sae.logit_effects import logit_effects, nearest_features
from sae.models import load_model

STATS_FOLDER = "features"


@dataclass
class Target:
    """An SAE ready to analyse: the SAE (on the model's device), its folder, hook point,
    the model and tokenizer, and the config whose model and data sections apply."""

    sae: SparseAutoencoder
    folder: Path
    hook: str
    cfg: RunConfig
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, acts: torch.Tensor) -> torch.Tensor:
        """Latents [..., M] of hook activations [..., d] (any float dtype)."""
        flat = acts.reshape(-1, acts.shape[-1]).to(self.sae.W_dec.dtype)
        return self.sae.encode(flat).view(*acts.shape[:-1], -1)



def find_sae_folder(path: Path) -> Path:
    """``path`` itself if it holds an SAE (cfg.json), else the one SAE in the run folder ``path``."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"SAE: {str(path)!r} does not exist; give an SAE folder (with {CONFIG_FILE}) or a run folder")
    found = sorted(p.parent for p in path.rglob(CONFIG_FILE) if "state" not in p.relative_to(path).parts)
    if not found:
        raise ConfigError(f"SAE: no SAE in {str(path)!r}; expected {CONFIG_FILE} and {WEIGHTS_FILE} in it "
                          "or in a sub-folder")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(path)) for p in found)
        raise ConfigError(f"SAE: {str(path)!r} holds {len(found)} SAEs ({names}); name one, e.g. "
                          f"{found[0]}")
    return found[0]


def run_config_of(folder: Path) -> Path | None:
    """The config.yaml of the run an SAE folder belongs to, if any (one or two levels up)."""
    for up in (folder.parent, folder.parent.parent):
        if (up / "config.yaml").is_file():
            return up / "config.yaml"
    return None


def analysis_config(folder: Path, overrides: Iterable[str] = ()) -> tuple[RunConfig, dict]:
    """(config, cfg.json metadata) for the SAE in ``folder``."""
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text()).get("metadata", {}) or {}
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{folder / CONFIG_FILE}: cannot read ({e})") from None
    run_config = run_config_of(folder)
    if run_config is not None:
        return load_config(run_config, overrides), meta
    base = []
    if meta.get("model_name"):
        base.append(f"model.name_or_path={meta['model_name']}")
    if meta.get("dataset_path"):
        base.append(f"data.dataset={meta['dataset_path']}")
    if meta.get("context_size"):
        base.append(f"data.context_tokens={int(meta['context_size'])}")
    return load_config(None, [*base, *overrides]), meta


def open_target(path: str | Path, overrides: Iterable[str] = (), hook: str | None = None,
                model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> Target:
    """Load the SAE at ``path`` (SAE or run folder) with its model, checked against its hook.

    hook: the hook point, if the SAE's metadata does not name it (or to override it).
    model, tokenizer: an already loaded model to use instead of loading the config's.
    """
    folder = find_sae_folder(Path(path))
    cfg, meta = analysis_config(folder, overrides)
    hook = hook or meta.get("hook_name")
    if not hook:
        raise ConfigError(f"{folder / CONFIG_FILE}: names no hook point (metadata.hook_name); pass --hook, "
                          "e.g. --hook layers.12")
    if model is None:
        model, tokenizer = load_model(cfg.model)
    device = next(model.parameters()).device
    sae = load_sae(folder, device=device)
    point = resolve_hook(model, hook)
    bos = context_bos_id(tokenizer)
    width = ActivationCapture(model, [point]).run(input_ids=torch.tensor([[bos, bos]], device=device))[hook].shape[-1]
    if width != sae.cfg.d_in:
        raise ConfigError(f"SAE {str(folder)!r} takes inputs of width {sae.cfg.d_in}, but {hook} of "
                          f"{cfg.model.name_or_path} has width {width}; is it the SAE of another model or hook?")
    return Target(sae=sae, folder=folder, hook=hook, cfg=cfg, model=model, tokenizer=tokenizer)


def stats_identity(target: Target, settings: StatsSettings) -> dict:
    """Everything that decides a statistics file's content."""
    weights = target.folder / WEIGHTS_FILE
    st = weights.stat()
    d = target.cfg.data
    return {"sae": {"folder": str(target.folder.resolve()), "weights_bytes": st.st_size,
                    "weights_mtime_ns": st.st_mtime_ns, "cfg": (target.folder / CONFIG_FILE).read_text()},
            "model": target.cfg.model.name_or_path, "hook": target.hook,
            "data": {"dataset": d.dataset, "subset": d.subset, "split": d.split, "text_column": d.text_column,
                     "context_tokens": d.context_tokens},
            "exclude_special_tokens": True, "settings": asdict(settings)}


def stats_path(target: Target, settings: StatsSettings, cache_dir: Path | None = None) -> Path:
    """Where the statistics for these settings are cached: one file per identity, in
    ``<sae folder>/features/`` unless ``cache_dir`` says otherwise."""
    digest = hashlib.sha256(json.dumps(stats_identity(target, settings), sort_keys=True).encode()).hexdigest()
    return Path(cache_dir or target.folder / STATS_FOLDER) / f"stats-{digest[:16]}.safetensors"


def cached_feature_stats(target: Target, settings: StatsSettings = StatsSettings(), cache_dir: Path | None = None,
                         recompute: bool = False, progress: bool = True, log=print) -> FeatureStats:
    """Feature statistics, logit effects and nearest features of the target's SAE: read
    from the cache when present and valid, else computed over the config's data
    (``data.dataset``, ``data.split``) and cached."""
    path = stats_path(target, settings, cache_dir)
    identity = stats_identity(target, settings)
    if path.is_file() and not recompute and read_stats_info(path).get("identity") == identity:
        log(f"feature statistics: {path} (cached)")
        return load_feature_stats(path)
    d = target.cfg.data
    # More contexts than the budget needs: the pass stops at settings.tokens non-special tokens.
    data_cfg = replace(target.cfg, data=replace(d, token_budget=2 * settings.tokens + d.context_tokens))
    contexts = contexts_for(data_cfg, target.tokenizer)
    log(f"feature statistics: scanning up to {settings.tokens:,} tokens of {d.dataset} [{d.split}] at {target.hook}")
    stats = compute_feature_stats(target.model, target.tokenizer, target.sae, target.hook, contexts, settings,
                                  info={"identity": identity}, progress=progress)
    stats.logits, rule = logit_effects(target.model, target.sae.W_dec.detach(), progress=progress)
    stats.info["logit_rule"] = rule
    stats.nearest = nearest_features(target.sae.W_dec.detach(), progress=progress)
    save_feature_stats(stats, path)
    log(f"feature statistics: {stats.tokens:,} tokens scanned, cached in {path}")
    return stats
