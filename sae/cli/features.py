"""Analysis commands: what features mean (features, report) and which lie behind a
behaviour (search)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sae.cli.analyze_group import analyze
from sae.cli.common import (
    TOP_TOKENS_SCAN,
    chat_options,
    json_option,
    log,
    one_line_errors,
    show_token,
    stats_options,
    target_options,
    tokens_cell,
    top_tokens_option,
)
from sae.errors import ConfigError

# The commands import the library when they run: `analyze.py --help` needs no torch.
if TYPE_CHECKING:
    from sae.analysis.feature_stats import FeatureStats
    from sae.analysis.report import ReportInfo
    from sae.analysis.target import Target

# The orders of the feature table: the keys of sae.analysis.feature_overview.SORTS, spelled
# out so that the command line loads without torch.
SORTS = ("density", "max", "mean")


def contrast_options(target_help: str, baseline_help: str) -> Callable[[Callable], Callable]:
    """--target FILE and --baseline FILE, the two prompt sets of a contrast."""

    def add(fn: Callable) -> Callable:
        fn = click.option(
            "--baseline",
            "baseline_file",
            type=click.Path(path_type=Path),
            metavar="FILE",
            help=baseline_help,
        )(fn)
        return click.option(
            "--target",
            "target_file",
            type=click.Path(path_type=Path),
            metavar="FILE",
            help=target_help,
        )(fn)

    return add


@analyze.command()
@target_options
@stats_options
@click.option(
    "--feature",
    "-f",
    "features",
    multiple=True,
    type=int,
    metavar="N",
    help="Show feature N in full (repeatable).",
)
@click.option(
    "--sort",
    type=click.Choice(SORTS),
    default="density",
    show_default=True,
    help="Order of the feature table (without --feature).",
)
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    help="Rows of the feature table.",
)
@click.option(
    "--show-examples",
    type=click.IntRange(0),
    default=5,
    show_default=True,
    help="Top examples printed per feature with --feature (--json has them all).",
)
@json_option
@one_line_errors
def features(
    sae_path,
    hook,
    override_hook,
    overrides,
    sae_dtype,
    tokens,
    examples,
    cache_dir,
    recompute,
    features,
    sort,
    limit,
    show_examples,
    as_json,
) -> None:
    """What the SAE's features respond to: density, activations, top-activating examples
    in context, quantile-bin samples, promoted and suppressed output tokens and nearest
    features. Statistics are computed once over --tokens tokens and cached.

    \b
        python analyze.py features checkpoints/demo                 # summary + densest features
        python analyze.py features checkpoints/demo -f 93 -f 1539    # two features in full
    """
    from sae.analysis.feature_overview import feature_overview

    target, stats = _open_with_stats(
        sae_path, overrides, hook, sae_dtype, override_hook, tokens, examples, cache_dir, recompute
    )
    overview = feature_overview(target, stats, features, sort, limit)
    if as_json:
        click.echo(json.dumps(overview, indent=1))
        return
    _print_overview(overview, show_examples)


def _open_with_stats(
    sae_path: Path,
    overrides: tuple[str, ...],
    hook: str | None,
    sae_dtype: str,
    override_hook: bool,
    tokens: int,
    examples: int,
    cache_dir: Path | None,
    recompute: bool,
) -> tuple[Target, FeatureStats]:
    """The SAE's target and its feature statistics (--tokens, --examples: bad values fail
    before the model loads), for `features` and `report`."""
    from sae.analysis.feature_stats import StatsSettings
    from sae.analysis.target import open_target_with_stats

    settings = StatsSettings(tokens=tokens, top_examples=examples)
    return open_target_with_stats(
        sae_path,
        settings,
        overrides,
        hook,
        sae_dtype=sae_dtype,
        override_hook=override_hook,
        cache_dir=cache_dir,
        recompute=recompute,
        log=log,
    )


def _print_overview(overview: dict, show_examples: int) -> None:
    """`features` as text: the scan, the density histogram, then each chosen feature in
    full (its first ``show_examples`` top examples), or the table of the first ones."""
    o, hist = overview, overview["density_histogram"]
    click.echo(
        f"{o['sae']}: {o['features']:,} features at {o['hook']}; statistics over "
        f"{o['tokens']:,} tokens in {o['contexts']:,} contexts"
    )
    click.echo(f"never fired: {hist['never_fired']:,} features; log10 density histogram:")
    peak = max(hist["counts"], default=0) or 1
    for edge, count in zip(hist["edges"], hist["counts"]):
        click.echo(f"  {edge:>5.1f} {count:>8,} {'#' * round(40 * count / peak)}")
    records = o["features_shown"]
    if o["sorted_by"] is None:
        for r in records:
            click.echo("")
            _print_feature(r, show_examples)
        return
    click.echo(f"\nfeatures by {o['sorted_by']} (top {len(records)}; -f N shows one in full):")
    click.echo(f"  {'feature':>8} {'density':>9} {'max':>8} {'mean':>8}  top example")
    for r in records:
        top = _example_text(r["top_examples"][0]) if r["top_examples"] else "(never fired)"
        click.echo(
            f"  {r['feature']:>8} {r['density']:>9.3%} {r['max']:>8.3f} {r['mean']:>8.3f}  {top}"
        )


def _example_text(ex: dict) -> str:
    """The example's context on one line, its token in [[ ]]."""
    return "".join(
        f"[[{show_token(t)}]]" if i == ex["centre"] else show_token(t)
        for i, t in enumerate(ex["tokens"])
    )


