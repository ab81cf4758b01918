"""A run folder's life: naming it, claiming it for one process, checking it can be
resumed, and cleaning what crashes left in it.

    <output.root>/<output.run_name>/
        .lock             the live process that owns the folder (sae.folder_lock)
        config.yaml       the resolved config, written once the first batch exists
        state/            the checkpoint (sae.training.checkpoint); gone when the run finishes
        <hook>/           each SAE: cfg.json, sae_weights.safetensors, metrics.json
        tensorboard/      curves

Imports no torch: ``train.py --resume`` checks the folder here before the slow imports.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from sae.atomic_io import existing_folder, remove_temporaries, write_text_atomic
from sae.config import RunConfig, saved_config, to_dict, to_yaml
from sae.errors import CheckpointError, ConfigError, StorageError
from sae.folder_lock import LOCK_FILE, FolderLock, describe_holder, holder_of

STATE_DIR = "state"
PARTS_DIR = ".state-parts"  # where ranks leave their buffers for rank 0 to move into state/
CONFIG_FILE = "config.yaml"


def resumable_config(cfg: RunConfig) -> dict:
    """The settings a resumed run must share with the interrupted one: everything but the
    output section (where the run lives, how often it logs and checkpoints)."""
    values = to_dict(cfg)
    values.pop("output")
    values["distributed"].pop("timeout_s")
    return values


def run_dir_for(cfg: RunConfig) -> Path:
    """The run folder of a new run; refused if it holds another run's config or a
    checkpoint to resume. A null output.run_name becomes a timestamp, recorded in ``cfg``
    (hence in config.yaml) so ``--resume`` finds the same folder.

    Checked before any slow work, and again once claimed (``claim_run_folder``); written
    (``save_run_config``) only once the first batch of activations exists, so a failed
    start leaves nothing behind.
    """
    if cfg.output.run_name is None:
        cfg.output.run_name = time.strftime("run-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output.root) / cfg.output.run_name
    saved = run_dir / CONFIG_FILE
    if saved.exists() and resumable_config(saved_config(saved)) != resumable_config(cfg):
        raise ConfigError(
            f"output.run_name: {str(run_dir)!r} already holds another run's config; "
            "choose another output.run_name"
        )
    if existing_folder(run_dir / STATE_DIR) is not None:
        raise ConfigError(
            f"output.run_name: {str(run_dir)!r} holds an unfinished run; continue it with "
            f"--resume {run_dir}, or choose another output.run_name"
        )
    return run_dir


def resume_config(run_dir: Path) -> RunConfig:
    """The config of the run in ``run_dir``, pointed at that folder wherever it now is;
    refused in one line if the folder is missing, not a run, finished, or in use."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError(f"--resume: {str(run_dir)!r} does not exist")
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise ConfigError(
            f"--resume: {str(run_dir)!r} is not a run folder (it has no {CONFIG_FILE})"
        )
    holder = holder_of(run_dir)
    if holder is not None:
        raise ConfigError(
            f"--resume: the run in {str(run_dir)!r} is still running ({describe_holder(holder)})"
        )
    cfg = saved_config(saved)
    cfg.output.root, cfg.output.run_name = str(run_dir.parent), run_dir.name
    if existing_folder(run_dir / STATE_DIR) is None:
        if any(run_dir.rglob("metrics.json")):
            raise ConfigError(
                f"--resume: the run in {str(run_dir)!r} has already finished; its SAEs are in "
                f"{run_dir}/<hook>/"
            )
        raise no_checkpoint(run_dir)
    return cfg


def no_checkpoint(run_dir: Path) -> CheckpointError:
    return CheckpointError(
        f"--resume: {str(run_dir)!r} holds no checkpoint (a run writes one every "
        "output.checkpoint_every_steps steps and when stopped with Ctrl-C or SIGTERM)"
    )


def claim_run_folder(cfg: RunConfig, resume: bool) -> FolderLock:
    """Claim cfg's run folder for this process (created if new) and clear what interrupted
    writes left in it. A new run's folder is checked again once claimed: another process
    may have written it since ``run_dir_for`` looked."""
    run_dir = Path(cfg.output.root) / cfg.output.run_name
    lock = FolderLock(run_dir, "--resume" if resume else "output.run_name")
    try:
        if not resume:
            run_dir_for(cfg)
        clear_temporaries(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def clear_temporaries(run_dir: Path) -> None:
    """Remove the leftovers of writes a crash cut short: half-written checkpoints
    (``.state.tmp*``, each as large as a checkpoint), ranks' parts, and temporary files
    in the folder and its SAE folders (``<hook>/`` and sweeps' ``<hook>/<variant>/``)."""
    shutil.rmtree(run_dir / PARTS_DIR, ignore_errors=True)
    remove_temporaries(run_dir)
    for sub in (p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        remove_temporaries(sub)
        for variant in (p for p in sub.iterdir() if p.is_dir()):
            remove_temporaries(variant)


def save_run_config(cfg: RunConfig, run_dir: Path) -> None:
    try:
        write_text_atomic(run_dir / CONFIG_FILE, to_yaml(cfg))
    except OSError as e:
        raise StorageError(f"output.root: cannot write to {str(run_dir)!r}: {e.strerror}") from None


def discard_failed_start(run_dir: Path) -> bool:
    """After a run failed, remove the folder it created if it holds nothing to resume or
    use (no checkpoint, no SAE): only its config.yaml and curves, which would block a
    corrected rerun under the same name. True if it removed them (a start that failed
    before writing config.yaml left nothing). Call while holding the folder."""
    if (
        not (run_dir / CONFIG_FILE).exists()
        or existing_folder(run_dir / STATE_DIR) is not None
        or any(run_dir.rglob("cfg.json"))
    ):
        return False
    for entry in run_dir.iterdir():
        if entry.name != LOCK_FILE:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(
                    entry
                ) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return True
