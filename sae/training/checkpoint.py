"""Resumable training state: ``<run>/state/``, written atomically, read back with checks.

    state/trainer.safetensors   SAE parameters, Adam moments and steps, dead-latent
                                counters, input scales, torch RNG    (Trainer.state_dict)
    state/buffer.safetensors    the shuffling buffer's rows, slot order and RNG
                                (ShuffleBuffer.state_dict)
    state/state.json            format, the run's config, step counters, the data
                                position, and the JSON halves of both states

A run of several processes (``sae.distributed``) shares one trainer state (rank 0's: in
data-parallel mode every rank holds the same SAEs and optimizer state) and keeps each
rank's buffer and data position as ``buffer-rank<r>.safetensors``; it resumes only with
the same number of processes.

Everything is safetensors + JSON: a checkpoint is never unpickled. The SAE weights in
``<run>/<hook>/`` are rewritten at every checkpoint too, so the newest usable SAEs are
always on disk. A finished run deletes its state (the buffer alone can be gigabytes).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sae.activations.cache import first_difference
from sae.atomic_io import existing_folder, replace_folder_atomic, save_tensors
from sae.config import RunConfig
from sae.distributed import Dist
from sae.errors import CheckpointError, StorageError
from sae.training.run_folder import (
    PARTS_DIR,
    STATE_DIR,
    clear_temporaries,
    no_checkpoint,
    resumable_config,
)

FORMAT = 1


@dataclass
class Checkpoint:
    trainer_tensors: dict[str, torch.Tensor]
    trainer_meta: dict
    buffer_state: dict  # {"tensors": {...}, "meta": {...}}, as ShuffleBuffer.state_dict() returns

    @property
    def step(self) -> int:
        return self.trainer_meta["step"]


def save_checkpoint(
    run_dir: Path,
    cfg: RunConfig,
    trainer_state: tuple[dict, dict],
    buffer_state: dict,
    dist: Dist | None = None,
    per_rank: bool = False,
) -> None:
    """Replace ``run_dir/state`` with this state, atomically. With several processes every
    rank calls this: each writes its buffer (and with ``per_rank`` its own trainer state:
    latents sharded), rank 0 the rest, and rank 0 swaps the folder in."""
    dist = dist or Dist()
    tensors, meta = trainer_state
    buffer_tensors = {k: v.contiguous().cpu() for k, v in buffer_state["tensors"].items()}
    parts = run_dir / PARTS_DIR
    mine = {rank_file("buffer", dist.rank, dist.world): buffer_tensors}
    if per_rank:
        mine[rank_file("trainer", dist.rank, dist.world)] = tensors
    try:
        if dist.active:  # each rank's files go beside the state first; rank 0 moves them in
            parts.mkdir(parents=True, exist_ok=True)
            for name, t in mine.items():
                save_tensors(t, parts / f".{name}.tmp")
                os.replace(parts / f".{name}.tmp", parts / name)
        buffer_metas = dist.gather_objects(buffer_state["meta"])  # also: every part is on disk now
        trainer_metas = dist.gather_objects(meta) if per_rank else [meta]
        if dist.is_main:
            doc = _state_doc(cfg, meta, buffer_metas, trainer_metas, dist.world, per_rank)

            def fill(tmp: Path) -> None:
                if not per_rank:
                    save_tensors(tensors, tmp / "trainer.safetensors")
                if dist.active:
                    _move_parts_in(parts, tmp, dist.world, per_rank)
                else:
                    save_tensors(buffer_tensors, tmp / rank_file("buffer", 0, 1))
                (tmp / "state.json").write_text(json.dumps(doc, indent=1) + "\n")

            replace_folder_atomic(run_dir / STATE_DIR, fill)
            shutil.rmtree(parts, ignore_errors=True)
    except OSError as e:
        raise StorageError(
            f"output.root: cannot write the checkpoint in {str(run_dir)!r}: {e.strerror}"
        ) from None
    dist.barrier()


def _state_doc(
    cfg: RunConfig,
    meta: dict,
    buffer_metas: list[dict],
    trainer_metas: list[dict],
    world: int,
    per_rank: bool,
) -> dict:
    """state.json: the format, the run's resumable config, and the trainer's and each
    rank's buffer's positions."""
    doc = {
        "format": FORMAT,
        "config": resumable_config(cfg),
        "trainer": meta,
        "world_size": world,
        "trainer_per_rank": per_rank,
    }
    if per_rank:
        doc["trainers"] = trainer_metas  # each rank's SAEs (and step counters, the same)
    if world > 1:
        doc["buffers"] = buffer_metas  # one data position per rank
    else:
        doc["buffer"] = buffer_metas[0]
    return doc


def _move_parts_in(parts: Path, folder: Path, world: int, per_rank: bool) -> None:
    """Move every rank's files from ``parts`` into the new state folder."""
    for r in range(world):
        for kind in ("buffer", "trainer") if per_rank else ("buffer",):
            os.replace(parts / rank_file(kind, r, world), folder / rank_file(kind, r, world))