def _example_line(ex: dict) -> str:
    return f"{ex['activation']:>9.3f}  {_example_text(ex)}"


def _print_feature(r: dict, show_examples: int) -> None:
    """One feature's record in full, with its first ``show_examples`` top examples."""
    click.echo(
        f"feature {r['feature']}: fires on {r['density']:.3%} of tokens ({r['fires']:,}), "
        f"max {r['max']:.3f}, mean when firing {r['mean']:.3f}"
    )
    for key in ("promoted", "suppressed"):
        if key in r:
            click.echo(
                f"  {key + ':':<12}"
                + "  ".join(f"{show_token(t['token'])!r} {t['logit']:+.3f}" for t in r[key])
            )
    if "nearest" in r:
        click.echo(
            f"  {'nearest:':<12}"
            + "  ".join(f"{n['feature']} ({n['cosine']:.2f})" for n in r["nearest"])
        )
    click.echo("  top examples (activation, [[token]] in context):")
    for ex in r["top_examples"][:show_examples]:
        click.echo("  " + _example_line(ex))
    bins = r["quantile_bins"]
    for b, group in enumerate(bins):
        if group:
            click.echo(
                f"  quantile bin {b + 1} of {len(bins)} ({b * 100 // len(bins)}-{(b + 1) * 100 // len(bins)}% "
                "of firings by activation):"
            )
            for ex in group:
                click.echo("  " + _example_line(ex))


