"""The SAE under analysis: where it is, which model and hook point it reads, which data
describes it, and its cached feature statistics.

    target = open_target("checkpoints/demo")          # a run folder with one SAE, or an SAE folder
    stats = cached_feature_stats(target, StatsSettings(tokens=500_000))

The SAE may be ours, SAELens's or sparsify's (``sae.formats``), local or on the hub. The
model, hook and data come from the run's ``config.yaml`` when one of our SAEs sits in a run
folder (``<run>/<hook>/`` or ``<run>/<hook>/<variant>/``), else from what the SAE's files
say (model, hook point, dataset, context length); ``--set`` overrides change either. An
SAE whose width does not match its hook is refused before any slow work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Generator, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.activations.hooks import ActivationCapture, resolve_hook
from sae.activations.stream import contexts_for
from sae.analysis.feature_stats import (
    FeatureStats,
    StatsSettings,
    distinct_tokens,
    feature_stats_steps,
    load_feature_stats,
    read_stats_header,
    read_stats_info,
    read_top_token_ids,
    run_steps,
    save_feature_stats,
    token_decoder,
    top_tokens,
)
from sae.analysis.logit_effects import logit_effects, nearest_features
from sae.architectures import SparseAutoencoder
from sae.architectures.base import CONFIG_FILE
from sae.config import RunConfig
from sae.data.text import context_bos_id
from sae.errors import ConfigError
from sae.formats import StoredSAE, build_sae, find_sae_folder, parse_dtype, read_sae
from sae.formats.hook_names import to_ours
from sae.formats.run_config import analysis_config
from sae.models.loading import load_model

STATS_FOLDER = "features"
# Tokens scanned for the top tokens beside listed feature ids when the SAE has no cached
# statistics: a first look that takes a minute or two on a laptop, not a full scan.
TOP_TOKENS_SCAN = 2**17


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
    weights: Path  # the SAE's weights file (identifies cached statistics)
    format: str  # the format its files are in (sae.formats.FORMATS)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, acts: torch.Tensor) -> torch.Tensor:
        """Latents [..., M] of hook activations [..., d] (any float dtype)."""
        flat = acts.reshape(-1, acts.shape[-1]).to(self.sae.W_dec.dtype)
        return self.sae.encode(flat).view(*acts.shape[:-1], -1)


def open_target(
    path: str | Path,
    overrides: Iterable[str] = (),
    hook: str | None = None,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    sae_dtype: str = "float32",
    override_hook: bool = False,
    log: Callable[[str], None] | None = None,
) -> Target:
    """Load the SAE at ``path`` (an SAE folder in any format, a run folder holding one, or a
    hub id with a subfolder) with its model, checked against its hook.

    hook: the hook point, if the SAE's files do not name one; one that contradicts the
    hook the files name is refused unless ``override_hook``.
    model, tokenizer: an already loaded model to use instead of loading the config's.
    sae_dtype: what the SAE computes in (float32, bfloat16, float16, float64).
    log: given, told which SAE was opened and which hook of which model it reads.
    """
    dtype = parse_dtype(sae_dtype)
    stored = read_sae(find_sae_folder(path))
    cfg = analysis_config(stored, overrides)
    hook = _hook_point(stored, hook, override_hook)
    if model is None:
        model, tokenizer = load_model(cfg.model)
    sae = build_sae(stored, device=next(model.parameters()).device, dtype=dtype)
    width = _hook_width(model, tokenizer, hook)
    if width != sae.d_in:
        raise ConfigError(
            f"SAE {str(stored.folder)!r} takes inputs of width {sae.d_in}, but {hook} of "
            f"{cfg.model.name_or_path} has width {width}; is it the SAE of another model or hook?"
        )
    target = Target(
        sae=sae,
        folder=stored.folder,
        hook=hook,
        cfg=cfg,
        model=model,
        tokenizer=tokenizer,
        weights=stored.weights,
        format=stored.format,
    )
    if log is not None:
        log(
            f"SAE {target.folder} ({target.format}) at {target.hook} of {target.cfg.model.name_or_path}"
        )
    return target


def _hook_point(stored: StoredSAE, hook: str | None, override_hook: bool = False) -> str:
    """The hook point the SAE ``stored`` is read at: ``hook`` (``--hook``, in our naming or
    SAELens's or sparsify's), else the one its files name. A ``hook`` that contradicts the
    files is refused unless ``override_hook``, and so is having none at all."""
    hook = (
        (to_ours(hook) or hook) if hook else stored.hook
    )  # --hook may be SAELens's or sparsify's name
    if hook != stored.hook and stored.hook and not override_hook:
        raise ConfigError(
            f"--hook: {hook!r} contradicts the SAE's own hook point {stored.hook!r} "
            f"({stored.folder / CONFIG_FILE}); drop --hook, or add --override-hook to read {hook} anyway"
        )
    if not hook:
        theirs = (stored.metadata.get("source") or {}).get("hook_name")
        said = (
            f"names the hook point {theirs!r}, which has no equivalent here"
            if theirs
            else "names no hook point (metadata.hook_name)"
        )
        raise ConfigError(
            f"{stored.folder / CONFIG_FILE}: {said}; pass --hook, e.g. --hook layers.12"
        )
    return hook


def _hook_width(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, hook: str) -> int:
    """The width d of the model's activations at ``hook``: the last dimension of the
    [1, 2, d] activations of a two-token probe (the context start token twice)."""
    device = next(model.parameters()).device
    point = resolve_hook(model, hook)
    bos = context_bos_id(tokenizer)
    return (
        ActivationCapture(model, [point])
        .run(input_ids=torch.tensor([[bos, bos]], device=device))[hook]
        .shape[-1]
    )


def open_target_with_stats(
    path: str | Path,
    settings: StatsSettings,
    overrides: Iterable[str] = (),
    hook: str | None = None,
    *,
    sae_dtype: str = "float32",
    override_hook: bool = False,
    cache_dir: Path | None = None,
    recompute: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[Target, FeatureStats]:
    """``open_target`` (saying which hook it reads), then its ``cached_feature_stats``.
    A ``cache_dir`` that is a file is refused before the model loads."""
    if cache_dir is not None and cache_dir.exists() and not cache_dir.is_dir():
        raise ConfigError(f"--cache-dir: {str(cache_dir)!r} is a file, not a folder")
    target = open_target(
        path, overrides, hook, sae_dtype=sae_dtype, override_hook=override_hook, log=log
    )
    return target, cached_feature_stats(target, settings, cache_dir, recompute, log=log)


def stats_identity(target: Target, settings: StatsSettings) -> dict:
    """Everything that decides a statistics file's content."""
    st = target.weights.stat()
    d = target.cfg.data
    return {
        "sae": {
            "folder": str(target.folder.resolve()),
            "weights_bytes": st.st_size,
            "weights_mtime_ns": st.st_mtime_ns,
            "cfg": (target.folder / CONFIG_FILE).read_text(),
        },
        "model": target.cfg.model.name_or_path,
        "hook": target.hook,
        "data": {
            "dataset": d.dataset,
            "subset": d.subset,
            "split": d.split,
            "text_column": d.text_column,
            "context_tokens": d.context_tokens,
        },
        "exclude_special_tokens": True,
        "settings": asdict(settings),
    }


