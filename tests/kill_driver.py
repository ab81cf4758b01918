"""Subprocess for tests/test_faults.py: a small training run that SIGKILLs itself at a
chosen point inside a checkpoint write.

    python tests/kill_driver.py ROOT KILL_AT

Starts the run ``ROOT/r`` (or resumes it when it holds a checkpoint). While a checkpoint
or the SAEs beside it are written, every file-system step (a tensor file, a rename, an
fsync, a removal) is counted; just before step ``KILL_AT`` the process kills itself with
SIGKILL, which nothing can catch or clean up after. KILL_AT = 0: never. Exit status: 0
finished, 2 refused (one ``error:`` line on stderr), killed otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from click.testing import CliRunner  # noqa: E402

import sae.atomic_io  # noqa: E402
import sae.training.checkpoint  # noqa: E402
import sae.training.run  # noqa: E402
from sae import cli  # noqa: E402

RUN = [
    "output.run_name=r",
    "output.tensorboard=false",
    "output.checkpoint_every_steps=1",
    "data.token_budget=4096",
    "data.eval_split=null",
    "train.batch_tokens=512",
    "harvest.buffer_tokens=1024",
    "train.warmup_steps=2",
    "train.dead_tokens=2000",
    "sae.expansion_factor=2",
    "hooks=[layers.1]",
]


def counting_kills(kill_at: int) -> None:
    """Wrap the file-system steps of checkpoint writes so the KILL_AT-th one never happens."""
    state = {"inside": False, "count": 0}

    def step(fn):
        def wrapped(*args, **kwargs):
            if state["inside"]:
                state["count"] += 1
                if state["count"] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return wrapped

    def writing(fn):
        def wrapped(*args, **kwargs):
            state["inside"] = True
            try:
                return fn(*args, **kwargs)
            finally:
                state["inside"] = False

        return wrapped

    for module in (sae.atomic_io, sae.training.checkpoint):
        if hasattr(module, "save_tensors"):
            module.save_tensors = step(module.save_tensors)
    sae.atomic_io.fsync_dir = step(sae.atomic_io.fsync_dir)
    os.replace, os.rename, os.fsync, os.unlink = (
        step(os.replace),
        step(os.rename),
        step(os.fsync),
        step(os.unlink),
    )
    shutil.rmtree = step(shutil.rmtree)
    sae.training.run.save_checkpoint = writing(sae.training.run.save_checkpoint)
    sae.training.run.save_saes = writing(sae.training.run.save_saes)


def main(root: Path, kill_at: int) -> int:
    if kill_at:
        counting_kills(kill_at)
    run_dir = root / "r"
    resumable = (run_dir / "state").exists() or (run_dir / ".state.old").exists()
    args = (
        ["--resume", str(run_dir)]
        if resumable
        else [*(x for kv in RUN for x in ("--set", kv)), "--set", f"output.root={root}"]
    )
    result = CliRunner().invoke(cli.train, args)
    sys.stderr.write(result.output)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2])))
