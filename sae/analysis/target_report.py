"""The HTML report of an SAE under analysis: what ``build_report`` is given for a
``Target``, namely the header's facts about the SAE, the run's summary, contrast columns
from two prompt sets, and which features get a card.

    output = report_output("checkpoints/demo", None)          # checked before the scan
    target, stats = open_target_with_stats("checkpoints/demo", StatsSettings())
    info, seconds = write_target_report(target, stats, output, prompts=(raised, not_raised))
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from sae.analysis.feature_search import contrast_search
from sae.analysis.feature_stats import FeatureStats
from sae.analysis.report import ReportInfo, build_report, run_summary
from sae.analysis.target import Target
from sae.atomic_io import check_output_path
from sae.data.prompt_format import PLAIN, PromptFormat
from sae.formats import find_sae_folder
from sae.formats.run_config import run_config_of

# Facts of the SAE's config shown in the header when its architecture has them.
OPTIONAL_CONFIG_FIELDS = ("k",)


def report_output(sae_path: str | Path, output: Path | None = None) -> Path:
    """Where the report of the SAE at ``sae_path`` goes: ``output``, else report.html in the
    SAE's folder; checked now, since the scan before it takes minutes."""
    output = output or find_sae_folder(sae_path) / "report.html"
    check_output_path(output, "--output")
    return output


def sae_info(target: Target) -> dict:
    """The report header's facts about the SAE: where it is and in which format, what it
    reads, its architecture and shape (and the config fields of ``OPTIONAL_CONFIG_FIELDS``
    that its architecture has), and the data it was scanned on."""
    params = asdict(target.sae.cfg)
    return {
        "SAE": str(target.folder),
        "format": target.format,
        "model": target.cfg.model.name_or_path,
        "hook": target.hook,
        "architecture": target.sae.architecture,
        "features": params["num_latents"],
        "d_in": target.sae.d_in,
        **{key: params[key] for key in OPTIONAL_CONFIG_FIELDS if key in params},
        "data": f"{target.cfg.data.dataset} [{target.cfg.data.split}]",
    }


def report_title(target: Target) -> str:
    """The SAE named by its path below its run's parent folder (the run's name and the SAE's
    folder in it), or by its folder's name outside a run."""
    run_config = run_config_of(target.folder)
    name = (
        target.folder.name
        if run_config is None
        else str(target.folder.relative_to(run_config.parent.parent))
    )
    return f"SAE features: {name} at {target.hook}"


def card_features(
    stats: FeatureStats, cards: int | None, ranked: Sequence[int] = ()
) -> list[int] | None:
    """The features given a card: the ``cards`` densest and the first ``cards`` of ``ranked``
    (a contrast's ranking), sorted; None (every feature) when ``cards`` is None."""
    if cards is None:
        return None
    dense = stats.density.argsort(descending=True).tolist()
    return sorted(set(ranked[:cards]) | set(dense[:cards]))


def write_target_report(
    target: Target,
    stats: FeatureStats,
    output: Path,
    *,
    prompts: tuple[Sequence[str], Sequence[str]] | None = None,
    prompt_names: tuple[str, str] | None = None,
    cards: int | None = None,
    examples: int = 10,
    samples_per_bin: int | None = None,
    fmt: PromptFormat = PLAIN,
) -> tuple[ReportInfo, float]:
    """Write the report of ``target``'s features (``stats``) to ``output``: (what it holds,
    seconds spent building the page after the contrast search).

    prompts: target and baseline prompts whose ``contrast_search`` adds effect size and
    AUROC columns to the index, their help naming the sets ``prompt_names`` (e.g. the files);
    cards: give cards only to this many features (``card_features``), default all;
    examples, samples_per_bin: top examples and quantile-bin samples on a card.
    """
    columns, column_help, ranked = {}, {}, []
    if prompts is not None:
        result = contrast_search(target, *prompts, fmt=fmt)
        columns = {"effect": result.effect, "AUROC": result.auroc}
        a, b = prompt_names or ("target", "baseline")
        column_help = {
            "effect": f"contrast effect size (Cohen's d) of {a} vs {b}",
            "AUROC": f"AUROC of the feature as a classifier of {a} vs {b}",
        }
        ranked = result.ranking("effect")
    card_ids = card_features(stats, cards, ranked)
    info = sae_info(target)
    start = time.perf_counter()
    built = build_report(
        stats,
        target.tokenizer,
        output,
        title=report_title(target),
        sae_info=info,
        summary=run_summary(target.folder, run_config_of(target.folder)),
        columns=columns or None,
        column_help=column_help or None,
        cards=card_ids,
        examples=examples,
        samples_per_bin=samples_per_bin,
    )
    return built, time.perf_counter() - start
