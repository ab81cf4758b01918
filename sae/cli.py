"""Command-line front ends: ``sae-train`` (``train.py``) and ``sae-analyze`` (``analyze.py``).

Thin wrappers: each reads a RunConfig (YAML file + ``--set KEY=VALUE`` overrides) and
calls the library. Bad input ends the command with one line, ``error: ...``, and exit
status 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import click

from sae.config import RunConfig, describe, load_config, to_yaml
from sae.errors import ConfigError


def _keys_epilog() -> str:
    width = max(len(key) for key, _, _ in describe())
    lines = [f"  {key:<{width}}  {default:<20} {help}" for key, default, help in describe()]
    # "\b" stops click from re-wrapping the table.
    return "\b\nConfig keys (KEY, default, meaning):\n" + "\n".join(lines)


def one_line_errors(fn: Callable) -> Callable:
    """Print ConfigError (and its kinds, sae.errors) as one line (exit 2), any other OSError
    as one line naming the file (exit 1), and Ctrl-C as 'interrupted' (exit 130). With
    SAE_DEBUG=1 in the environment, the traceback and its cause come first."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            _debug_traceback(e)
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:  # a disk or file system failure that no library call put in words
            _debug_traceback(e)
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _debug_traceback(e: BaseException) -> None:
    """With SAE_DEBUG set, print ``e``'s traceback and the exception it was raised from,
    which ``raise ... from None`` hides but Python keeps (``__context__``)."""
    if not os.environ.get("SAE_DEBUG"):
        return
    for exc in (e.__context__, e) if e.__context__ is not None else (e,):
        click.echo("".join(traceback.format_exception(type(exc), exc, exc.__traceback__, chain=False)), err=True)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text (for scripts).")


class _OneLineUsageErrors:
    """Click's own usage errors (an unknown option, a bad choice) as one ``error:`` line,
    like ours, instead of its usage block and ``Error:``."""

    def main(self, args=None, prog_name=None, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(args, prog_name, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


class OneLineCommand(_OneLineUsageErrors, click.Command):
    pass


class OneLineGroup(_OneLineUsageErrors, click.Group):
    pass


def config_options(example: str) -> Callable[[Callable], Callable]:
    """The CONFIG argument and repeatable --set option, with an example that fits the command."""
    def add(fn: Callable) -> Callable:
        fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help=f"Override one config key, e.g. --set {example} (repeatable).")(fn)
        return click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))(fn)
    return add


def resolve_config(config: Path | None, overrides: tuple[str, ...]) -> RunConfig:
    """CONFIG if given, else the built-in defaults (a timestamped run folder, no activation
    cache: nothing shared with the demo's configs/demo.yaml), with the overrides applied."""
    return load_config(config, overrides)


@click.command(cls=OneLineCommand, epilog=_keys_epilog(), context_settings={"max_content_width": 120})
@config_options("train.lr=3e-4")
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
@click.option("--resume", "resume_dir", metavar="RUN_DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Continue the interrupted run in RUN_DIR (e.g. checkpoints/demo) from its last checkpoint, "
                   "with its own config.yaml.")
@one_line_errors
def train(config: Path | None, overrides: tuple[str, ...], print_config: bool, resume_dir: Path | None) -> None:
    """Train sparse autoencoders on a language model's activations.

    CONFIG is a YAML run config; without one, the defaults listed below (the embedded demo
    model on the built-in corpus, a timestamped run folder, no activation cache). Any key
    can be overridden with --set:

    \b
        python train.py configs/demo.yaml                      # the demo: checkpoints/demo/
        python train.py --set model.name_or_path=meta-llama/Llama-3.1-8B --set 'hooks=[layers.16]'

    Ctrl-C or SIGTERM writes a checkpoint and stops; `python train.py --resume RUN_DIR`
    continues, ending exactly as an uninterrupted run would.

    Under torchrun (`torchrun --nproc_per_node N train.py ...`) N processes train together,
    data parallel: each harvests its share of the contexts (README, "Several GPUs").
    """
    if resume_dir is not None and (config is not None or overrides):
        raise ConfigError("--resume: the run continues with its own config.yaml; drop CONFIG and --set")
    if resume_dir is not None:
        from sae.training.run_folder import resume_config

        cfg = resume_config(resume_dir)
    else:
        cfg = resolve_config(config, overrides)
    if print_config:
        click.echo(to_yaml(cfg), nl=False)
        return
    # Imported only now: torch + transformers take seconds, and a config error should not wait.
    from sae.distributed import Dist
    from sae.errors import TrainingStopped
    from sae.training.run import train_run

    dist = Dist.from_env(cfg.distributed.timeout_s, cfg.model.device)   # several processes under torchrun
    try:
        train_run(cfg, log=click.echo, resume=resume_dir is not None, dist=dist)
    except TrainingStopped:
        sys.exit(130)
    finally:
        dist.close()