def stats_path(
    target: Target, settings: StatsSettings, cache_dir: Path | None = None, whole_data: bool = False
) -> Path:
    """Where the statistics for these settings are cached: one file per identity, in
    ``<sae folder>/features/`` unless ``cache_dir`` says otherwise.

    whole_data: the file of a scan that read all of the data (it ran out before
    ``settings.tokens``), keyed without the token count: any request for at least as
    many tokens would scan the same data to the same statistics.
    """
    identity = stats_identity(target, settings)
    if whole_data:
        identity = _but_tokens(identity)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return (
        Path(cache_dir or target.folder / STATS_FOLDER)
        / f"stats-{'all-' * whole_data}{digest[:16]}.safetensors"
    )


def _but_tokens(identity) -> dict | None:
    """An identity with its token count blanked, to compare everything else (None for
    anything that is not an identity)."""
    if not isinstance(identity, dict) or not isinstance(identity.get("settings"), dict):
        return None
    return {**identity, "settings": {**identity["settings"], "tokens": None}}


def _but_settings(identity) -> dict | None:
    """An identity with its settings blanked: the same SAE, model, hook and data."""
    return {**identity, "settings": None} if isinstance(identity, dict) else None


def find_cached_stats(
    target: Target, settings: StatsSettings, cache_dir: Path | None = None
) -> Path | None:
    """A valid cached statistics file for these settings: the one scanned with exactly
    them, else a scan of the whole data with the same settings but ``tokens``, if they
    ask for at least the tokens it found (it holds what a new scan would find)."""
    identity = stats_identity(target, settings)
    path = stats_path(target, settings, cache_dir)
    if path.is_file() and read_stats_info(path).get("identity") == identity:
        return path
    whole = stats_path(target, settings, cache_dir, whole_data=True)
    if not whole.is_file():
        return None
    meta = read_stats_header(whole)
    info = json.loads(meta["info"])
    same = _but_tokens(info.get("identity")) == _but_tokens(identity)
    return (
        whole if same and info.get("exhausted") and settings.tokens >= int(meta["tokens"]) else None
    )


