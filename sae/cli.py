"""Command-line front ends: ``sae-train`` (``train.py``) and ``sae-analyze`` (``analyze.py``).

Thin wrappers: each reads a RunConfig (YAML file + ``--set KEY=VALUE`` overrides) and
calls the library. Bad input ends the command with one line, ``error: ...``, and exit
status 2.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from sae.atomic_io import write_text_atomic
from sae.config import RunConfig, describe, load_config, read_yaml, to_dict, to_yaml
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


def run_dir_for(cfg: RunConfig) -> Path:
    """The run folder; refused if it already holds a different run's config.

    Checked before any slow work, written (``save_run_config``) only once the first batch
    of activations exists, so a failed start leaves nothing behind.
    """
    run_dir = Path(cfg.output.root) / (cfg.output.run_name or time.strftime("run-%Y%m%d-%H%M%S"))
    saved = run_dir / "config.yaml"
    if saved.exists() and read_yaml(saved) != to_dict(cfg):
        raise ConfigError(f"output.run_name: {str(run_dir)!r} already holds another run's config; "
                          "choose another output.run_name")
    return run_dir


def save_run_config(cfg: RunConfig, run_dir: Path) -> None:
    try:
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
    except OSError as e:
        raise ConfigError(f"output.root: cannot write to {str(run_dir)!r}: {e.strerror}") from None


@click.command(epilog=_keys_epilog(), context_settings={"max_content_width": 120})
@config_options
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
@one_line_errors
def train(config: Path | None, overrides: tuple[str, ...], print_config: bool) -> None:
    """Train sparse autoencoders on a language model's activations.

    CONFIG is a YAML run config (default: configs/demo.yaml, the embedded demo model on
    the built-in corpus). Any key listed below can be overridden with --set:

    \b
        python train.py configs/demo.yaml --set train.lr=3e-4 --set 'hooks=[layers.1,layers.3]'
    """
    cfg = resolve_config(config, overrides)
    if print_config:
        click.echo(to_yaml(cfg), nl=False)
        return
    run_dir = run_dir_for(cfg)
    # Imported only now: torch + transformers take seconds, and a config error should not wait.
    import itertools
    import json

    from sae.activations import activation_batches, contexts_for, make_harvester
    from sae.metrics import Metrics
    from sae.splice import splice_metrics
    from sae.models import load_model, model_summary
    from sae.trainer import TensorBoardLogger, Trainer

    model, tokenizer = load_model(cfg.model)
    click.echo(f"model: {cfg.model.name_or_path} -> {model_summary(model)}")
    d, h = cfg.data, cfg.harvest
    batches = iter(activation_batches(cfg, model, tokenizer))  # checks hooks, data and cache before any work
    click.echo(f"data: {d.dataset} [{d.split}], column {d.text_column!r}, {d.token_budget:,} tokens "
               f"in contexts of {d.context_tokens}; hooks: {', '.join(cfg.hooks)}")
    start = time.perf_counter()
    first = next(batches, None)
    if first is None:
        raise ConfigError(f"data: fewer activation vectors than one batch (train.batch_tokens = "
                          f"{cfg.train.batch_tokens}) came out of {d.dataset}; raise data.token_budget or use more data")
    # The data produced activations: only now is this a run worth a folder.
    save_run_config(cfg, run_dir)
    click.echo(f"run folder: {run_dir} (resolved config in config.yaml)")
    device = next(model.parameters()).device
    # Special tokens are dropped, so slightly fewer batches than this arrive; the schedule
    # then ends a few percent before its final decay.
    total_steps = d.token_budget * h.cache_epochs // cfg.train.batch_tokens
    trainer = Trainer(cfg, {hook: x.shape[1] for hook, x in first.items()}, total_steps, device)
    logger = TensorBoardLogger(run_dir / "tensorboard") if cfg.output.tensorboard else None
    try:
        trainer.fit(itertools.chain([first], batches), log_every=cfg.output.log_every_steps, on_log=logger)
    finally:
        if logger is not None:
            logger.close()
    seconds = time.perf_counter() - start
    click.echo(f"harvested and trained {trainer.step_count} steps on {trainer.tokens_seen:,} tokens per hook "
               f"point in {seconds:.0f} s ({trainer.tokens_seen / seconds:,.0f} tokens/s)")
    for hook, sae in trainer.saes.items():
        sae.save(run_dir / hook, metadata={"model_name": cfg.model.name_or_path, "hook_name": hook,
                                           "context_size": d.context_tokens, "dataset_path": d.dataset})
    if d.eval_split is None:
        click.echo(f"saved to {run_dir}; no evaluation (data.eval_split is null)")
        return
    eval_cfg = cfg_with(cfg, data={"split": d.eval_split, "token_budget": d.eval_tokens})
    metrics = {hook: Metrics(sae) for hook, sae in trainer.saes.items()}
    for acts in make_harvester(eval_cfg, model, tokenizer):
        for hook, x in acts.items():
            metrics[hook].update(x)
    click.echo(f"held-out metrics ({d.eval_split} split; CE recovered, delta LM loss and KL with the SAE "
               "spliced into the model):")
    click.echo(f"  {'hook':<16} {'FVU':>8} {'L0':>7} {'dead':>7} {'dense':>7} {'CE rec.':>8} {'dLM':>8} "
               f"{'KL':>8} {'tokens':>8}")
    for hook, m in metrics.items():
        sae = trainer.saes[hook]
        r = m.result()
        r["splice"] = splice_metrics(model, tokenizer, hook, lambda x, sae=sae: sae(x.float()),
                                     contexts_for(eval_cfg, tokenizer))
        (run_dir / hook / "metrics.json").write_text(json.dumps(r, indent=1) + "\n")
        sp = r["splice"]
        click.echo(f"  {hook:<16} {r['fvu']:>8.4f} {r['l0']:>7.1f} {r['dead_fraction']:>7.1%} "
                   f"{r['dense_fraction']:>7.1%} {sp['ce_loss_recovered']:>8.3f} {sp['delta_lm_loss']:>8.4f} "
                   f"{sp['kl']:>8.4f} {r['tokens']:>8,}")
    click.echo(f"saved to {run_dir}/<hook>/ (cfg.json, sae_weights.safetensors, metrics.json)")


def cfg_with(cfg: RunConfig, **sections: dict) -> RunConfig:
    """A copy of cfg with some fields of some sections replaced (validated like any config)."""
    from sae.config import config_from_dict

    values = to_dict(cfg)
    for section, fields in sections.items():
        values[section] = {**values[section], **fields}
    return config_from_dict(values)


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
