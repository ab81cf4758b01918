"""Intervention commands: edit features while the model writes (generate), find where
a behaviour lives (patch, attribute), and measure a fix (fix-test)."""

from __future__ import annotations

import itertools
import json
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sae.cli.analyze_group import analyze
from sae.cli.common import (
    TOP_TOKENS_SCAN,
    chat_options,
    config_options,
    edit_options,
    json_option,
    log,
    one_line_errors,
    resolve_config,
    sampling_options,
    target_options,
    tokens_cell,
    tokens_text,
    top_tokens_option,
)
from sae.errors import ConfigError

# The commands import the library when they run: `analyze.py --help` needs no torch.
if TYPE_CHECKING:
    from sae.analysis.target import Target
    from sae.data.prompt_format import PromptFormat
    from sae.interventions.edit_picks import PickedEdits, TopEdits
    from sae.interventions.edits import FeatureEdit
    from sae.interventions.fix_test import FixTestResult
    from sae.interventions.patching import PatchResult
    from sae.interventions.scorers import Scorer
    from sae.models.generation import Sampling


@analyze.command()
@target_options
@click.option("--prompt", multiple=True, help="A prompt (repeatable).")
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path),
    help="File of prompts, one per line.",
)
@chat_options()
@edit_options
@sampling_options
@click.option(
    "--samples",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Continuations per prompt.",
)
@json_option
@one_line_errors
def generate(
    sae_path,
    hook,
    override_hook,
    overrides,
    sae_dtype,
    prompt,
    prompts_file,
    chat,
    system,
    ablate,
    clamp,
    scale,
    steer,
    edits_file,
    max_new_tokens,
    temperature,
    top_p,
    seed,
    samples,
    as_json,
) -> None:
    """Continue prompts with and without an intervention on SAE features, side by side,
    with the same seed (the edit applies to prompt and generated tokens alike).

    \b
        python analyze.py generate checkpoints/demo --prompt "If the key is missing, a KeyError" \\
            --ablate 93,1539 --steer 1876:+6 --temperature 0
    """
    from sae.analysis.feature_search import given_prompts
    from sae.analysis.target import open_target
    from sae.data.prompt_format import PromptFormat
    from sae.interventions.continuations import compare_continuations
    from sae.interventions.edits import describe_edit, parse_feature_edits, read_edits_file
    from sae.models.generation import Sampling

    edits = parse_feature_edits(ablate, clamp, scale, steer) + read_edits_file(edits_file)
    if not edits:
        raise ConfigError(
            "generate: no intervention; give --ablate, --clamp, --scale, --steer or --edits"
        )
    texts = given_prompts(prompt, prompts_file)
    fmt = PromptFormat(chat=chat, system=system)
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    target = open_target(
        sae_path, overrides, hook, sae_dtype=sae_dtype, override_hook=override_hook, log=log
    )
    rows = compare_continuations(target, texts, edits, samples, sampling, fmt)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    _print_side_by_side(rows, ", ".join(describe_edit(e) for e in edits))


