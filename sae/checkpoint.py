"""Resumable training state: ``<run>/state/``, written atomically, read back with checks.

    state/trainer.safetensors   SAE parameters, Adam moments and steps, dead-latent
                                counters, input scales, torch RNG    (Trainer.state_dict)
    state/buffer.safetensors    the shuffling buffer's rows, slot order and RNG
                                (ShuffleBuffer.state_dict)
    state/state.json            format, the run's config, step counters, the data
                                position, and the JSON halves of both states

Everything is safetensors + JSON: a checkpoint is never unpickled. The SAE weights in
``<run>/<hook>/`` are rewritten at every checkpoint too, so the newest usable SAEs are
always on disk. A finished run deletes its state (the buffer alone can be gigabytes).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae.activation_cache import first_difference
from sae.atomic_io import existing_folder, replace_folder_atomic
from sae.config import RunConfig, to_dict
from sae.errors import ConfigError

STATE_DIR = "state"
FORMAT = 1


def resumable_config(cfg: RunConfig) -> dict:
    """The settings a resumed run must share with the interrupted one: everything but the
    output section (where the run lives, how often it logs and checkpoints)."""
    values = to_dict(cfg)
    values.pop("output")
    return values


@dataclass
class Checkpoint:
    trainer_tensors: dict[str, torch.Tensor]
    trainer_meta: dict
    buffer_state: dict  # {"tensors": {...}, "meta": {...}}, as ShuffleBuffer.state_dict() returns

    @property
    def step(self) -> int:
        return self.trainer_meta["step"]


def save_checkpoint(run_dir: Path, cfg: RunConfig, trainer_state: tuple[dict, dict], buffer_state: dict) -> None:
    """Replace ``run_dir/state`` with this state, atomically."""
    tensors, meta = trainer_state
    doc = {"format": FORMAT, "config": resumable_config(cfg), "trainer": meta, "buffer": buffer_state["meta"]}

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "trainer.safetensors"))
        save_file({k: v.contiguous().cpu() for k, v in buffer_state["tensors"].items()},
                  str(tmp / "buffer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(doc, indent=1) + "\n")

    try:
        replace_folder_atomic(run_dir / STATE_DIR, fill)
    except OSError as e:
        raise ConfigError(f"output.root: cannot write the checkpoint in {str(run_dir)!r}: {e.strerror}") from None


def load_checkpoint(run_dir: Path, cfg: RunConfig) -> Checkpoint:
    """The state in ``run_dir``; refused in one line if missing, damaged, or another run's."""
    folder = existing_folder(run_dir / STATE_DIR)
    if folder is None:
        raise ConfigError(f"--resume: {str(run_dir)!r} holds no checkpoint (a run writes one every "
                          "output.checkpoint_every_steps steps and when stopped with Ctrl-C or SIGTERM)")
    try:
        doc = json.loads((folder / "state.json").read_text())
        trainer_tensors = load_file(str(folder / "trainer.safetensors"))
        buffer_tensors = load_file(str(folder / "buffer.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise ConfigError(f"--resume: the checkpoint in {str(folder)!r} is damaged ({e})") from None
    if doc.get("format") != FORMAT:
        raise ConfigError(f"--resume: checkpoint format {doc.get('format')!r} in {str(folder)!r}; "
                          f"this version reads format {FORMAT}")
    if doc["config"] != resumable_config(cfg):
        diff = first_difference(doc["config"], resumable_config(cfg), a_has="checkpoint has")
        raise ConfigError(f"--resume: the checkpoint in {str(folder)!r} belongs to another run ({diff} "
                          "in config.yaml)")
    return Checkpoint(trainer_tensors, doc["trainer"], {"tensors": buffer_tensors, "meta": doc["buffer"]})


def remove_checkpoint(run_dir: Path) -> None:
    """Drop the state of a finished run."""
    for folder in (run_dir / STATE_DIR, run_dir / f".{STATE_DIR}.old"):
        shutil.rmtree(folder, ignore_errors=True)