@click.group(cls=OneLineGroup, context_settings={"max_content_width": 120})
def analyze() -> None:
    """Inspect models and trained SAEs: hook points, held-out metrics, what each feature
    means (features, report), which features lie behind a behaviour (search, attribute,
    patch), and editing them while the model writes (generate, fix-test).

    SAE arguments take an SAE folder in our, SAELens's or sparsify's format, a run folder
    holding one SAE, or a hub repo id with a subfolder (EleutherAI/sae-llama-3-8b-32x/layers.10).
    The model, hook point and data come from the run's config.yaml or the SAE's files, and
    --set changes them (e.g. --set data.split=test). convert rewrites SAEs in another format."""


@analyze.command()
@config_options("model.name_or_path=meta-llama/Llama-3.1-8B")
@json_option
@one_line_errors
def layers(config: Path | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """List a model's decoder layers: the valid layers.N hook points."""
    cfg = resolve_config(config, overrides)
    from sae.models.loading import decoder_layers, load_model, model_summary

    model, _ = load_model(cfg.model)
    name, mods = decoder_layers(model)
    children = [n for n, _ in mods[0].named_children()]
    if as_json:
        click.echo(json.dumps({"model": cfg.model.name_or_path, "summary": model_summary(model), "layers_module": name,
                               "hook_points": [f"layers.{i}" for i in range(len(mods))], "sub_modules": children}))
        return
    click.echo(model_summary(model))
    click.echo(f"decoder layers: {name}[0..{len(mods) - 1}] -> hook points layers.0 .. layers.{len(mods) - 1}")
    click.echo(f"sub-modules of each layer: {', '.join(children)}")


@analyze.command()
@click.argument("run_dir", metavar="RUN_DIR")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change the run's config for this evaluation, e.g. --set data.eval_tokens=200000.")
@json_option
@one_line_errors
def evaluate(run_dir: Path, overrides: tuple[str, ...], as_json: bool) -> None:
    """Held-out metrics of a trained run's SAEs: FVU, L0, dead and dense fractions, and CE
    loss recovered, delta LM loss and KL with each SAE spliced into the model. Printed as a
    table and written to metrics.json beside each SAE. RUN_DIR may also be any SAE folder
    or a SAELens or sparsify run, local or on the hub."""
    from sae.evaluation.heldout import evaluate_saved_run

    results = evaluate_saved_run(run_dir, overrides, log=_log if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(results))


@analyze.command()
@click.argument("src", metavar="SRC")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["sae", "saelens", "sparsify"]), required=True,
              help="Format to write: sae (ours), saelens, or sparsify (TopK SAEs only; one folder per hook point).")
@click.option("--hook", default=None, metavar="HOOK",
              help="Hook point to record, for SAEs whose files name none (e.g. layers.12).")
@click.option("--overwrite", is_flag=True, help="Write into DST even if it exists and is not empty.")
@json_option
@one_line_errors
def convert(src: str, dst: Path, fmt: str, hook: str | None, overwrite: bool, as_json: bool) -> None:
    """Rewrite the SAE (or every SAE of the run) at SRC in another format under DST.

    SRC is an SAE folder or run in any format, or a hub repo id with a subfolder. One SAE
    is written to DST itself, a run's SAEs to sub-folders of the same names; sparsify
    names each SAE's folder after its hook point (DST/layers.10/). Our files converted to
    SAELens or sparsify and back are the same files, tensors bit for bit.

    \b
        python analyze.py convert checkpoints/demo checkpoints/demo-saelens --format saelens
        python analyze.py convert EleutherAI/sae-llama-3-8b-32x/layers.10 checkpoints/llama-l10 --format sae
    """
    from sae.formats import convert as convert_saes
    from sae.formats.hook_names import to_ours

    written = convert_saes(src, dst, fmt, hook=(to_ours(hook) or hook) if hook else None, overwrite=overwrite,
                           log=_log if as_json else click.echo)
    if as_json:
        click.echo(json.dumps({"format": fmt, "written": {name: str(folder) for name, folder in written.items()}}))


