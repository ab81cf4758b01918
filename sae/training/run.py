"""One training run from a RunConfig, end to end: model, activations, training, saving,
held-out evaluation. The CLI (``train.py``) is a thin wrapper around ``train_run``."""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.activations.buffer import ShuffleBuffer
from sae.activations.stream import activation_batches, first_batch
from sae.architectures import SparseAutoencoder
from sae.atomic_io import write_text_atomic
from sae.config import RunConfig
from sae.data.text import describe_split, load_text_dataset
from sae.distributed import Dist
from sae.errors import ConfigError, TrainingStopped
from sae.evaluation.heldout import evaluate_run, print_metrics
from sae.folder_lock import FolderLock
from sae.formats import load_sae
from sae.models.loading import load_model, model_summary
from sae.training.checkpoint import Checkpoint, load_checkpoint, remove_checkpoint, save_checkpoint
from sae.training.run_folder import (
    STATE_DIR,
    claim_run_folder,
    discard_failed_start,
    run_dir_for,
    save_run_config,
)
from sae.training.trainer import (
    TensorBoardLogger,
    Trainer,
    log_heldout_metrics,
    set_aside_old_events,
)


def save_saes(trainer: Trainer, cfg: RunConfig, run_dir: Path) -> dict[str, SparseAutoencoder]:
    """Write each SAE, ready to use (input scale folded in), to ``run_dir/<name>`` (rank 0
    writes; with latents sharded every rank calls this, to gather them; with hook points
    split each process writes its own). Returns them."""
    saes = {name: trainer.trained_sae(name) for name in trainer.saes}
    if trainer.dist.is_main or trainer.parallel.writes_own_saes:
        for name, sae in saes.items():
            sae.save(
                run_dir / name,
                metadata={
                    "model_name": cfg.model.name_or_path,
                    "hook_name": trainer.hook_of[name],
                    "context_size": cfg.data.context_tokens,
                    "dataset_path": cfg.data.dataset,
                    "trained_steps": trainer.step_count,
                    "trained_tokens": trainer.tokens_seen,
                },
            )
    return saes


@contextlib.contextmanager
def stop_signals(log: Callable[[str], None]) -> Iterator[Callable[[], bool]]:
    """Turn the first SIGINT or SIGTERM into a request (polled through the yielded
    function) to checkpoint and stop after the current step; a second SIGINT stops at once."""
    requested = False

    def handle(signum, frame):
        nonlocal requested
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested = True
        log(
            f"\n{signal.Signals(signum).name}: stopping after this step, writing a checkpoint "
            "(Ctrl-C again to quit without one)"
        )

    previous = {}
    if (
        threading.current_thread() is threading.main_thread()
    ):  # signal handlers live in the main thread only
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handle)
    try:
        yield lambda: requested
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def train_run(
    cfg: RunConfig,
    log: Callable[[str], None] = print,
    resume: bool = False,
    dist: Dist | None = None,
) -> Path:
    """Harvest, train, save and evaluate as ``cfg`` says; returns the run folder.

    resume: continue the interrupted run in cfg's run folder from its checkpoint (use
    ``resume_config`` to get its config); it ends bit-identical to an uninterrupted run.
    dist: this process's place among several (``sae.distributed``, data parallel: each
    harvests its share of the contexts, train.batch_tokens is the total); rank 0 logs and
    writes, the others train silently.
    """
    dist = dist or Dist()
    if not dist.is_main:
        log = _silent
    if dist.active:
        if cfg.train.batch_tokens % dist.world:
            raise ConfigError(
                f"train.batch_tokens: {cfg.train.batch_tokens} does not divide over {dist.world} "
                f"processes; use a multiple of {dist.world}"
            )
        # A run name made of the time must be the same on every rank: rank 0's.
        cfg.output.run_name = dist.gather_objects(cfg.output.run_name)[0]
    run_dir = Path(cfg.output.root) / cfg.output.run_name if resume else run_dir_for(cfg)
    lock = _claim(cfg, resume, dist)
    try:
        with contextlib.ExitStack() as resources:  # closed before the folder is released
            return _train_claimed(cfg, run_dir, lock, resources, log, resume, dist)
    except Exception as e:
        if (
            lock is not None
            and not resume
            and not isinstance(e, TrainingStopped)
            and discard_failed_start(run_dir)
        ):
            log(
                f"nothing of this run was kept: no checkpoint or SAE had been written, so {run_dir} is removed"
            )
        raise
    finally:
        if lock is not None:
            lock.release()


def _claim(cfg: RunConfig, resume: bool, dist: Dist) -> FolderLock | None:
    """Rank 0 claims the run folder (``claim_run_folder``); every rank learns whether it could."""
    lock, refusal = None, None
    if dist.is_main:
        try:
            lock = claim_run_folder(cfg, resume)
        except ConfigError as e:
            if not dist.active:
                raise
            refusal = str(e)
    refusal = dist.gather_objects(refusal)[0]
    if refusal is not None:
        raise ConfigError(refusal)
    return lock