@analyze.command()
@target_options
@contrast_options(
    "Prompts showing the behaviour (one per line, or .jsonl with a text field).",
    "Prompts without it, as alike as possible otherwise.",
)
@click.option(
    "--text", default=None, help="Instead of a contrast: the features that fire on this text."
)
@click.option(
    "--focus", default=None, help="With --text: rank by the tokens covering this substring only."
)
@click.option(
    "--rank",
    type=click.Choice(["effect", "auroc", "diff"]),
    default="effect",
    show_default=True,
    help="Contrast ranking: effect size (Cohen's d), AUROC, or difference of means.",
)
@click.option(
    "--reduce",
    type=click.Choice(["max", "mean"]),
    default="max",
    show_default=True,
    help="A prompt's score per feature: max or mean over its tokens.",
)
@click.option(
    "--top", type=click.IntRange(1), default=20, show_default=True, help="Features listed."
)
@chat_options(reply=True)
@top_tokens_option
@json_option
@one_line_errors
def search(
    sae_path,
    hook,
    override_hook,
    overrides,
    sae_dtype,
    target_file,
    baseline_file,
    text,
    focus,
    rank,
    reduce,
    top,
    chat,
    system,
    chat_user,
    no_top_tokens,
    as_json,
) -> None:
    """Find features: those that separate --target prompts from --baseline prompts
    (contrast search), or those that fire on --text.

    \b
        python analyze.py search checkpoints/demo --target configs/prompts/demo_raised.txt \\
            --baseline configs/prompts/demo_not_raised.txt
        python analyze.py search checkpoints/demo --text "a KeyError is raised" --focus raised
    """

    from sae.analysis.feature_search import read_prompts
    from sae.analysis.search_results import contrast_listing, text_listing
    from sae.analysis.target import open_target
    from sae.data.prompt_format import PromptFormat

    contrast_mode = _is_contrast_search(target_file, baseline_file, text, focus)
    if contrast_mode:
        a, b = read_prompts(target_file, "--target"), read_prompts(baseline_file, "--baseline")
    fmt = PromptFormat(chat=chat, system=system, user=chat_user)
    target = open_target(
        sae_path, overrides, hook, sae_dtype=sae_dtype, override_hook=override_hook, log=log
    )
    scan = None if no_top_tokens else TOP_TOKENS_SCAN
    if contrast_mode:
        listing = contrast_listing(
            target, a, b, reduce=reduce, rank=rank, top=top, fmt=fmt, top_tokens=scan, log=log
        )
    else:
        listing = text_listing(target, text, focus, top, fmt, top_tokens=scan, log=log)
    if as_json:
        click.echo(json.dumps(listing, indent=1))
    elif contrast_mode:
        _print_contrast(listing, top_tokens=not no_top_tokens)
    else:
        _print_text_hits(listing, top_tokens=not no_top_tokens)


def _is_contrast_search(
    target_file: Path | None, baseline_file: Path | None, text: str | None, focus: str | None
) -> bool:
    """Whether `search` is a contrast (--target and --baseline) rather than --text, after
    checking the options ask for exactly one of the two, and --focus only with --text."""
    contrast_mode = target_file is not None or baseline_file is not None
    if contrast_mode == (text is not None):
        raise ConfigError(
            "search: give either --target FILE and --baseline FILE (contrast), or --text"
        )
    if contrast_mode and (target_file is None or baseline_file is None):
        raise ConfigError("search: a contrast needs both --target FILE and --baseline FILE")
    if focus is not None and text is None:
        raise ConfigError("--focus: applies to --text only")
    return contrast_mode


def _print_contrast(listing: dict, top_tokens: bool) -> None:
    """`search` of a contrast as text: the sets, then each side's features (with top tokens)."""
    c = listing
    click.echo(
        f"contrast: {c['target_prompts']} target prompts ({c['target_tokens']:,} tokens) vs "
        f"{c['baseline_prompts']} baseline prompts ({c['baseline_tokens']:,} tokens); a prompt's score is "
        f"the {c['reduce']} activation over its tokens"
    )
    for side in ("target", "baseline"):
        click.echo(f"\nhigher in {side}, by {c['rank']}:")
        click.echo(
            f"  {'feature':>8} {'effect':>7} {'AUROC':>6} {'mean tgt':>9} {'mean base':>9} "
            f"{'fires tgt':>9} {'fires base':>10}" + ("  top tokens" if top_tokens else "")
        )
        for r in c[f"higher_in_{side}"]:
            click.echo(
                f"  {r['feature']:>8} {r['effect']:>7.2f} {r['auroc']:>6.3f} {r['mean_target']:>9.3f} "
                f"{r['mean_baseline']:>9.3f} {r['fire_target']:>9.0%} {r['fire_baseline']:>10.0%}"
                f"{tokens_cell(r)}"
            )