def rank_file(kind: str, rank: int, world: int) -> str:
    """``buffer.safetensors`` for one process, ``buffer-rank3.safetensors`` for several."""
    return f"{kind}.safetensors" if world == 1 else f"{kind}-rank{rank}.safetensors"


def load_checkpoint(run_dir: Path, cfg: RunConfig, dist: Dist | None = None) -> Checkpoint:
    """The state in ``run_dir`` (this rank's buffer, for several processes); refused in one
    line if missing, damaged, another run's, or written by another number of processes."""
    dist = dist or Dist()
    folder = existing_folder(run_dir / STATE_DIR)
    if folder is None:
        raise no_checkpoint(run_dir)
    try:
        doc = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"--resume: the checkpoint in {str(folder)!r} is damaged ({e})"
        ) from None
    world = doc.get("world_size", 1)
    if world != dist.world:
        raise CheckpointError(
            f"--resume: the checkpoint in {str(folder)!r} was written by {world} process(es), and "
            f"each kept its own data position; resume it with {world} (torchrun --nproc_per_node "
            f"{world} ..., or plain python for 1), not {dist.world}"
        )
    try:
        per_rank = doc.get("trainer_per_rank", False)
        trainer_tensors = load_file(
            str(
                folder
                / (rank_file("trainer", dist.rank, world) if per_rank else "trainer.safetensors")
            )
        )
        buffer_tensors = load_file(str(folder / rank_file("buffer", dist.rank, world)))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(
            f"--resume: the checkpoint in {str(folder)!r} is damaged ({e})"
        ) from None
    if doc.get("format") != FORMAT:
        raise CheckpointError(
            f"--resume: checkpoint format {doc.get('format')!r} in {str(folder)!r}; "
            f"this version reads format {FORMAT}"
        )
    if doc["config"] != resumable_config(cfg):
        diff = first_difference(doc["config"], resumable_config(cfg), a_has="checkpoint has")
        raise CheckpointError(
            f"--resume: the checkpoint in {str(folder)!r} belongs to another run ({diff} "
            "in config.yaml)"
        )
    buffer_meta = doc["buffers"][dist.rank] if world > 1 else doc["buffer"]
    trainer_meta = doc["trainers"][dist.rank] if per_rank else doc["trainer"]
    return Checkpoint(
        trainer_tensors, trainer_meta, {"tensors": buffer_tensors, "meta": buffer_meta}
    )


def remove_checkpoint(run_dir: Path) -> None:
    """Drop the state of a finished run, and whatever interrupted writes left."""
    for folder in (run_dir / STATE_DIR, run_dir / f".{STATE_DIR}.old"):
        shutil.rmtree(folder, ignore_errors=True)
    clear_temporaries(run_dir)