def _print_side_by_side(rows: list[dict], edit_text: str) -> None:
    """`generate` as text: per prompt, each sample's baseline and intervened continuations
    in two columns as wide as the terminal allows."""
    width = max(30, (shutil.get_terminal_size((120, 24)).columns - 3) // 2)
    for row in rows:
        click.echo(f"\nprompt: {row['prompt']!r}")
        click.echo(f"{'baseline':<{width}} | intervened ({edit_text})")
        for i, (b, c) in enumerate(zip(row["baseline"], row["intervened"])):
            if i:
                click.echo(f"{'-' * width}-+-{'-' * width}")
            for line in _columns(b, c, width):
                click.echo(line)


def _columns(left: str, right: str, width: int) -> list[str]:
    """Two texts side by side, wrapped to ``width`` characters each."""
    wrap = lambda t: textwrap.wrap(t.replace("\n", " ↵ "), width) or [""]  # noqa: E731
    return [
        f"{a:<{width}} | {b}"
        for a, b in itertools.zip_longest(wrap(left), wrap(right), fillvalue="")
    ]


@analyze.command()
@config_options("model.device=cuda:1")
@click.option("--clean", required=True, help="The prompt that shows the behaviour.")
@click.option("--corrupted", required=True, help="A prompt of the same token length that does not.")
@click.option(
    "--answer",
    required=True,
    metavar="TOKEN",
    help="The token the clean prompt predicts next, as text (one token; mind the leading space).",
)
@click.option(
    "--wrong", default=None, metavar="TOKEN", help="The token to compare against (logit-diff)."
)
@click.option(
    "--metric",
    type=click.Choice(["logit-diff", "logprob"]),
    default=None,
    help="logit[answer] - logit[wrong], or log P(answer); default: logit-diff with --wrong, else logprob.",
)
@click.option(
    "--mode",
    type=click.Choice(["layer", "position", "head"]),
    default="position",
    show_default=True,
    help="Patch each layer's residual stream at all positions, at each position, or each attention "
    "head's output (all positions).",
)
@click.option(
    "--layers",
    "layer_spec",
    default=None,
    metavar="SPEC",
    help="Layers to sweep, e.g. 0-3 or 1,2 (default: all).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="Patched runs per forward pass.",
)
@click.option(
    "--svg",
    "svg_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the heatmap here as a self-contained SVG image (opens in any browser).",
)
@json_option
@one_line_errors
def patch(
    config,
    overrides,
    clean,
    corrupted,
    answer,
    wrong,
    metric,
    mode,
    layer_spec,
    batch_size,
    svg_path,
    as_json,
) -> None:
    """Activation patching: run the corrupted prompt with one activation (a layer's residual
    stream, at one position or all, or one attention head's output) taken from the clean
    run, and measure the metric at the last position. A table (and with --svg a heatmap)
    shows where the difference lives: normalised score 1 = clean behaviour restored,
    0 = no effect. Clean and corrupted must tokenize to the same length.

    The model comes from CONFIG and --set (default: the demo model). On the demo model the
    clean prompt prefers ' raised' over ' returned' by 2.61 logits, the corrupted one by
    -1.14; the information sits on ' KeyError' in the early layers and moves to the last
    position by layer 2:

    \b
        python analyze.py patch --clean "If the key is missing, a KeyError is" \\
            --corrupted "If the key is missing, the default is" --answer " raised" --wrong " returned" \\
            --svg patch.svg
    """

    from sae.interventions.patching import answer_patching, check_svg_path, write_svg

    _check_patch_metric(metric, wrong)
    if svg_path is not None:
        check_svg_path(svg_path)
    cfg = resolve_config(config, overrides)
    result = answer_patching(
        cfg.model, clean, corrupted, answer, wrong, mode, layer_spec, batch_size
    )
    if svg_path is not None:
        write_svg(svg_path, result.heatmap_svg())
    _print_patching(cfg.model.name_or_path, clean, corrupted, result, svg_path, as_json)


def _check_patch_metric(metric: str | None, wrong: str | None) -> None:
    """--metric against --wrong: logit-diff (the default with --wrong) needs --wrong,
    logprob (the default without) takes none."""
    metric = metric or ("logit-diff" if wrong is not None else "logprob")
    if metric == "logit-diff" and wrong is None:
        raise ConfigError(
            "--metric logit-diff: give --wrong TOKEN, the token to compare the answer against"
        )
    if metric == "logprob" and wrong is not None:
        raise ConfigError("--wrong: applies to --metric logit-diff only")


def _print_patching(
    model: str,
    clean: str,
    corrupted: str,
    result: PatchResult,
    svg_path: Path | None,
    as_json: bool,
) -> None:
    """patch's answer: JSON, or the clean and corrupted metrics, the patched metric's table,
    the normalised scores' table and where the heatmap went."""
    if as_json:
        click.echo(
            json.dumps(
                {
                    "model": model,
                    "clean": clean,
                    "corrupted": corrupted,
                    **result.to_dict(),
                    "svg": None if svg_path is None else str(svg_path),
                },
                indent=1,
            )
        )
        return
    click.echo(f"model: {model}; metric: {result.metric} at the last position")
    click.echo(
        f"  clean     {result.clean_metric:>9.4f}  {clean!r} ({len(result.clean_tokens)} tokens)"
    )
    click.echo(f"  corrupted {result.corrupted_metric:>9.4f}  {corrupted!r}")
    click.echo(f"\npatched metric (rows: layer patched; columns: {result.column_title}):")
    click.echo(result.table_text())
    click.echo(
        "\nnormalised score, (patched - corrupted) / (clean - corrupted); 1 = clean restored:"
    )
    click.echo(result.table_text(normalized=True))
    if svg_path is not None:
        click.echo(f"\nheatmap: {svg_path}")


def metric_options(fn: Callable) -> Callable:
    fn = click.option(
        "--wrong",
        default=None,
        metavar="TOKEN",
        help="With --answer: use logit(answer) - logit(wrong) instead of log p(answer).",
    )(fn)
    return click.option(
        "--answer",
        default=None,
        metavar="TOKEN",
        help="The next token whose log-probability (at each prompt's end) is the metric, "
        "e.g. ' raised' (mind the leading space).",
    )(fn)


@analyze.command()
@target_options
@click.option("--prompt", multiple=True, help="A prompt (repeatable).")
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path),
    help="File of prompts, one per line.",
)
@metric_options
@click.option(
    "--top",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    help="Features listed per direction.",
)
@chat_options()
@top_tokens_option
@json_option
@one_line_errors
def attribute(
    sae_path,
    hook,
    override_hook,
    overrides,
    sae_dtype,
    prompt,
    prompts_file,
    answer,
    wrong,
    top,
    chat,
    system,
    no_top_tokens,
    as_json,
) -> None:
    """Rank features by their effect on the next-token metric at the end of each prompt
    (activation x gradient, summed over positions and prompts; the SAE error term is
    reported too). Ablating the top "up" features should lower the metric.

    \b
        python analyze.py attribute checkpoints/demo --prompt "If the key is missing, a KeyError is" \\
            --answer " raised"
    """

    from sae.analysis.feature_search import given_prompts
    from sae.analysis.target import open_target
    from sae.data.prompt_format import PromptFormat
    from sae.interventions.attribution import attribution_listing

    texts = given_prompts(prompt, prompts_file)
    fmt = PromptFormat(chat=chat, system=system)
    target = open_target(
        sae_path, overrides, hook, sae_dtype=sae_dtype, override_hook=override_hook, log=log
    )
    listing = attribution_listing(
        target,
        texts,
        answer,
        wrong,
        top,
        fmt,
        top_tokens=None if no_top_tokens else TOP_TOKENS_SCAN,
        log=log,
    )
    if as_json:
        click.echo(json.dumps(listing, indent=1))
        return
    what = f"logit({answer!r}) - logit({wrong!r})" if wrong else f"log p({answer!r})"
    click.echo(
        f"metric {what}: mean {listing['metric_mean']:.4f} over {listing['prompts']} prompts; "
        f"attribution summed over prompts: features {listing['features_total']:+.4f}, "
        f"SAE error term {listing['error_term']:+.4f}"
    )
    for d in ("up", "down"):
        click.echo(f"\nfeatures pushing the metric {d}:")
        if not no_top_tokens:
            click.echo(f"  {'feature':>8} {'attribution':>11}  top tokens")
        for r in listing[f"pushes_{d}"]:
            click.echo(f"  {r['feature']:>8} {r['attribution']:>+11.4f}{tokens_cell(r)}")