def _train_claimed(
    cfg: RunConfig,
    run_dir: Path,
    lock: FolderLock | None,
    resources: contextlib.ExitStack,
    log: Callable[[str], None],
    resume: bool,
    dist: Dist,
) -> Path:
    """``train_run`` once the run folder is this run's (``lock``: rank 0's claim); what
    holds files open (the activation cache's writer) is closed through ``resources``."""
    checkpoint = load_checkpoint(run_dir, cfg, dist) if resume else None
    model, tokenizer = load_model(replace(cfg.model, device=dist.device_setting(cfg.model.device)))
    log(f"model: {cfg.model.name_or_path} -> {model_summary(model)}")
    check_eval_split(cfg)
    # checks hooks, data and cache before any work
    buffer = activation_batches(
        cfg,
        model,
        tokenizer,
        resume=checkpoint.buffer_state if checkpoint else None,
        shard=dist.shard,
        progress=dist.is_main,
    )
    resources.callback(buffer.close)
    log(_data_line(cfg, dist))
    start = time.perf_counter()
    batches = iter(buffer)
    first = first_batch(buffer, batches, run_dir, checkpoint.step if checkpoint else None, log)
    if dist.agree(first is None):
        raise ConfigError(
            f"data: fewer activation vectors than one batch (train.batch_tokens = "
            f"{cfg.train.batch_tokens}) came out of {cfg.data.dataset}; raise data.token_budget or use more data"
        )
    trainer = _start_trainer(
        cfg, run_dir, first, next(model.parameters()).device, checkpoint, dist, log
    )
    step0 = trainer.step_count
    on_checkpoint = checkpointer(cfg, run_dir, buffer, lock)
    _fit(trainer, cfg, run_dir, itertools.chain([first], batches), on_checkpoint, log)
    steps, seconds = trainer.step_count - step0, time.perf_counter() - start
    log(
        f"harvested and trained {steps} steps on {steps * cfg.train.batch_tokens:,} tokens per hook "
        f"point in {seconds:.0f} s ({steps * cfg.train.batch_tokens / seconds:,.0f} tokens/s)"
    )
    if not (dist.is_main or trainer.parallel.every_rank_saves):  # rank 0 saves and evaluates
        return run_dir
    finish_run(cfg, run_dir, trainer, model, tokenizer, log)
    return run_dir


def _data_line(cfg: RunConfig, dist: Dist) -> str:
    """The log line that says what the run reads."""
    d = cfg.data
    return (
        f"data: {describe_split(d.dataset, d.split, d.subset)}, column {d.text_column!r}, {d.token_budget:,} tokens "
        f"in contexts of {d.context_tokens}; hooks: {', '.join(cfg.hooks)}"
        + (
            f"; {dist.world} processes, each harvesting 1 context in {dist.world}"
            if dist.active
            else ""
        )
    )


def _start_trainer(
    cfg: RunConfig,
    run_dir: Path,
    first: dict[str, torch.Tensor],
    device: torch.device,
    checkpoint: Checkpoint | None,
    dist: Dist,
    log: Callable[[str], None],
) -> Trainer:
    """The trainer for SAEs as wide as the first batch {hook: [n, d]}: restored from the
    checkpoint, or new, in which case the run folder is started (config.yaml)."""
    # Special tokens are dropped, so slightly fewer batches than this arrive; the schedule
    # then ends a few percent before its final decay.
    total_steps = cfg.data.token_budget * cfg.harvest.cache_epochs // cfg.train.batch_tokens
    trainer = Trainer(
        cfg, {hook: x.shape[1] for hook, x in first.items()}, total_steps, device, dist
    )
    if checkpoint is None and dist.is_main:
        # data and SAE settings both work: only now is this a run worth a folder
        start_run_folder(cfg, run_dir, log)
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint.trainer_tensors, checkpoint.trainer_meta)
        log(f"resuming {run_dir} after step {trainer.step_count:,} of {total_steps:,}")
    rate = ", ".join(sorted({f"{st.peak_lr:.3g}" for st in trainer.states.values()}))
    scales = {st.lr_scale for st in trainer.states.values()}
    if max(scales, default=1.0) > 1:
        times = ", ".join(f"{x:.3g}" for x in sorted(scales))
        rate += f" (the published rate x {times}, for a run this short)"
    resampling = ""
    if any(sae.resamples_dead() for sae in trainer.saes.values()):
        resampling = (
            f"; dead latents resampled every {trainer.resample_every:,} steps before step "
            f"{trainer.resample_until:,}"
            if trainer.resample_every < trainer.resample_until
            else "; no resampling: the dead window outlasts the steps before the decay"
        )
    log(
        f"schedule: {total_steps:,} steps, learning rate {rate} warmed up over "
        f"{trainer.warmup_steps:,} steps, a latent silent for {trainer.dead_tokens:,} tokens "
        f"counts as dead{resampling} (train.warmup_steps, train.lr, train.dead_tokens)"
    )
    return trainer