def _print_text_hits(listing: dict, top_tokens: bool) -> None:
    """`search --text` as text: the ranking (with top tokens), then each token's strongest features."""
    tokens, focus = listing["tokens"], listing["focus"]
    focus_text = "".join(tokens[i] for i in focus)
    click.echo(
        f"features firing on {show_token(focus_text)!r} (max activation over {len(focus)} tokens):"
    )
    if top_tokens:
        click.echo(f"  {'feature':>8} {'max act':>9}  top tokens")
    for r in listing["ranking"]:
        click.echo(f"  {r['feature']:>8} {r['activation']:>9.3f}{tokens_cell(r)}")
    click.echo("per token (strongest features):")
    for i, (t, row) in enumerate(zip(tokens, listing["per_token"])):
        mark = "*" if i in focus else " "
        feats = "  ".join(f"{c['feature']}:{c['activation']:.2f}" for c in row[:6]) or "-"
        click.echo(f" {mark}{show_token(t)!r:>16} {feats}")


@analyze.command()
@target_options
@stats_options
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="HTML file to write (default: SAE/report.html).",
)
@contrast_options(
    "Add contrast columns (effect size, AUROC) against --baseline to the feature index.",
    "Baseline prompts for the contrast columns.",
)
@click.option(
    "--cards",
    type=click.IntRange(0),
    default=None,
    help="Give cards only to this many features (the densest ones, plus the top of the contrast); "
    "default: every feature. The index always lists all.",
)
@click.option(
    "--show-examples",
    type=click.IntRange(1),
    default=10,
    show_default=True,
    help="Top examples on each card.",
)
@click.option(
    "--show-samples",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Random samples per activation-quantile bin on each card.",
)
@chat_options(reply=True)
@json_option
@one_line_errors
def report(
    sae_path,
    hook,
    override_hook,
    overrides,
    sae_dtype,
    tokens,
    examples,
    cache_dir,
    recompute,
    output,
    target_file,
    baseline_file,
    cards,
    show_examples,
    show_samples,
    chat,
    system,
    chat_user,
    as_json,
) -> None:
    """Write one self-contained HTML file (works offline) about the SAE: run summary and
    training curves, density histogram, a sortable feature index and a card per feature
    with highlighted examples, activation histogram and promoted / suppressed tokens.

    \b
        python analyze.py report checkpoints/demo -o demo-report.html \\
            --target configs/prompts/demo_raised.txt --baseline configs/prompts/demo_not_raised.txt
    """
    from sae.analysis.target_report import report_output, write_target_report
    from sae.data.prompt_format import PromptFormat

    if (target_file is None) != (baseline_file is None):
        raise ConfigError("report: contrast columns need both --target FILE and --baseline FILE")
    fmt = PromptFormat(chat=chat, system=system, user=chat_user)
    prompts, names = _contrast_prompts(target_file, baseline_file)
    output = report_output(sae_path, output)  # before minutes of scanning
    target, stats = _open_with_stats(
        sae_path, overrides, hook, sae_dtype, override_hook, tokens, examples, cache_dir, recompute
    )
    info, seconds = write_target_report(
        target,
        stats,
        output,
        prompts=prompts,
        prompt_names=names,
        cards=cards,
        examples=show_examples,
        samples_per_bin=show_samples,
        fmt=fmt,
    )
    _print_report_written(info, seconds, as_json)


def _contrast_prompts(
    target_file: Path | None, baseline_file: Path | None
) -> tuple[tuple[list[str], list[str]] | None, tuple[str, str] | None]:
    """`report`'s contrast prompt sets (target, baseline) and their names (the file names);
    (None, None) without --target and --baseline."""
    from sae.analysis.feature_search import read_prompts

    if target_file is None:
        return None, None
    prompts = read_prompts(target_file, "--target"), read_prompts(baseline_file, "--baseline")
    return prompts, (target_file.name, baseline_file.name)


def _print_report_written(info: ReportInfo, seconds: float, as_json: bool) -> None:
    """`report`'s answer: the file written, its size, features, cards and build time."""
    if as_json:
        click.echo(
            json.dumps(
                {
                    "path": str(info.path),
                    "bytes": info.bytes,
                    "features": info.features,
                    "cards": info.cards,
                    "build_seconds": round(seconds, 2),
                }
            )
        )
        return
    click.echo(
        f"report: {info.path} ({info.bytes / 2**20:.1f} MiB, {info.features:,} features in the index, "
        f"{info.cards:,} cards, built in {seconds:.1f} s); open it in a browser"
    )