@dataclass(frozen=True)
class _FixTestOptions:
    """fix-test's command line as click parses it, one field per option (by parameter name):
    the steps of the command take it as one value."""

    sae_path: Path
    hook: str | None
    override_hook: bool
    overrides: tuple[str, ...]
    sae_dtype: str
    prompt: tuple[str, ...]
    prompts_file: Path | None
    scorer_spec: str
    threshold: float
    ablate: str | None
    clamp: tuple[str, ...]
    scale: tuple[str, ...]
    steer: tuple[str, ...]
    edits_file: Path | None
    ablate_top: int | None
    steer_top: str | None
    contrast: tuple[Path, Path] | None
    answer: str | None
    wrong: str | None
    chat: bool
    system: str | None
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    samples: int
    neutral_file: Path | None
    neutral_tokens: int
    html_path: Path | None
    no_top_tokens: bool
    as_json: bool


@analyze.command("fix-test")
@target_options
@click.option("--prompt", multiple=True, help="A prompt (repeatable).")
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path),
    help="File of prompts, one per line.",
)
@click.option(
    "--scorer",
    "scorer_spec",
    required=True,
    metavar="SPEC",
    help="words:W1,W2 | words:FILE | hf:PATH_OR_HUB_ID[@LABEL] | profanity (higher = more of the behaviour).",
)
@click.option(
    "--threshold",
    type=float,
    default=0.5,
    show_default=True,
    help="A continuation scoring above this counts as showing the behaviour.",
)
@edit_options
@click.option(
    "--ablate-top",
    type=click.IntRange(1),
    default=None,
    metavar="K",
    help="Ablate the K features found by --contrast TARGET BASELINE or by --answer (attribution).",
)
@click.option(
    "--steer-top",
    default=None,
    metavar="K:A",
    help="Steer the K features found by --contrast or --answer, each by A, e.g. --steer-top 2:+4.",
)
@click.option(
    "--contrast",
    nargs=2,
    type=click.Path(path_type=Path),
    default=None,
    metavar="TARGET BASELINE",
    help="Prompt files for a contrast search that picks the features for --ablate-top.",
)
@metric_options
@chat_options()
@sampling_options
@click.option(
    "--samples",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Continuations per prompt.",
)
@click.option(
    "--neutral",
    "neutral_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Neutral text for the KL cost, one text per line (default: data.eval_split of the data).",
)
@click.option(
    "--neutral-tokens",
    type=click.IntRange(0),
    default=16384,
    show_default=True,
    help="Tokens of neutral text for the KL cost (0 = skip it).",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write a small HTML page with the table, a chart and samples.",
)
@top_tokens_option
@json_option
@one_line_errors
def fix_test_command(**options: Any) -> None:
    """Does an intervention remove a behaviour, and at what cost? Samples continuations of
    the prompts with and without it (same seed), scores them, and reports the mean score,
    the fraction above --threshold and the perplexity under the clean model, each with a
    95% bootstrap interval, and the KL divergence on neutral text.

    \b
        python analyze.py fix-test checkpoints/demo --prompts configs/prompts/demo_fix.txt \\
            --scorer words:raised,raise,raises --answer " raised" --ablate-top 5
    """

    from sae.analysis.target import open_target
    from sae.interventions.fix_test import run_fix_test

    opts = _FixTestOptions(**options)
    texts, edits, top, sampling, fmt, scorer = _fix_test_inputs(opts)  # before the model loads
    target = open_target(
        opts.sae_path,
        opts.overrides,
        opts.hook,
        sae_dtype=opts.sae_dtype,
        override_hook=opts.override_hook,
        log=log,
    )
    picks = _picked_edits(target, opts, edits, top, texts, fmt)
    result = run_fix_test(
        target,
        picks.edit,
        texts,
        scorer,
        samples=opts.samples,
        sampling=sampling,
        threshold=opts.threshold,
        neutral_file=opts.neutral_file,
        neutral_tokens=opts.neutral_tokens,
        html_path=opts.html_path,
        fmt=fmt,
        log=log,
    )
    _print_fix_test(picks, result, target.hook, opts.as_json)


