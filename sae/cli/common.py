"""What the commands share: one-line errors, the config, SAE, chat and edit options,
and how features and examples are printed."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import click

from sae.config import RunConfig, describe, load_config
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
