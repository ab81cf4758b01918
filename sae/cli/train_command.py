"""``sae-train`` / ``python train.py``: train SAEs, or resume a run."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sae.cli.common import (
    OneLineCommand,
    config_options,
    one_line_errors,
    resolve_config,
)
from sae.config import describe, to_yaml
from sae.errors import ConfigError


def _keys_epilog() -> str:
    width = max(len(key) for key, _, _ in describe())
    lines = [f"  {key:<{width}}  {default:<20} {help}" for key, default, help in describe()]
    # "\b" stops click from re-wrapping the table.
    return "\b\nConfig keys (KEY, default, meaning):\n" + "\n".join(lines)


class TrainCommand(OneLineCommand):
    """--help ends with every config key. The table is made when help is asked for, not at
    import: it lists each architecture's settings, whose classes need torch."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.epilog = _keys_epilog()
        super().format_epilog(ctx, formatter)


@click.command(cls=TrainCommand, context_settings={"max_content_width": 120})
@config_options("train.lr=3e-4")
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
@click.option(
    "--resume",
    "resume_dir",
    metavar="RUN_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Continue the interrupted run in RUN_DIR (e.g. checkpoints/demo) from its last checkpoint, "
    "with its own config.yaml.",
)
@one_line_errors
def train(
    config: Path | None, overrides: tuple[str, ...], print_config: bool, resume_dir: Path | None
) -> None:
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
        raise ConfigError(
            "--resume: the run continues with its own config.yaml; drop CONFIG and --set"
        )
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

    dist = Dist.from_env(
        cfg.distributed.timeout_s, cfg.model.device
    )  # several processes under torchrun
    try:
        train_run(cfg, log=click.echo, resume=resume_dir is not None, dist=dist)
    except TrainingStopped:
        sys.exit(130)
    finally:
        dist.close()