# ---- the analyzer: features, search, report ---------------------------------------------



def target_options(fn: Callable) -> Callable:
    """SAE argument, --hook and --set, shared by the feature commands."""
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Change the model or data config, e.g. --set data.split=test --set model.device=cuda:1.")(fn)
    fn = click.option("--sae-dtype", type=click.Choice(["float32", "bfloat16", "float16", "float64"]),
                      default="float32", show_default=True,
                      help="Dtype the SAE computes in (bfloat16 halves a wide SAE's memory on a GPU).")(fn)
    fn = click.option("--override-hook", is_flag=True,
                      help="Read --hook even though the SAE's files name another hook point.")(fn)
    fn = click.option("--hook", default=None, metavar="HOOK",
                      help="Hook point the SAE reads, when its files name none we can map (e.g. layers.12).")(fn)
    return click.argument("sae_path", metavar="SAE", type=click.Path(path_type=Path))(fn)


def stats_options(fn: Callable) -> Callable:
    """Options of the feature-statistics pass, shared by `features` and `report`."""
    fn = click.option("--recompute", is_flag=True, help="Scan the data again even if cached statistics exist.")(fn)
    fn = click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                      help="Where statistics are cached (default: SAE/features/).")(fn)
    fn = click.option("--examples", type=click.IntRange(1), default=20, show_default=True,
                      help="Top-activating examples kept per feature.")(fn)
    return click.option("--tokens", type=click.IntRange(1), default=2**20, show_default=True,
                        help="Tokens of data.dataset [data.split] to scan for statistics.")(fn)


def _log(line: str) -> None:
    """Progress lines go to stderr, so stdout holds only the answer (pure JSON with --json)."""
    click.echo(line, err=True)


def open_sae(sae_path, overrides, hook, override_hook, sae_dtype):
    """The SAE under analysis with its model (``open_target``), saying which hook it reads."""
    from sae.analysis.target import open_target

    target = open_target(sae_path, overrides, hook, sae_dtype=sae_dtype, override_hook=override_hook)
    _log(f"SAE {target.folder} ({target.format}) at {target.hook} of {target.cfg.model.name_or_path}")
    return target


def _load_stats(sae_path, hook, override_hook, overrides, sae_dtype, tokens, examples, cache_dir, recompute):
    from sae.analysis.feature_stats import StatsSettings
    from sae.analysis.target import cached_feature_stats

    settings = StatsSettings(tokens=tokens, top_examples=examples)  # bad values fail before the model loads
    if cache_dir is not None and cache_dir.exists() and not cache_dir.is_dir():
        raise ConfigError(f"--cache-dir: {str(cache_dir)!r} is a file, not a folder")
    target = open_sae(sae_path, overrides, hook, override_hook, sae_dtype)
    return target, cached_feature_stats(target, settings, cache_dir, recompute, log=_log)


def _show(text: str) -> str:
    """A token as the terminal shows it: newlines and tabs visible."""
    return text.replace("\n", "↵").replace("\t", "⇥")


def _example_text(ex: dict) -> str:
    """The example's context on one line, its token in [[ ]]."""
    return "".join(f"[[{_show(t)}]]" if i == ex["centre"] else _show(t) for i, t in enumerate(ex["tokens"]))


def _example_line(ex: dict) -> str:
    return f"{ex['activation']:>9.3f}  {_example_text(ex)}"