def _fix_test_inputs(
    opts: _FixTestOptions,
) -> tuple[list[str], list[FeatureEdit], TopEdits, Sampling, PromptFormat, Scorer]:
    """The prompts, the edits given, the top edits asked for, the sampling, the prompt format
    and the scorer: every option checked (and the --html path tried) before the model loads."""
    from sae.analysis.feature_search import given_prompts
    from sae.atomic_io import check_output_path
    from sae.data.prompt_format import PromptFormat
    from sae.interventions.edit_picks import TopEdits
    from sae.interventions.edits import parse_feature_edits, read_edits_file
    from sae.interventions.scorers import load_scorer
    from sae.models.generation import Sampling

    texts = given_prompts(opts.prompt, opts.prompts_file)
    edits = parse_feature_edits(opts.ablate, opts.clamp, opts.scale, opts.steer)
    edits += read_edits_file(opts.edits_file)
    top = TopEdits.from_options(
        opts.ablate_top, opts.steer_top, opts.contrast, opts.answer, has_edits=bool(edits)
    )
    if opts.html_path is not None:
        check_output_path(opts.html_path, "--html")
    sampling = Sampling(opts.max_new_tokens, opts.temperature, opts.top_p, opts.seed)
    fmt = PromptFormat(chat=opts.chat, system=opts.system)
    return texts, edits, top, sampling, fmt, load_scorer(opts.scorer_spec)


def _picked_edits(
    target: Target,
    opts: _FixTestOptions,
    edits: list[FeatureEdit],
    top: TopEdits,
    texts: list[str],
    fmt: PromptFormat,
) -> PickedEdits:
    """The edits to test: ``edits`` plus the ``top`` edits of the features ranked by
    --contrast or --answer (over ``texts``), those features logged."""
    from sae.interventions.edit_picks import pick_edits

    picks = pick_edits(
        target,
        edits,
        top,
        texts,
        contrast=opts.contrast,
        answer=opts.answer,
        wrong=opts.wrong,
        fmt=fmt,
        top_tokens=None if opts.no_top_tokens else TOP_TOKENS_SCAN,
        log=log,
    )
    if picks.picked is not None:
        _log_picked(picks)
    return picks


def _log_picked(picks: PickedEdits) -> None:
    """The features the top edits took, in ranking order, with their top tokens when on."""
    label = str if picks.tokens is None else (lambda f: f"{f} ({tokens_text(picks.tokens[f])})")
    log(f"top features by {picks.how}: {', '.join(map(label, picks.picked))}")


def _print_fix_test(picks: PickedEdits, result: FixTestResult, hook: str, as_json: bool) -> None:
    """fix-test's answer: JSON, or the intervention, its features' top tokens and the table."""
    edits = picks.to_dict()
    if as_json:
        click.echo(json.dumps({**edits, **result.to_dict()}, indent=1))
        return
    click.echo(f"intervention at {hook}: {', '.join(edits['edits'])}")
    if "features" in edits:
        click.echo("features edited, with their top tokens:")
        for r in edits["features"]:
            click.echo(f"  {r['feature']:>8}{tokens_cell(r)}")
    click.echo(result.table())
    if result.kl is not None:
        click.echo(
            f"(KL over {result.neutral_tokens:,} tokens of neutral text; "
            "values in brackets: 95% bootstrap intervals over prompts)"
        )
