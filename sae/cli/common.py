"""What the commands share: one-line errors, the config, SAE, chat and edit options,
progress lines, and how top tokens are printed beside feature ids."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import click

from sae.config import RunConfig, load_config
from sae.errors import ConfigError


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
        click.echo(
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, chain=False)),
            err=True,
        )


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON instead of text (for scripts)."
)


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
        fn = click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="KEY=VALUE",
            help=f"Override one config key, e.g. --set {example} (repeatable).",
        )(fn)
        return click.argument(
            "config", required=False, type=click.Path(dir_okay=False, path_type=Path)
        )(fn)

    return add


def resolve_config(config: Path | None, overrides: tuple[str, ...]) -> RunConfig:
    """CONFIG if given, else the built-in defaults (a timestamped run folder, no activation
    cache: nothing shared with the demo's configs/demo.yaml), with the overrides applied."""
    return load_config(config, overrides)


def target_options(fn: Callable) -> Callable:
    """SAE argument, --hook and --set, shared by the feature commands."""
    fn = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Change the model or data config, e.g. --set data.split=test --set model.device=cuda:1.",
    )(fn)
    fn = click.option(
        "--sae-dtype",
        type=click.Choice(["float32", "bfloat16", "float16", "float64"]),
        default="float32",
        show_default=True,
        help="Dtype the SAE computes in (bfloat16 halves a wide SAE's memory on a GPU).",
    )(fn)
    fn = click.option(
        "--override-hook",
        is_flag=True,
        help="Read --hook even though the SAE's files name another hook point.",
    )(fn)
    fn = click.option(
        "--hook",
        default=None,
        metavar="HOOK",
        help="Hook point the SAE reads, when its files name none we can map (e.g. layers.12).",
    )(fn)
    return click.argument("sae_path", metavar="SAE", type=click.Path(path_type=Path))(fn)


def stats_options(fn: Callable) -> Callable:
    """Options of the feature-statistics pass, shared by `features` and `report`."""
    fn = click.option(
        "--recompute", is_flag=True, help="Scan the data again even if cached statistics exist."
    )(fn)
    fn = click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Where statistics are cached (default: SAE/features/).",
    )(fn)
    fn = click.option(
        "--examples",
        type=click.IntRange(1),
        default=20,
        show_default=True,
        help="Top-activating examples kept per feature.",
    )(fn)
    return click.option(
        "--tokens",
        type=click.IntRange(1),
        default=2**20,
        show_default=True,
        help="Tokens of data.dataset [data.split] to scan for statistics.",
    )(fn)


def log(line: str) -> None:
    """Progress lines go to stderr, so stdout holds only the answer (pure JSON with --json)."""
    click.echo(line, err=True)


# Tokens scanned for top tokens when the SAE has no cached statistics: a first look that
# takes a minute or two on a laptop, not the full --tokens scan of `features`. Spelled out
# here, not imported from sae.analysis.target, since --no-top-tokens' help needs it before
# torch is imported.
TOP_TOKENS_SCAN = 2**17


def chat_options(reply: bool = False) -> Callable:
    """--chat and --system (and for commands that read replies, --user): the prompt format."""

    def add(fn: Callable) -> Callable:
        if reply:
            fn = click.option(
                "--user",
                "chat_user",
                default=None,
                metavar="TEXT",
                help="With --chat: the user's turn before each reply (default: none).",
            )(fn)
        fn = click.option(
            "--system",
            default=None,
            metavar="TEXT",
            help="With --chat: the system prompt (default: the template's own).",
        )(fn)
        what = (
            "each prompt is the assistant's reply, and features are read on its tokens only"
            if reply
            else "each prompt is the user's turn, and the model continues as the assistant"
        )
        return click.option(
            "--chat", is_flag=True, help=f"Use the tokenizer's chat template: {what}."
        )(fn)

    return add


def top_tokens_option(fn: Callable) -> Callable:
    """--no-top-tokens, for the commands that list feature ids (search, attribute, fix-test)."""
    return click.option(
        "--no-top-tokens",
        is_flag=True,
        help="List feature ids without their top-activating tokens (these come from the SAE's "
        f"cached feature statistics, else from a scan of {TOP_TOKENS_SCAN:,} tokens, "
        "cached for next time).",
    )(fn)


def show_token(text: str) -> str:
    """A token as the terminal shows it: newlines and tabs visible."""
    return text.replace("\n", "↵").replace("\t", "⇥")


def tokens_text(tokens: list[str]) -> str:
    """A feature's top tokens on one line: quoted, newlines visible."""
    return " ".join(repr(show_token(t)) for t in tokens) or "(never fired in the scan)"


def tokens_cell(row: dict) -> str:
    """A listed feature's top tokens as the last column of its row; '' when the listing
    has none (--no-top-tokens)."""
    return "  " + tokens_text(row["top_tokens"]) if "top_tokens" in row else ""


def edit_options(fn: Callable) -> Callable:
    """--ablate/--clamp/--scale/--steer/--edits: the feature edits of an intervention."""
    fn = click.option(
        "--edits",
        "edits_file",
        type=click.Path(path_type=Path),
        default=None,
        metavar="FILE",
        help="YAML of edits, e.g. {ablate: [12], clamp: {7: 10}, steer: {99: 8}} "
        "(the explorer's export; adds to the options above).",
    )(fn)
    fn = click.option(
        "--steer",
        multiple=True,
        metavar="F:A",
        help="Add A times feature F's decoder direction, e.g. --steer 99:+8 (repeatable).",
    )(fn)
    fn = click.option(
        "--scale",
        multiple=True,
        metavar="F:S",
        help="Multiply feature F by S, e.g. --scale 7:0.5 (repeatable).",
    )(fn)
    fn = click.option(
        "--clamp",
        multiple=True,
        metavar="F:C",
        help="Pin feature F to C, keeping the SAE error, e.g. --clamp 7:10 (repeatable).",
    )(fn)
    return click.option(
        "--ablate",
        default=None,
        metavar="F,F,...",
        help="Zero these features (keeping the SAE error term), e.g. --ablate 12,345.",
    )(fn)


def sampling_options(fn: Callable) -> Callable:
    fn = click.option(
        "--seed",
        type=int,
        default=0,
        show_default=True,
        help="Sampling seed; baseline and intervened runs draw the same random numbers.",
    )(fn)
    fn = click.option(
        "--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling threshold."
    )(fn)
    fn = click.option(
        "--temperature", type=float, default=1.0, show_default=True, help="0 = greedy."
    )(fn)
    return click.option(
        "--max-new-tokens",
        type=int,
        default=40,
        show_default=True,
        help="Tokens generated per continuation.",
    )(fn)
