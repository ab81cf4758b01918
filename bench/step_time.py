"""Median time of one ``Trainer.step`` on random activations, to compare two checkouts.

    python bench/step_time.py                                   # this tree
    (cd /other/checkout && PYTHONPATH=. python /this/bench/step_time.py)

d = 256, 2048 latents, k = 32, 4096-token batches: 3 warm-up steps, then the median of 15
(each waits for its loss). Run the trees alternately, a few rounds, and compare medians:
one process per round, so neither tree warms the other's caches.
"""

from __future__ import annotations

import statistics
import time

import torch

from sae.config import load_config

try:
    from sae.training.trainer import Trainer
except ImportError:  # checkouts before the layout of issue 17
    from sae.trainer import Trainer


def main() -> None:
    cfg = load_config(
        None,
        ["sae.expansion_factor=8", "sae.k=32", "train.batch_tokens=4096", "train.warmup_steps=5"],
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg, {"layers.2": 256}, total_steps=1000)
    xs = [torch.randn(4096, 256) for _ in range(4)]
    for i in range(3):
        trainer.step({"layers.2": xs[i % 4]})
    times = []
    for i in range(15):
        start = time.perf_counter()
        float(trainer.step({"layers.2": xs[i % 4]})["layers.2"]["loss"])
        times.append(time.perf_counter() - start)
    print(f"median step: {statistics.median(times) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