def cached_feature_stats_steps(
    target: Target,
    settings: StatsSettings = StatsSettings(),
    cache_dir: Path | None = None,
    recompute: bool = False,
    progress: bool = True,
    log=print,
) -> Generator[int, None, FeatureStats]:
    """Feature statistics, logit effects and nearest features of the target's SAE: read
    from the cache when present and valid (``find_cached_stats``: a scan that read all
    of the data serves any larger request), else computed over the config's data
    (``data.dataset``, ``data.split``) and cached.

    A generator, one model batch a step: it yields the tokens scanned so far (nothing when
    the cache answers) and returns the statistics. ``cached_feature_stats`` takes the same
    arguments and returns them at once."""
    d = target.cfg.data
    path = None if recompute else find_cached_stats(target, settings, cache_dir)
    if path is not None:
        stats = load_feature_stats(path)
        whole = (
            f"; all of {d.dataset} [{d.split}] is {stats.tokens:,} tokens"
            if stats.info.get("exhausted")
            else ""
        )
        log(f"feature statistics: {path} (cached){whole}")
        return stats
    # More contexts than the budget needs: the pass stops at settings.tokens non-special tokens.
    data_cfg = replace(
        target.cfg, data=replace(d, token_budget=2 * settings.tokens + d.context_tokens)
    )
    contexts = contexts_for(data_cfg, target.tokenizer)
    log(
        f"feature statistics: scanning up to {settings.tokens:,} tokens of {d.dataset} [{d.split}] at {target.hook}"
    )
    stats = yield from feature_stats_steps(
        target.model,
        target.tokenizer,
        target.sae,
        target.hook,
        contexts,
        settings,
        info={"identity": stats_identity(target, settings)},
        progress=progress,
    )
    budget_contexts = -(-data_cfg.data.token_budget // d.context_tokens)
    _finish_and_cache(target, stats, settings, cache_dir, budget_contexts, progress, log)
    return stats


def _finish_and_cache(
    target: Target,
    stats: FeatureStats,
    settings: StatsSettings,
    cache_dir: Path | None,
    budget_contexts: int,
    progress: bool,
    log: Callable[[str], None],
) -> None:
    """Add logit effects and nearest features to a fresh scan and cache it."""
    # The scan covers the whole data if it ran out before the context budget did (the
    # budget, not the data, can also end it); then larger requests can reuse it.
    stats.info["exhausted"] = stats.info["data_ran_out"] and stats.contexts < budget_contexts
    stats.logits, rule = logit_effects(target.model, target.sae.W_dec.detach(), progress=progress)
    stats.info["logit_rule"] = rule
    stats.nearest = nearest_features(target.sae.W_dec.detach(), progress=progress)
    path = stats_path(target, settings, cache_dir, whole_data=stats.info["exhausted"])
    save_feature_stats(stats, path)
    if stats.info["data_ran_out"]:
        log(
            f"feature statistics: the data ran out after {stats.tokens:,} tokens (asked for {settings.tokens:,}); "
            f"cached in {path}"
        )
    else:
        log(f"feature statistics: {stats.tokens:,} tokens scanned, cached in {path}")


def cached_feature_stats(*args: Any, **kwargs: Any) -> FeatureStats:
    """``cached_feature_stats_steps`` (the same arguments) run to its end: the statistics at once."""
    return run_steps(cached_feature_stats_steps(*args, **kwargs))


def any_cached_stats(target: Target, cache_dir: Path | None = None) -> Path | None:
    """The cached statistics file of this SAE, model, hook and data with the most tokens,
    whatever settings it was scanned with: for uses content with any scan (top tokens
    beside feature ids), where a fresh scan would cost more than it adds."""
    want = _but_settings(stats_identity(target, StatsSettings()))
    best = None
    for path in sorted(Path(cache_dir or target.folder / STATS_FOLDER).glob("stats-*.safetensors")):
        try:
            meta = read_stats_header(path)
        except ConfigError:  # a broken or foreign file is not a cache hit, nor an error here
            continue
        if _but_settings(json.loads(meta["info"]).get("identity")) == want:
            if best is None or int(meta["tokens"]) > best[0]:
                best = (int(meta["tokens"]), path)
    return None if best is None else best[1]


def feature_top_tokens(
    target: Target,
    features: Iterable[int],
    n: int = 3,
    tokens: int = TOP_TOKENS_SCAN,
    progress: bool = True,
    log=print,
) -> dict[int, list[str]]:
    """Each feature's first ``n`` distinct top-activating tokens (``top_tokens``), from any
    cached scan of the SAE (``any_cached_stats``), else from a scan of ``tokens`` tokens,
    which is cached for the next time."""
    decode = token_decoder(target.tokenizer)
    path = any_cached_stats(target)
    if path is None:
        stats = cached_feature_stats(
            target, StatsSettings(tokens=tokens), progress=progress, log=log
        )
        return {f: top_tokens(stats, f, decode, n) for f in features}
    log(f"feature statistics for top tokens: {path} (cached)")
    return {
        f: distinct_tokens(ids, decode, n) for f, ids in read_top_token_ids(path, features).items()
    }


def listed_top_tokens(
    target: Target,
    features: Iterable[int],
    scan: int | None = TOP_TOKENS_SCAN,
    log: Callable[[str], None] = print,
) -> dict[int, list[str]] | None:
    """The top tokens of the features a listing shows (``feature_top_tokens``, each feature
    looked up once), or None when ``scan`` is None: a listing of bare feature ids.
    scan: tokens to scan when the SAE has no cached statistics (the scan is cached)."""
    if scan is None:
        return None
    return feature_top_tokens(target, list(dict.fromkeys(features)), tokens=scan, log=log)


def with_top_tokens(row: dict, tokens: dict[int, list[str]] | None) -> dict:
    """A listed feature's row (it holds ``"feature"``) with its top tokens added as
    ``"top_tokens"``; the row itself when ``tokens`` is None (``listed_top_tokens``)."""
    return row if tokens is None else {**row, "top_tokens": tokens[row["feature"]]}
