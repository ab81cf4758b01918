"""Command-line front ends: ``sae-train`` (``train.py``) and ``sae-analyze`` (``analyze.py``).

Thin wrappers: each reads a RunConfig (YAML file + ``--set KEY=VALUE`` overrides) and
calls the library. Bad input ends the command with one line, ``error: ...``, and exit
status 2.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import click

from sae.config import RunConfig, describe, load_config, to_yaml
from sae.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def _keys_epilog() -> str:
    width = max(len(key) for key, _, _ in describe())
    lines = [f"  {key:<{width}}  {default:<20} {help}" for key, default, help in describe()]
    # "\b" stops click from re-wrapping the table.
    return "\b\nConfig keys (KEY, default, meaning):\n" + "\n".join(lines)


def one_line_errors(fn: Callable) -> Callable:
    """Print ConfigError as one line (exit 2) and Ctrl-C as 'interrupted' (exit 130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def config_options(fn: Callable) -> Callable:
    """The CONFIG argument and repeatable --set option shared by every command."""
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override one config key, e.g. --set train.lr=3e-4 (repeatable).")(fn)
    return click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))(fn)


def resolve_config(config: Path | None, overrides: tuple[str, ...]) -> RunConfig:
    """CONFIG if given, else configs/demo.yaml of this checkout (or the same built-in defaults)."""
    if config is None and DEMO_CONFIG.exists():
        config = DEMO_CONFIG
    return load_config(config, overrides)


@click.command(epilog=_keys_epilog(), context_settings={"max_content_width": 120})
@config_options
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
@click.option("--resume", "resume_dir", metavar="RUN_DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Continue the interrupted run in RUN_DIR (e.g. checkpoints/demo) from its last checkpoint, "
                   "with its own config.yaml.")
@one_line_errors
def train(config: Path | None, overrides: tuple[str, ...], print_config: bool, resume_dir: Path | None) -> None:
    """Train sparse autoencoders on a language model's activations.

    CONFIG is a YAML run config (default: configs/demo.yaml, the embedded demo model on
    the built-in corpus). Any key listed below can be overridden with --set:

    \b
        python train.py configs/demo.yaml --set train.lr=3e-4 --set 'hooks=[layers.1,layers.3]'

    Ctrl-C or SIGTERM writes a checkpoint and stops; `python train.py --resume RUN_DIR`
    continues, ending exactly as an uninterrupted run would.
    """
    if resume_dir is not None and (config is not None or overrides):
        raise ConfigError("--resume: the run continues with its own config.yaml; drop CONFIG and --set")
    if resume_dir is not None:
        from sae.run import resume_config

        cfg = resume_config(resume_dir)
    else:
        cfg = resolve_config(config, overrides)
    if print_config:
        click.echo(to_yaml(cfg), nl=False)
        return
    # Imported only now: torch + transformers take seconds, and a config error should not wait.
    from sae.run import train_run
    from sae.trainer import TrainingStopped

    try:
        train_run(cfg, log=click.echo, resume=resume_dir is not None)
    except TrainingStopped:
        sys.exit(130)


@click.group(context_settings={"max_content_width": 120})
def analyze() -> None:
    """Inspect models and trained SAEs: hook points now; features, logit effects and reports
    as the analyzer lands."""


@analyze.command()
@config_options
@one_line_errors
def layers(config: Path | None, overrides: tuple[str, ...]) -> None:
    """List a model's decoder layers: the valid layers.N hook points."""
    cfg = resolve_config(config, overrides)
    from sae.models import decoder_layers, load_model, model_summary

    model, _ = load_model(cfg.model)
    name, mods = decoder_layers(model)
    click.echo(model_summary(model))
    click.echo(f"decoder layers: {name}[0..{len(mods) - 1}] -> hook points layers.0 .. layers.{len(mods) - 1}")
    children = [n for n, _ in mods[0].named_children()]
    click.echo(f"sub-modules of each layer: {', '.join(children)}")


@analyze.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change the run's config for this evaluation, e.g. --set data.eval_tokens=200000.")
@one_line_errors
def evaluate(run_dir: Path, overrides: tuple[str, ...]) -> None:
    """Held-out metrics of a trained run's SAEs: FVU, L0, dead and dense fractions, and CE
    loss recovered, delta LM loss and KL with each SAE spliced into the model. Printed as a
    table and written to metrics.json beside each SAE."""
    from sae.run import evaluate_saved_run

    evaluate_saved_run(run_dir, overrides, log=click.echo)