def _print_feature(r: dict) -> None:
    click.echo(f"feature {r['feature']}: fires on {r['density']:.3%} of tokens ({r['fires']:,}), "
               f"max {r['max']:.3f}, mean when firing {r['mean']:.3f}")
    for key in ("promoted", "suppressed"):
        if key in r:
            click.echo(f"  {key + ':':<12}" + "  ".join(f"{_show(t['token'])!r} {t['logit']:+.3f}" for t in r[key]))
    if "nearest" in r:
        click.echo(f"  {'nearest:':<12}" + "  ".join(f"{n['feature']} ({n['cosine']:.2f})" for n in r["nearest"]))
    click.echo("  top examples (activation, [[token]] in context):")
    for ex in r["top_examples"]:
        click.echo("  " + _example_line(ex))
    bins = r["quantile_bins"]
    for b, group in enumerate(bins):
        if group:
            click.echo(f"  quantile bin {b + 1} of {len(bins)} ({b * 100 // len(bins)}-{(b + 1) * 100 // len(bins)}% "
                       "of firings by activation):")
            for ex in group:
                click.echo("  " + _example_line(ex))


SORTS = {"density": lambda s: s.density, "max": lambda s: s.act_max.double(), "mean": lambda s: s.mean_act.double()}


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


# Tokens scanned for top tokens when the SAE has no cached statistics: a first look that
# takes a minute or two on a laptop, not the full --tokens scan of `features`.
TOP_TOKENS_SCAN = 2**17


def chat_options(reply: bool = False) -> Callable:
    """--chat and --system (and for commands that read replies, --user): the prompt format."""
    def add(fn: Callable) -> Callable:
        if reply:
            fn = click.option("--user", "chat_user", default=None, metavar="TEXT",
                              help="With --chat: the user's turn before each reply (default: none).")(fn)
        fn = click.option("--system", default=None, metavar="TEXT",
                          help="With --chat: the system prompt (default: the template's own).")(fn)
        what = ("each prompt is the assistant's reply, and features are read on its tokens only" if reply else
                "each prompt is the user's turn, and the model continues as the assistant")
        return click.option("--chat", is_flag=True, help=f"Use the tokenizer's chat template: {what}.")(fn)
    return add


def _prompt_format(chat: bool, system: str | None, user: str | None = None):
    from sae.data.prompt_format import PromptFormat

    return PromptFormat(chat=chat, system=system, user=user)


def top_tokens_option(fn: Callable) -> Callable:
    """--no-top-tokens, for the commands that list feature ids (search, attribute, fix-test)."""
    return click.option("--no-top-tokens", is_flag=True,
                        help="List feature ids without their top-activating tokens (these come from the SAE's "
                             f"cached feature statistics, else from a scan of {TOP_TOKENS_SCAN:,} tokens, "
                             "cached for next time).")(fn)


def _feature_tokens(target, features, no_top_tokens: bool) -> dict[int, list[str]] | None:
    """Each listed feature's top-activating tokens, or None when --no-top-tokens."""
    if no_top_tokens:
        return None
    from sae.analysis.target import feature_top_tokens

    return feature_top_tokens(target, list(dict.fromkeys(features)), tokens=TOP_TOKENS_SCAN, log=_log)


def _tokens_cell(tokens: dict[int, list[str]] | None, f: int) -> str:
    """Feature f's top tokens as the last column: quoted, newlines visible; '' when off."""
    if tokens is None:
        return ""
    return "  " + (" ".join(repr(_show(t)) for t in tokens[f]) or "(never fired in the scan)")


def _with_tokens(row: dict, tokens: dict[int, list[str]] | None) -> dict:
    """A feature's JSON row with its top tokens added (unchanged when --no-top-tokens)."""
    return row if tokens is None else {**row, "top_tokens": tokens[row["feature"]]}


def _print_text_hits(hits, tokens: dict[int, list[str]] | None) -> None:
    """`search --text` as text: the ranking (with top tokens), then each token's strongest features."""
    focus_text = "".join(hits.tokens[i] for i in hits.focus)
    click.echo(f"features firing on {_show(focus_text)!r} (max activation over {len(hits.focus)} tokens):")
    if tokens is not None:
        click.echo(f"  {'feature':>8} {'max act':>9}  top tokens")
    for f, v in hits.ranking:
        click.echo(f"  {f:>8} {v:>9.3f}{_tokens_cell(tokens, f)}")
    click.echo("per token (strongest features):")
    for i, (t, row) in enumerate(zip(hits.tokens, hits.per_token)):
        mark = "*" if i in hits.focus else " "
        feats = "  ".join(f"{f}:{v:.2f}" for f, v in row[:6]) or "-"
        click.echo(f" {mark}{_show(t)!r:>16} {feats}")


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
                "architecture": target.sae.architecture, "features": cfg.num_latents, "d_in": cfg.d_in,
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



