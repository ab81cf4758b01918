"""Scaling of a whole training run (harvest + train) from 1 to N processes.

    python bench/distributed.py --procs 1,2 --threads 1 --tokens 200000
    python bench/distributed.py --procs 1,8 --threads 0 --config configs/llama3.1-8b-topk.yaml  # GPUs

Each configuration is one `train.py` run (under `torchrun --nproc_per_node N` for N > 1)
on the same config; the number is the run's own "tokens/s" line (harvest and training,
model load and evaluation excluded). ``--threads`` sets OMP_NUM_THREADS per process (0:
leave it). Runs are interleaved over ``--rounds`` and the median is reported.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(
    procs: int, threads: int, mode: str, config: str | None, overrides: list[str], out: Path
) -> float:
    name = f"p{procs}-{mode}-{len(list(out.glob('*')))}"
    args = [
        "train.py",
        *([config] if config else []),
        "--set",
        f"output.root={out}",
        "--set",
        f"output.run_name={name}",
        "--set",
        "output.tensorboard=false",
        "--set",
        "data.eval_split=null",
        "--set",
        f"distributed.mode={mode}",
        *[a for o in overrides for a in ("--set", o)],
    ]
    cmd = (
        [sys.executable, *args]
        if procs == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(procs),
            "--master_port",
            str(29600 + procs),
            *args,
        ]
    )
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    found = re.search(r"\(([\d,]+) tokens/s\)", result.stdout)
    if result.returncode != 0 or not found:
        raise SystemExit(
            f"run failed ({' '.join(cmd)}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    return float(found.group(1).replace(",", ""))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--procs", default="1,2", help="process counts to compare")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process (0: unset)")
    p.add_argument("--modes", default="data", help="distributed.mode values for N > 1")
    p.add_argument("--config", default=None)
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    overrides = [
        f"data.token_budget={a.tokens}",
        "harvest.cache_dir=null",
        "harvest.cache_epochs=1",
        *a.overrides,
    ]
    procs = [int(n) for n in a.procs.split(",")]
    setups = [(n, m) for n in procs for m in (["data"] if n == 1 else a.modes.split(","))]
    rates: dict[tuple[int, str], list[float]] = {s: [] for s in setups}
    with tempfile.TemporaryDirectory(prefix="sae-dist-bench-") as tmp:
        for _ in range(a.rounds):
            for n, mode in setups:
                rates[(n, mode)].append(run(n, a.threads, mode, a.config, overrides, Path(tmp)))
    base = statistics.median(rates[setups[0]])
    print(
        f"{a.tokens:,} tokens, OMP_NUM_THREADS={a.threads or 'unset'} per process, median of {a.rounds} rounds"
    )
    print(f"{'processes':>9} {'mode':>8} {'tokens/s':>10} {'vs 1':>6}   rounds")
    for n, mode in setups:
        r = statistics.median(rates[(n, mode)])
        print(
            f"{n:>9} {mode:>8} {r:>10,.0f} {r / base:>6.2f}   {', '.join(f'{x:,.0f}' for x in rates[(n, mode)])}"
        )


if __name__ == "__main__":
    main()
