"""Analysis commands: what features mean (features, report) and which lie behind a
behaviour (search)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sae.cli.analyze_group import analyze
from sae.cli.common import (
    SORTS,
    _example_text,
    _feature_tokens,
    _load_stats,
    _print_feature,
    _print_text_hits,
    _prompt_format,
    _tokens_cell,
    _with_tokens,
    chat_options,
    json_option,
    one_line_errors,
    open_sae,
    stats_options,
    target_options,
    top_tokens_option,
)
from sae.errors import ConfigError


@analyze.command()
@target_options
@stats_options
@click.option("--feature", "-f", "features", multiple=True, type=int, metavar="N",
              help="Show feature N in full (repeatable).")
@click.option("--sort", type=click.Choice(sorted(SORTS)), default="density", show_default=True,
              help="Order of the feature table (without --feature).")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True, help="Rows of the feature table.")
@click.option("--show-examples", type=click.IntRange(0), default=5, show_default=True,
              help="Top examples printed per feature with --feature (--json has them all).")
@json_option
@one_line_errors
def features(sae_path, hook, override_hook, overrides, sae_dtype, tokens, examples, cache_dir, recompute, features, sort, limit, show_examples,
             as_json) -> None:
    """What the SAE's features respond to: density, activations, top-activating examples
    in context, quantile-bin samples, promoted and suppressed output tokens and nearest
    features. Statistics are computed once over --tokens tokens and cached.

    \b
        python analyze.py features checkpoints/demo                 # summary + densest features
        python analyze.py features checkpoints/demo -f 93 -f 1539    # two features in full
    """

    from sae.analysis.feature_stats import (
        check_feature,
        density_histogram,
        feature_record,
        token_decoder,
    )

    target, stats = _load_stats(sae_path, hook, override_hook, overrides, sae_dtype, tokens, examples, cache_dir, recompute)
    for f in features:
        check_feature(f, stats.num_features)
    decode = token_decoder(target.tokenizer)
    hist = density_histogram(stats)
    summary = {"sae": str(target.folder), "hook": target.hook, "model": target.cfg.model.name_or_path,
               "features": stats.num_features, "tokens": stats.tokens, "contexts": stats.contexts,
               "density_histogram": hist}
    shown = list(features) or SORTS[sort](stats).argsort(descending=True)[:limit].tolist()
    records = [feature_record(stats, f, decode) for f in shown]
    if as_json:
        click.echo(json.dumps({**summary, "sorted_by": None if features else sort, "features_shown": records}, indent=1))
        return
    click.echo(f"{target.folder}: {stats.num_features:,} features at {target.hook}; statistics over "
               f"{stats.tokens:,} tokens in {stats.contexts:,} contexts")
    click.echo(f"never fired: {hist['never_fired']:,} features; log10 density histogram:")
    peak = max(hist["counts"], default=0) or 1
    for edge, count in zip(hist["edges"], hist["counts"]):
        click.echo(f"  {edge:>5.1f} {count:>8,} {'#' * round(40 * count / peak)}")
    if features:
        for r in records:
            r["top_examples"] = r["top_examples"][:show_examples]
            click.echo("")
            _print_feature(r)
        return
    click.echo(f"\nfeatures by {sort} (top {len(records)}; -f N shows one in full):")
    click.echo(f"  {'feature':>8} {'density':>9} {'max':>8} {'mean':>8}  top example")
    for r in records:
        top = _example_text(r["top_examples"][0]) if r["top_examples"] else "(never fired)"
        click.echo(f"  {r['feature']:>8} {r['density']:>9.3%} {r['max']:>8.3f} {r['mean']:>8.3f}  {top}")


@analyze.command()
@target_options
@click.option("--target", "target_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Prompts showing the behaviour (one per line, or .jsonl with a text field).")
@click.option("--baseline", "baseline_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Prompts without it, as alike as possible otherwise.")
@click.option("--text", default=None, help="Instead of a contrast: the features that fire on this text.")
@click.option("--focus", default=None, help="With --text: rank by the tokens covering this substring only.")
@click.option("--rank", type=click.Choice(["effect", "auroc", "diff"]), default="effect", show_default=True,
              help="Contrast ranking: effect size (Cohen's d), AUROC, or difference of means.")
@click.option("--reduce", type=click.Choice(["max", "mean"]), default="max", show_default=True,
              help="A prompt's score per feature: max or mean over its tokens.")
@click.option("--top", type=click.IntRange(1), default=20, show_default=True, help="Features listed.")
@chat_options(reply=True)
@top_tokens_option
@json_option
@one_line_errors
def search(sae_path, hook, override_hook, overrides, sae_dtype, target_file, baseline_file, text, focus, rank, reduce, top,
           chat, system, chat_user, no_top_tokens, as_json) -> None:
    """Find features: those that separate --target prompts from --baseline prompts
    (contrast search), or those that fire on --text.

    \b
        python analyze.py search checkpoints/demo --target configs/prompts/demo_raised.txt \\
            --baseline configs/prompts/demo_not_raised.txt
        python analyze.py search checkpoints/demo --text "a KeyError is raised" --focus raised
    """

    from sae.analysis.feature_search import contrast_search, features_in_text, read_prompts

    contrast_mode = target_file is not None or baseline_file is not None
    if contrast_mode == (text is not None):
        raise ConfigError("search: give either --target FILE and --baseline FILE (contrast), or --text")
    if contrast_mode and (target_file is None or baseline_file is None):
        raise ConfigError("search: a contrast needs both --target FILE and --baseline FILE")
    if focus is not None and text is None:
        raise ConfigError("--focus: applies to --text only")
    if contrast_mode:
        a, b = read_prompts(target_file, "--target"), read_prompts(baseline_file, "--baseline")
    fmt = _prompt_format(chat, system, chat_user)
    target = open_sae(sae_path, overrides, hook, override_hook, sae_dtype)
    if not contrast_mode:
        hits = features_in_text(target, text, focus, top, fmt)
        tokens = _feature_tokens(target, [f for f, _ in hits.ranking], no_top_tokens)
        if as_json:
            click.echo(json.dumps({"text": text, "tokens": hits.tokens, "focus": hits.focus,
                                   "ranking": [_with_tokens({"feature": f, "activation": v}, tokens)
                                               for f, v in hits.ranking],
                                   "per_token": [[{"feature": f, "activation": v} for f, v in row]
                                                 for row in hits.per_token]}, indent=1))
            return
        _print_text_hits(hits, tokens)
        return
    result = contrast_search(target, a, b, reduce, fmt=fmt)
    ranked = {"target": result.ranking(rank, "a")[:top], "baseline": result.ranking(rank, "b")[:top]}
    tokens = _feature_tokens(target, ranked["target"] + ranked["baseline"], no_top_tokens)
    if as_json:
        click.echo(json.dumps({"target_prompts": result.n_a, "baseline_prompts": result.n_b,
                               "target_tokens": result.tokens_a, "baseline_tokens": result.tokens_b,
                               "reduce": reduce, "rank": rank,
                               **{f"higher_in_{side}": [_with_tokens(result.row(f), tokens) for f in ranked[side]]
                                  for side in ranked}}, indent=1))
        return
    click.echo(f"contrast: {result.n_a} target prompts ({result.tokens_a:,} tokens) vs {result.n_b} baseline prompts "
               f"({result.tokens_b:,} tokens); a prompt's score is the {reduce} activation over its tokens")
    for side in ("target", "baseline"):
        click.echo(f"\nhigher in {side}, by {rank}:")
        click.echo(f"  {'feature':>8} {'effect':>7} {'AUROC':>6} {'mean tgt':>9} {'mean base':>9} "
                   f"{'fires tgt':>9} {'fires base':>10}" + ("" if tokens is None else "  top tokens"))
        for f in ranked[side]:
            r = result.row(f)
            click.echo(f"  {f:>8} {r['effect']:>7.2f} {r['auroc']:>6.3f} {r['mean_target']:>9.3f} "
                       f"{r['mean_baseline']:>9.3f} {r['fire_target']:>9.0%} {r['fire_baseline']:>10.0%}"
                       f"{_tokens_cell(tokens, f)}")


@analyze.command()
@target_options
@stats_options
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="HTML file to write (default: SAE/report.html).")
@click.option("--target", "target_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Add contrast columns (effect size, AUROC) against --baseline to the feature index.")
@click.option("--baseline", "baseline_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Baseline prompts for the contrast columns.")
@click.option("--cards", type=click.IntRange(0), default=None,
              help="Give cards only to this many features (the densest ones, plus the top of the contrast); "
                   "default: every feature. The index always lists all.")
@click.option("--show-examples", type=click.IntRange(1), default=10, show_default=True,
              help="Top examples on each card.")
@click.option("--show-samples", type=click.IntRange(1), default=3, show_default=True,
              help="Random samples per activation-quantile bin on each card.")
@chat_options(reply=True)
@json_option
@one_line_errors
def report(sae_path, hook, override_hook, overrides, sae_dtype, tokens, examples, cache_dir, recompute, output, target_file, baseline_file,
           cards, show_examples, show_samples, chat, system, chat_user, as_json) -> None:
    """Write one self-contained HTML file (works offline) about the SAE: run summary and
    training curves, density histogram, a sortable feature index and a card per feature
    with highlighted examples, activation histogram and promoted / suppressed tokens.

    \b
        python analyze.py report checkpoints/demo -o demo-report.html \\
            --target configs/prompts/demo_raised.txt --baseline configs/prompts/demo_not_raised.txt
    """
    import time

    from sae.analysis.feature_search import contrast_search, read_prompts
    from sae.analysis.report import build_report, run_summary
    from sae.atomic_io import check_output_path
    from sae.formats import find_sae_folder
    from sae.formats.run_config import run_config_of

    if (target_file is None) != (baseline_file is None):
        raise ConfigError("report: contrast columns need both --target FILE and --baseline FILE")
    prompts = None
    fmt = _prompt_format(chat, system, chat_user)
    if target_file is not None:
        prompts = read_prompts(target_file, "--target"), read_prompts(baseline_file, "--baseline")
    output = output or find_sae_folder(sae_path) / "report.html"
    check_output_path(output, "--output")  # before minutes of scanning
    target, stats = _load_stats(sae_path, hook, override_hook, overrides, sae_dtype, tokens, examples, cache_dir, recompute)
    columns, help_, ranked = {}, {}, []
    if prompts is not None:
        result = contrast_search(target, *prompts, fmt=fmt)
        columns = {"effect": result.effect, "AUROC": result.auroc}
        help_ = {"effect": f"contrast effect size (Cohen's d) of {target_file.name} vs {baseline_file.name}",
                 "AUROC": f"AUROC of the feature as a classifier of {target_file.name} vs {baseline_file.name}"}
        ranked = result.ranking("effect")
    card_ids = None
    if cards is not None:
        dense = stats.density.argsort(descending=True).tolist()
        card_ids = sorted(set(ranked[:cards]) | set(dense[:cards]))
    cfg = target.sae.cfg
    sae_info = {"SAE": str(target.folder), "format": target.format, "model": target.cfg.model.name_or_path,
                "hook": target.hook,
                "architecture": target.sae.architecture, "features": cfg.num_latents, "d_in": target.sae.d_in,
                **({"k": cfg.k} if hasattr(cfg, "k") else {}),
                "data": f"{target.cfg.data.dataset} [{target.cfg.data.split}]"}
    start = time.perf_counter()
    name = target.folder.name if run_config_of(target.folder) is None else \
        str(target.folder.relative_to(run_config_of(target.folder).parent.parent))
    info = build_report(stats, target.tokenizer, output, title=f"SAE features: {name} at {target.hook}",
                        sae_info=sae_info, summary=run_summary(target.folder, run_config_of(target.folder)),
                        columns=columns or None, column_help=help_ or None, cards=card_ids, examples=show_examples,
                        samples_per_bin=show_samples)
    seconds = time.perf_counter() - start
    if as_json:

        click.echo(json.dumps({"path": str(info.path), "bytes": info.bytes, "features": info.features,
                               "cards": info.cards, "build_seconds": round(seconds, 2)}))
        return
    click.echo(f"report: {info.path} ({info.bytes / 2**20:.1f} MiB, {info.features:,} features in the index, "
               f"{info.cards:,} cards, built in {seconds:.1f} s); open it in a browser")