# ---- interventions: generate, fix-test -----------------------------------------------------

def edit_options(fn: Callable) -> Callable:
    """--ablate/--clamp/--scale/--steer: the feature edits of an intervention."""
    fn = click.option("--steer", multiple=True, metavar="F:A",
                      help="Add A times feature F's decoder direction, e.g. --steer 99:+8 (repeatable).")(fn)
    fn = click.option("--scale", multiple=True, metavar="F:S",
                      help="Multiply feature F by S, e.g. --scale 7:0.5 (repeatable).")(fn)
    fn = click.option("--clamp", multiple=True, metavar="F:C",
                      help="Pin feature F to C, keeping the SAE error, e.g. --clamp 7:10 (repeatable).")(fn)
    return click.option("--ablate", default=None, metavar="F,F,...",
                        help="Zero these features (keeping the SAE error term), e.g. --ablate 12,345.")(fn)


def sampling_options(fn: Callable) -> Callable:
    fn = click.option("--seed", type=int, default=0, show_default=True,
                      help="Sampling seed; baseline and intervened runs draw the same random numbers.")(fn)
    fn = click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling threshold.")(fn)
    fn = click.option("--temperature", type=float, default=1.0, show_default=True, help="0 = greedy.")(fn)
    return click.option("--max-new-tokens", type=int, default=40, show_default=True,
                        help="Tokens generated per continuation.")(fn)


def _prompts(prompt: tuple[str, ...], prompts_file: Path | None) -> list[str]:
    from sae.analysis.feature_search import read_prompts

    if bool(prompt) == (prompts_file is not None):
        raise ConfigError("give prompts with --prompt TEXT (repeatable) or --prompts FILE, not both")
    return list(prompt) if prompt else read_prompts(prompts_file, "--prompts")


def _columns(left: str, right: str, width: int) -> list[str]:
    """Two texts side by side, wrapped to ``width`` characters each."""
    import itertools
    import textwrap

    wrap = lambda t: textwrap.wrap(t.replace("\n", " ↵ "), width) or [""]  # noqa: E731
    return [f"{a:<{width}} | {b}" for a, b in itertools.zip_longest(wrap(left), wrap(right), fillvalue="")]


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

    from sae.activations.harvest import special_token_ids
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


# ---- activation patching -------------------------------------------------------------------

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


def _top_edits(ablate_top: int | None, steer_top: str | None) -> dict:
    """--ablate-top / --steer-top as {edit kind: (how many of the picked features, steering amount)}."""
    from sae.interventions.edits import parse_feature_edits

    top = {}
    if ablate_top is not None:
        top["ablate"] = (ablate_top, None)
    if steer_top is not None:
        (k, amount), = [(e.feature, e.alpha) for e in parse_feature_edits(steer=[steer_top])]
        if k < 1:
            raise ConfigError(f"--steer-top: {steer_top!r} steers no feature; K must be at least 1")
        top["steer"] = (k, amount)
    return top


def _rank_features(target, texts, contrast, answer, wrong, fmt) -> tuple[list[int], str]:
    """Features ranked for --ablate-top / --steer-top, by contrast search or attribution, and how.
    In chat format the contrast files hold assistant replies, as for ``search --chat``."""
    if contrast is not None:
        from sae.analysis.feature_search import contrast_search, read_prompts

        return contrast_search(target, read_prompts(contrast[0], "--contrast TARGET"),
                               read_prompts(contrast[1], "--contrast BASELINE"), fmt=fmt).ranking("effect"), "contrast"
    from sae.interventions.attribution import attribute as run_attribution

    return (run_attribution(target.model, target.tokenizer, target.sae, target.hook, texts,
                            _metric(target.tokenizer, answer, wrong), fmt=fmt).ranking("up"),
            f"attribution to {answer!r}")


