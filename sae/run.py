"""One training run from a RunConfig, end to end: model, activations, training, saving,
held-out evaluation. The CLI (``train.py``) is a thin wrapper around ``train_run``."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.activations import activation_batches, contexts_for, make_harvester
from sae.architectures import SparseAutoencoder
from sae.atomic_io import write_text_atomic
from sae.config import RunConfig, config_from_dict, read_yaml, to_dict, to_yaml
from sae.data import load_text_dataset
from sae.errors import ConfigError
from sae.metrics import Metrics
from sae.models import load_model, model_summary
from sae.splice import splice_metrics
from sae.trainer import TensorBoardLogger, Trainer


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


def eval_config(cfg: RunConfig) -> RunConfig:
    """The run's config pointed at the held-out split and its token count."""
    values = to_dict(cfg)
    values["data"].update(split=cfg.data.eval_split, token_budget=cfg.data.eval_tokens)
    values["train"]["batch_tokens"] = min(cfg.train.batch_tokens, cfg.data.eval_tokens)
    values["harvest"]["cache_dir"] = None
    return config_from_dict(values)


def evaluate_run(cfg: RunConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 saes: dict[str, SparseAutoencoder]) -> dict[str, dict]:
    """Held-out metrics per hook: FVU, L0, dead, dense, and the splice metrics."""
    ecfg = eval_config(cfg)
    metrics = {hook: Metrics(sae) for hook, sae in saes.items()}
    for acts in make_harvester(ecfg, model, tokenizer):
        for hook, x in acts.items():
            metrics[hook].update(x)
    results = {}
    for hook, m in metrics.items():
        sae = saes[hook]
        results[hook] = {**m.result(), "splice": splice_metrics(
            model, tokenizer, hook, lambda x, sae=sae: sae(x.float()), contexts_for(ecfg, tokenizer))}
    return results


def train_run(cfg: RunConfig, log: Callable[[str], None] = print) -> Path:
    """Harvest, train, save and evaluate as ``cfg`` says; returns the run folder."""
    run_dir = run_dir_for(cfg)
    d, h = cfg.data, cfg.harvest
    model, tokenizer = load_model(cfg.model)
    log(f"model: {cfg.model.name_or_path} -> {model_summary(model)}")
    if d.eval_split is not None:  # a missing held-out split should stop the run now, not after training
        try:
            load_text_dataset(d.dataset, d.eval_split, d.text_column, d.subset, d.streaming)
        except ConfigError as e:
            raise ConfigError(str(e).replace("data.split:", "data.eval_split:", 1)) from None
    batches = iter(activation_batches(cfg, model, tokenizer))  # checks hooks, data and cache before any work
    log(f"data: {d.dataset} [{d.split}], column {d.text_column!r}, {d.token_budget:,} tokens "
        f"in contexts of {d.context_tokens}; hooks: {', '.join(cfg.hooks)}")
    start = time.perf_counter()
    first = next(batches, None)
    if first is None:
        raise ConfigError(f"data: fewer activation vectors than one batch (train.batch_tokens = "
                          f"{cfg.train.batch_tokens}) came out of {d.dataset}; raise data.token_budget or use more data")
    save_run_config(cfg, run_dir)  # the data produced activations: only now is this a run worth a folder
    log(f"run folder: {run_dir} (resolved config in config.yaml)")
    # Special tokens are dropped, so slightly fewer batches than this arrive; the schedule
    # then ends a few percent before its final decay.
    total_steps = d.token_budget * h.cache_epochs // cfg.train.batch_tokens
    trainer = Trainer(cfg, {hook: x.shape[1] for hook, x in first.items()}, total_steps,
                      next(model.parameters()).device)
    logger = TensorBoardLogger(run_dir / "tensorboard") if cfg.output.tensorboard else None
    try:
        trainer.fit(itertools.chain([first], batches), log_every=cfg.output.log_every_steps, on_log=logger)
    finally:
        if logger is not None:
            logger.close()
    seconds = time.perf_counter() - start
    log(f"harvested and trained {trainer.step_count} steps on {trainer.tokens_seen:,} tokens per hook "
        f"point in {seconds:.0f} s ({trainer.tokens_seen / seconds:,.0f} tokens/s)")
    for hook, sae in trainer.saes.items():
        sae.save(run_dir / hook, metadata={"model_name": cfg.model.name_or_path, "hook_name": hook,
                                           "context_size": d.context_tokens, "dataset_path": d.dataset})
    if d.eval_split is None:
        log(f"saved to {run_dir}; no evaluation (data.eval_split is null)")
        return run_dir
    results = evaluate_run(cfg, model, tokenizer, trainer.saes)
    log(f"held-out metrics ({d.eval_split} split; CE recovered, delta LM loss and KL with the SAE "
        "spliced into the model):")
    log(f"  {'hook':<16} {'FVU':>8} {'L0':>7} {'dead':>7} {'dense':>7} {'CE rec.':>8} {'dLM':>8} {'KL':>8} {'tokens':>8}")
    for hook, r in results.items():
        write_text_atomic(run_dir / hook / "metrics.json", json.dumps(r, indent=1) + "\n")
        sp = r["splice"]
        log(f"  {hook:<16} {r['fvu']:>8.4f} {r['l0']:>7.1f} {r['dead_fraction']:>7.1%} {r['dense_fraction']:>7.1%} "
            f"{sp['ce_loss_recovered']:>8.3f} {sp['delta_lm_loss']:>8.4f} {sp['kl']:>8.4f} {r['tokens']:>8,}")
    log(f"saved to {run_dir}/<hook>/ (cfg.json, sae_weights.safetensors, metrics.json)")
    return run_dir