def _fit(
    trainer: Trainer,
    cfg: RunConfig,
    run_dir: Path,
    batches: Iterable[dict[str, torch.Tensor]],
    on_checkpoint: Callable[[Trainer], None],
    log: Callable[[str], None],
) -> None:
    """Train on ``batches`` to the end, logging to TensorBoard (rank 0); Ctrl-C or SIGTERM
    checkpoints and raises TrainingStopped."""
    dist = trainer.dist
    logger = (
        TensorBoardLogger(
            run_dir / "tensorboard",
            resumed=trainer if trainer.last_checkpoint_step is not None else None,
        )
        if cfg.output.tensorboard and dist.is_main
        else None
    )
    try:
        with stop_signals(log) as stop_requested:
            trainer.fit(
                in_step(batches, dist),
                progress=dist.is_main,
                log_every=cfg.output.log_every_steps,
                on_log=logger,
                checkpoint_every=cfg.output.checkpoint_every_steps,
                on_checkpoint=on_checkpoint,
                stop_requested=lambda: dist.agree(stop_requested()),
            )
    except TrainingStopped as e:
        log(
            f"checkpoint after step {e.step:,} written to {run_dir}/{STATE_DIR}; continue with: "
            f"python train.py --resume {run_dir}"
        )
        raise
    finally:
        if logger is not None:
            logger.close()


def finish_run(
    cfg: RunConfig,
    run_dir: Path,
    trainer: Trainer,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    log: Callable[[str], None],
) -> None:
    """After the last step: save the SAEs, measure them on held-out text (rank 0), write
    metrics.json beside each, and drop the checkpoint."""
    dist = trainer.dist
    saes = save_saes(trainer, cfg, run_dir)
    if (
        trainer.parallel.writes_own_saes
    ):  # rank 0 evaluates every SAE: the others' from their folders
        dist.barrier()
        if dist.is_main:
            device = next(model.parameters()).device
            saes = {
                name: saes[name] if name in saes else load_sae(run_dir / name, device=device)
                for name in trainer.all_saes
            }
    if not dist.is_main:  # evaluation runs no collective: the others are done
        return
    if cfg.data.eval_split is None:
        remove_checkpoint(run_dir)
        log(f"saved to {run_dir}; no evaluation (data.eval_split is null)")
        return
    results = evaluate_run(cfg, model, tokenizer, saes, trainer.all_saes)
    print_metrics(results, cfg, log)
    if cfg.output.tensorboard:
        log_heldout_metrics(run_dir / "tensorboard", results, trainer.step_count)
    for name, r in results.items():
        write_text_atomic(run_dir / name / "metrics.json", json.dumps(r, indent=1) + "\n")
    remove_checkpoint(run_dir)
    where = "<hook>/<variant>" if cfg.sweep else "<hook>"
    log(f"saved to {run_dir}/{where}/ (cfg.json, sae_weights.safetensors, metrics.json)")


def checkpointer(
    cfg: RunConfig, run_dir: Path, buffer: ShuffleBuffer, lock: FolderLock | None
) -> Callable[[Trainer], None]:
    """What the trainer calls to checkpoint: the state (``sae.training.checkpoint``) and the SAEs beside it."""

    def on_checkpoint(trainer: Trainer) -> None:
        if lock is not None:
            lock.check()  # the folder is still this run's: not deleted, not taken over
        save_checkpoint(
            run_dir,
            cfg,
            trainer.state_dict(),
            buffer.state_dict(),
            trainer.dist,
            per_rank=trainer.parallel.every_rank_saves,
        )
        if trainer.dist.is_main or trainer.parallel.every_rank_saves:
            save_saes(trainer, cfg, run_dir)

    return on_checkpoint


def start_run_folder(cfg: RunConfig, run_dir: Path, log: Callable[[str], None]) -> None:
    """Write config.yaml; set aside the curves of a finished run of the same config."""
    save_run_config(cfg, run_dir)
    log(f"run folder: {run_dir} (resolved config in config.yaml)")
    if cfg.output.tensorboard and (moved := set_aside_old_events(run_dir / "tensorboard")):
        log(
            f"this folder held a finished run of the same config: its SAEs are replaced (files beside them "
            f"are kept), its TensorBoard curves moved to {moved}"
        )


def check_eval_split(cfg: RunConfig) -> None:
    """A missing held-out split stops the run now, not after training."""
    d = cfg.data
    if d.eval_split is None:
        return
    try:
        load_text_dataset(d.dataset, d.eval_split, d.text_column, d.subset, d.streaming)
    except ConfigError as e:
        raise type(e)(str(e).replace("data.split:", "data.eval_split:", 1)) from None


def in_step(batches: Iterable, dist: Dist) -> Iterator:
    """The batches while every process still has one: shares hold slightly different
    numbers of tokens (special tokens are dropped), and all must step together."""
    if not dist.active:
        yield from batches
        return
    it = iter(batches)
    while not dist.agree((batch := next(it, None)) is None):
        yield batch


def _silent(line: str) -> None:
    """The log of ranks other than 0."""