def _print_fix_test(result, hook: str, edits, tokens: dict[int, list[str]] | None, neutral, as_json: bool) -> None:
    """fix-test's answer: JSON, or the intervention, its features' top tokens and the table."""
    features = _edited_features(edits)
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


def _edited_features(edits) -> list[int]:
    """The features an intervention's edits touch, in order, each once."""
    from sae.interventions.edits import Steer

    found = []
    for e in edits:
        found += [e.feature] if isinstance(e, Steer) else list(getattr(e, "features", ()))
    return list(dict.fromkeys(f for f in found if f is not None))


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

    from sae.atomic_io import check_output_path, write_output
    from sae.interventions.edits import Ablate, Edit, Steer, parse_feature_edits
    from sae.interventions.fix_test import fix_test
    from sae.interventions.scorers import load_scorer
    from sae.models.generation import Sampling

    texts = _prompts(prompt, prompts_file)
    edits = parse_feature_edits(ablate, clamp, scale, steer)
    top = _top_edits(ablate_top, steer_top)
    picks = "--ablate-top / --steer-top"
    if top and contrast is None and answer is None:
        raise ConfigError(f"{picks}: say how to pick the features: --contrast TARGET BASELINE or --answer TOKEN")
    if not top and (contrast is not None or answer is not None):
        raise ConfigError(f"--contrast / --answer pick features for {picks}; give one of them")
    if not edits and not top:
        raise ConfigError("fix-test: no intervention; give --ablate/--clamp/--scale/--steer, --ablate-top K "
                          "or --steer-top K:A")
    if html_path is not None:
        check_output_path(html_path, "--html")
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    fmt = _prompt_format(chat, system)
    scorer = load_scorer(scorer_spec)
    target = open_sae(sae_path, overrides, hook, override_hook, sae_dtype)
    log = _log
    if top:
        ranking, how = _rank_features(target, texts, contrast, answer, wrong, fmt)
        if "ablate" in top:
            edits.append(Ablate(ranking[:top["ablate"][0]]))
        if "steer" in top:
            k, amount = top["steer"]
            edits += [Steer(f, amount) for f in ranking[:k]]
    edit = Edit(target.sae, target.hook, edits)
    edit.check()   # before top tokens, which index the features
    tokens = _feature_tokens(target, _edited_features(edits), no_top_tokens)
    if top:
        picked = ranking[:max(k for k, _ in top.values())]
        label = str if tokens is None else (lambda f: f"{f} ({_tokens_cell(tokens, f).strip()})")
        log(f"top features by {how}: {', '.join(map(label, picked))}")
    neutral = _neutral_contexts(target, neutral_file, neutral_tokens)
    result = fix_test(target.model, target.tokenizer, texts, [edit], scorer, samples, sampling, threshold, neutral,
                      fmt=fmt)
    if html_path is not None:
        write_output(html_path, result.html(f"Fix test: {', '.join(_describe_edit(e) for e in edits)} "
                                            f"at {target.hook}"), "--html")
        log(f"wrote {html_path}")
    _print_fix_test(result, target.hook, edits, tokens, neutral, as_json)


def _neutral_contexts(target, neutral_file, tokens: int) -> list:
    """Contexts of neutral text for the KL cost: the file's lines, or the data's held-out split."""
    import torch

    from sae.models.generation import prompt_token_ids

    if tokens == 0:
        return []
    if neutral_file is not None:
        from sae.analysis.feature_search import read_prompts

        contexts, total = [], 0
        for line in read_prompts(neutral_file, "--neutral"):
            ids = prompt_token_ids(target.tokenizer, line)[:target.cfg.data.context_tokens]
            contexts.append(torch.tensor(ids))
            total += len(ids)
            if total >= tokens:
                break
        return contexts
    d = target.cfg.data
    if d.eval_split is None:
        _log("no KL cost: data.eval_split is null and no --neutral file was given")
        return []
    from dataclasses import replace

    from sae.activations.stream import contexts_for

    cfg = replace(target.cfg, data=replace(d, split=d.eval_split, token_budget=tokens))
    return [row for batch in contexts_for(cfg, target.tokenizer) for row in batch]
