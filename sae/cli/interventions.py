"""Intervention commands: edit features while the model writes (generate), find where
a behaviour lives (patch, attribute), and measure a fix (fix-test)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from sae.cli.analyze_group import analyze
from sae.cli.common import (
    _columns,
    _feature_tokens,
    _log,
    _prompt_format,
    _prompts,
    _tokens_cell,
    _with_tokens,
    chat_options,
    config_options,
    edit_options,
    json_option,
    one_line_errors,
    open_sae,
    resolve_config,
    sampling_options,
    target_options,
    top_tokens_option,
)
from sae.errors import ConfigError


@analyze.command()
@target_options
@click.option("--prompt", multiple=True, help="A prompt (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), help="File of prompts, one per line.")
@chat_options()
@edit_options
@sampling_options
@click.option("--samples", type=click.IntRange(1), default=1, show_default=True, help="Continuations per prompt.")
@json_option
@one_line_errors
def generate(sae_path, hook, override_hook, overrides, sae_dtype, prompt, prompts_file, chat, system, ablate, clamp, scale,
             steer, max_new_tokens, temperature, top_p, seed, samples, as_json) -> None:
    """Continue prompts with and without an intervention on SAE features, side by side,
    with the same seed (the edit applies to prompt and generated tokens alike).

    \b
        python analyze.py generate checkpoints/demo --prompt "If the key is missing, a KeyError" \\
            --ablate 93,1539 --steer 1876:+6 --temperature 0
    """
    import shutil

    from sae.activations.capture import special_token_ids
    from sae.interventions.edits import Edit, intervene, parse_feature_edits
    from sae.models.generation import Sampling, continuations

    edits = parse_feature_edits(ablate, clamp, scale, steer)
    if not edits:
        raise ConfigError("generate: no intervention; give --ablate, --clamp, --scale or --steer")
    texts = _prompts(prompt, prompts_file)
    fmt = _prompt_format(chat, system)
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    target = open_sae(sae_path, overrides, hook, override_hook, sae_dtype)
    edit = Edit(target.sae, target.hook, edits)
    edit.check()
    base = continuations(target.model, target.tokenizer, texts, samples, sampling, progress=True, fmt=fmt)
    with intervene(target.model, [edit], special_token_ids(target.tokenizer)):
        changed = continuations(target.model, target.tokenizer, texts, samples, sampling, progress=True, fmt=fmt)
    if as_json:
        click.echo(json.dumps([{"prompt": p, "baseline": b, "intervened": c}
                               for p, b, c in zip(texts, base, changed)], indent=1))
        return
    width = max(30, (shutil.get_terminal_size((120, 24)).columns - 3) // 2)
    for p, bs, cs in zip(texts, base, changed):
        click.echo(f"\nprompt: {p!r}")
        click.echo(f"{'baseline':<{width}} | intervened ({', '.join(_describe_edit(e) for e in edits)})")
        for i, (b, c) in enumerate(zip(bs, cs)):
            if i:
                click.echo(f"{'-' * width}-+-{'-' * width}")
            for line in _columns(b, c, width):
                click.echo(line)


def _describe_edit(e) -> str:
    from sae.interventions.edits import Ablate, Clamp, Scale, Steer

    if isinstance(e, Ablate):
        return "ablate " + ",".join(map(str, e.features))
    if isinstance(e, Clamp):
        return f"clamp {e.features[0]}={e.value:g}"
    if isinstance(e, Scale):
        return f"scale {e.features[0]}x{e.factor:g}"
    if isinstance(e, Steer):
        return f"steer {e.feature}{e.alpha:+g}"
    return type(e).__name__.lower()


@analyze.command()
@config_options("model.device=cuda:1")
@click.option("--clean", required=True, help="The prompt that shows the behaviour.")
@click.option("--corrupted", required=True, help="A prompt of the same token length that does not.")
@click.option("--answer", required=True, metavar="TOKEN",
              help="The token the clean prompt predicts next, as text (one token; mind the leading space).")
@click.option("--wrong", default=None, metavar="TOKEN", help="The token to compare against (logit-diff).")
@click.option("--metric", type=click.Choice(["logit-diff", "logprob"]), default=None,
              help="logit[answer] - logit[wrong], or log P(answer); default: logit-diff with --wrong, else logprob.")
@click.option("--mode", type=click.Choice(["layer", "position", "head"]), default="position", show_default=True,
              help="Patch each layer's residual stream at all positions, at each position, or each attention "
                   "head's output (all positions).")
@click.option("--layers", "layer_spec", default=None, metavar="SPEC",
              help="Layers to sweep, e.g. 0-3 or 1,2 (default: all).")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="Patched runs per forward pass.")
@click.option("--svg", "svg_path", type=click.Path(path_type=Path), default=None,
              help="Write the heatmap here as a self-contained SVG image (opens in any browser).")
@json_option
@one_line_errors
def patch(config, overrides, clean, corrupted, answer, wrong, metric, mode, layer_spec, batch_size, svg_path,
          as_json) -> None:
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

    from sae.evaluation.lm_metrics import answer_token, logit_diff, logprob
    from sae.interventions.patching import ActivationPatcher, check_svg_path, write_svg

    metric = metric or ("logit-diff" if wrong is not None else "logprob")
    if metric == "logit-diff" and wrong is None:
        raise ConfigError("--metric logit-diff: give --wrong TOKEN, the token to compare the answer against")
    if metric == "logprob" and wrong is not None:
        raise ConfigError("--wrong: applies to --metric logit-diff only")
    if svg_path is not None:
        check_svg_path(svg_path)
    cfg = resolve_config(config, overrides)
    from sae.models.loading import load_model

    model, tokenizer = load_model(cfg.model)
    a = answer_token(tokenizer, answer, "--answer")
    scorer = (logit_diff(a, answer_token(tokenizer, wrong, "--wrong"), tokenizer) if metric == "logit-diff"
              else logprob(a, tokenizer))
    patcher = ActivationPatcher(model, tokenizer, clean, corrupted, scorer)
    result = patcher.sweep(mode, layer_spec, batch_size, progress=True)
    if svg_path is not None:
        write_svg(svg_path, result.heatmap_svg())
    if as_json:
        click.echo(json.dumps({"model": cfg.model.name_or_path, "clean": clean, "corrupted": corrupted,
                               **result.to_dict(), "svg": None if svg_path is None else str(svg_path)}, indent=1))
        return
    click.echo(f"model: {cfg.model.name_or_path}; metric: {result.metric} at the last position")
    click.echo(f"  clean     {result.clean_metric:>9.4f}  {clean!r} ({patcher.n_tokens} tokens)")
    click.echo(f"  corrupted {result.corrupted_metric:>9.4f}  {corrupted!r}")
    click.echo(f"\npatched metric (rows: layer patched; columns: {result.column_title}):")
    click.echo(result.table_text())
    click.echo("\nnormalised score, (patched - corrupted) / (clean - corrupted); 1 = clean restored:")
    click.echo(result.table_text(normalized=True))
    if svg_path is not None:
        click.echo(f"\nheatmap: {svg_path}")


def metric_options(fn: Callable) -> Callable:
    fn = click.option("--wrong", default=None, metavar="TOKEN",
                      help="With --answer: use logit(answer) - logit(wrong) instead of log p(answer).")(fn)
    return click.option("--answer", default=None, metavar="TOKEN",
                        help="The next token whose log-probability (at each prompt's end) is the metric, "
                             "e.g. ' raised' (mind the leading space).")(fn)


def _metric(tokenizer, answer: str | None, wrong: str | None):
    from sae.evaluation.lm_metrics import answer_token, logit_diff, logprob

    if answer is None:
        raise ConfigError("--answer: required; the token whose probability the features are ranked by")
    a = answer_token(tokenizer, answer, "--answer")
    return logit_diff(a, answer_token(tokenizer, wrong, "--wrong"), tokenizer) if wrong is not None \
        else logprob(a, tokenizer)


@analyze.command()
@target_options
@click.option("--prompt", multiple=True, help="A prompt (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), help="File of prompts, one per line.")
@metric_options
@click.option("--top", type=click.IntRange(1), default=20, show_default=True, help="Features listed per direction.")
@chat_options()
@top_tokens_option
@json_option
@one_line_errors
def attribute(sae_path, hook, override_hook, overrides, sae_dtype, prompt, prompts_file, answer, wrong, top, chat, system,
              no_top_tokens, as_json) -> None:
    """Rank features by their effect on the next-token metric at the end of each prompt
    (activation x gradient, summed over positions and prompts; the SAE error term is
    reported too). Ablating the top "up" features should lower the metric.

    \b
        python analyze.py attribute checkpoints/demo --prompt "If the key is missing, a KeyError is" \\
            --answer " raised"
    """

    from sae.interventions.attribution import attribute as run_attribution

    texts = _prompts(prompt, prompts_file)
    fmt = _prompt_format(chat, system)
    target = open_sae(sae_path, overrides, hook, override_hook, sae_dtype)
    result = run_attribution(target.model, target.tokenizer, target.sae, target.hook, texts,
                             _metric(target.tokenizer, answer, wrong), fmt=fmt)
    ranked = {d: result.ranking(d)[:top] for d in ("up", "down")}
    tokens = _feature_tokens(target, ranked["up"] + ranked["down"], no_top_tokens)
    if as_json:
        click.echo(json.dumps({"prompts": result.prompts, "metric_mean": result.metric / result.prompts,
                               "error_term": result.error, "features_total": float(result.features.sum()),
                               **{f"pushes_{d}": [_with_tokens({"feature": f, "attribution": float(result.features[f])},
                                                               tokens) for f in ranked[d]] for d in ranked}}, indent=1))
        return
    what = f"logit({answer!r}) - logit({wrong!r})" if wrong else f"log p({answer!r})"
    click.echo(f"metric {what}: mean {result.metric / result.prompts:.4f} over {result.prompts} prompts; "
               f"attribution summed over prompts: features {float(result.features.sum()):+.4f}, "
               f"SAE error term {result.error:+.4f}")
    for d in ranked:
        click.echo(f"\nfeatures pushing the metric {d}:")
        if tokens is not None:
            click.echo(f"  {'feature':>8} {'attribution':>11}  top tokens")
        for f in ranked[d]:
            click.echo(f"  {f:>8} {float(result.features[f]):>+11.4f}{_tokens_cell(tokens, f)}")


def _top_edits(ablate_top: int | None, steer_top: str | None, contrast, answer: str | None, has_edits: bool) -> dict:
    """--ablate-top / --steer-top as {edit kind: (how many of the picked features, steering
    amount)}, checked against the options that pick them and the explicit edits."""
    from sae.interventions.edits import parse_feature_edits

    picks = "--ablate-top / --steer-top"
    if (ablate_top is not None or steer_top is not None) and contrast is None and answer is None:
        raise ConfigError(f"{picks}: say how to pick the features: --contrast TARGET BASELINE or --answer TOKEN")
    if ablate_top is None and steer_top is None and (contrast is not None or answer is not None):
        raise ConfigError(f"--contrast / --answer pick features for {picks}; give one of them")
    if not has_edits and ablate_top is None and steer_top is None:
        raise ConfigError("fix-test: no intervention; give --ablate/--clamp/--scale/--steer, --ablate-top K "
                          "or --steer-top K:A")
    top = {}
    if ablate_top is not None:
        top["ablate"] = (ablate_top, None)
    if steer_top is not None:
        (k, amount), = [(e.feature, e.alpha) for e in parse_feature_edits(steer=[steer_top])]
        if k < 1:
            raise ConfigError(f"--steer-top: {steer_top!r} steers no feature; K must be at least 1")
        top["steer"] = (k, amount)
    return top


def _print_fix_test(result, hook: str, edits, tokens: dict[int, list[str]] | None, neutral, as_json: bool) -> None:
    """fix-test's answer: JSON, or the intervention, its features' top tokens and the table."""
    from sae.interventions.edits import edited_features

    features = edited_features(edits)
    if as_json:
        click.echo(json.dumps({"edits": [_describe_edit(e) for e in edits],
                               **({} if tokens is None else {"features": [_with_tokens({"feature": f}, tokens)
                                                                          for f in features]}),
                               **result.to_dict()}, indent=1))
        return
    click.echo(f"intervention at {hook}: {', '.join(_describe_edit(e) for e in edits)}")
    if tokens is not None:
        click.echo("features edited, with their top tokens:")
        for f in features:
            click.echo(f"  {f:>8}{_tokens_cell(tokens, f)}")
    click.echo(result.table())
    if neutral:
        click.echo(f"(KL over {sum(c.numel() for c in neutral):,} tokens of neutral text; "
                   "values in brackets: 95% bootstrap intervals over prompts)")


@analyze.command("fix-test")
@target_options
@click.option("--prompt", multiple=True, help="A prompt (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), help="File of prompts, one per line.")
@click.option("--scorer", "scorer_spec", required=True, metavar="SPEC",
              help="words:W1,W2 | words:FILE | hf:PATH_OR_HUB_ID[@LABEL] | profanity (higher = more of the behaviour).")
@click.option("--threshold", type=float, default=0.5, show_default=True,
              help="A continuation scoring above this counts as showing the behaviour.")
@edit_options
@click.option("--ablate-top", type=click.IntRange(1), default=None, metavar="K",
              help="Ablate the K features found by --contrast TARGET BASELINE or by --answer (attribution).")
@click.option("--steer-top", default=None, metavar="K:A",
              help="Steer the K features found by --contrast or --answer, each by A, e.g. --steer-top 2:+4.")
@click.option("--contrast", nargs=2, type=click.Path(path_type=Path), default=None, metavar="TARGET BASELINE",
              help="Prompt files for a contrast search that picks the features for --ablate-top.")
@metric_options
@chat_options()
@sampling_options
@click.option("--samples", type=click.IntRange(1), default=8, show_default=True, help="Continuations per prompt.")
@click.option("--neutral", "neutral_file", type=click.Path(path_type=Path), default=None,
              help="Neutral text for the KL cost, one text per line (default: data.eval_split of the data).")
@click.option("--neutral-tokens", type=click.IntRange(0), default=16384, show_default=True,
              help="Tokens of neutral text for the KL cost (0 = skip it).")
@click.option("--html", "html_path", type=click.Path(path_type=Path), default=None,
              help="Also write a small HTML page with the table, a chart and samples.")
@top_tokens_option
@json_option
@one_line_errors
def fix_test_command(sae_path, hook, override_hook, overrides, sae_dtype, prompt, prompts_file, scorer_spec, threshold, ablate, clamp, scale,
                     steer, ablate_top, steer_top, contrast, answer, wrong, chat, system, max_new_tokens, temperature,
                     top_p, seed, samples, neutral_file, neutral_tokens, html_path, no_top_tokens, as_json) -> None:
    """Does an intervention remove a behaviour, and at what cost? Samples continuations of
    the prompts with and without it (same seed), scores them, and reports the mean score,
    the fraction above --threshold and the perplexity under the clean model, each with a
    95% bootstrap interval, and the KL divergence on neutral text.

    \b
        python analyze.py fix-test checkpoints/demo --prompts configs/prompts/demo_fix.txt \\
            --scorer words:raised,raise,raises --answer " raised" --ablate-top 5
    """

    from sae.analysis.feature_search import read_prompts
    from sae.atomic_io import check_output_path, write_output
    from sae.interventions.edits import Ablate, Edit, Steer, edited_features, parse_feature_edits
    from sae.interventions.fix_test import fix_test, neutral_contexts, rank_features
    from sae.interventions.scorers import load_scorer
    from sae.models.generation import Sampling

    texts = _prompts(prompt, prompts_file)
    edits = parse_feature_edits(ablate, clamp, scale, steer)
    top = _top_edits(ablate_top, steer_top, contrast, answer, bool(edits))
    if html_path is not None:
        check_output_path(html_path, "--html")
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    fmt = _prompt_format(chat, system)
    scorer = load_scorer(scorer_spec)
    target = open_sae(sae_path, overrides, hook, override_hook, sae_dtype)
    if top:
        ranking, how = rank_features(target, texts, contrast, lambda: _metric(target.tokenizer, answer, wrong), fmt)
        how = how if contrast is not None else f"attribution to {answer!r}"
        if "ablate" in top:
            edits.append(Ablate(ranking[:top["ablate"][0]]))
        if "steer" in top:
            k, amount = top["steer"]
            edits += [Steer(f, amount) for f in ranking[:k]]
    edit = Edit(target.sae, target.hook, edits)
    edit.check()   # before top tokens, which index the features
    tokens = _feature_tokens(target, edited_features(edits), no_top_tokens)
    if top:
        picked = ranking[:max(k for k, _ in top.values())]
        label = str if tokens is None else (lambda f: f"{f} ({_tokens_cell(tokens, f).strip()})")
        _log(f"top features by {how}: {', '.join(map(label, picked))}")
    neutral = neutral_contexts(target, read_prompts(neutral_file, "--neutral") if neutral_file else None,
                               neutral_tokens, log=_log)
    result = fix_test(target.model, target.tokenizer, texts, [edit], scorer, samples, sampling, threshold, neutral,
                      fmt=fmt)
    if html_path is not None:
        write_output(html_path, result.html(f"Fix test: {', '.join(_describe_edit(e) for e in edits)} "
                                            f"at {target.hook}"), "--html")
        _log(f"wrote {html_path}")
    _print_fix_test(result, target.hook, edits, tokens, neutral, as_json)


