"""Several processes on this CPU (gloo): a data-parallel step equals one process's step on
the whole batch; sharded data; checkpoints and resume of a 2-process run."""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae.config import load_config
from sae.distributed import Dist
from sae.trainer import Trainer

D, M, N = 16, 64, 48   # width, latents, global batch rows


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, store_file, *args) in ``world`` processes joined by gloo."""
    store = tempfile.mktemp(prefix="sae-dist-")
    try:
        mp.spawn(_entry, args=(fn, world, store, args), nprocs=world, join=True)
    finally:
        if os.path.exists(store):
            os.unlink(store)


def _entry(rank, fn, world, store, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def trainer_config(arch: str):
    extra = ["sae.k=4"] if "topk" in arch else []
    return load_config(None, [f"sae.architecture={arch}", f"sae.num_latents={M}", f"train.batch_tokens={N}",
                              "train.warmup_steps=3", "train.dead_tokens=200", "train.lr=3e-3", *extra])


def batches(steps: int):
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(D, generator=g) * 3
    return [torch.randn(N, D, generator=g) * scale + 0.5 for _ in range(steps)]


STEPS = 25


def train(arch: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    cfg = trainer_config(arch)
    d = Dist(rank, world) if world > 1 else None
    trainer = Trainer(cfg, {"h": D}, STEPS, "cpu", d)
    share = N // world
    for x in batches(STEPS):
        trainer.step({"h": x[rank * share:(rank + 1) * share]})
    sae = trainer.saes["h"]
    return {**{k: v.detach().clone() for k, v in sae.state_dict().items()},
            "since_fired": trainer.since_fired["h"].clone(), "input_scale": trainer.input_scale["h"].clone(),
            "tokens": torch.tensor(trainer.tokens_seen)}


def _data_parallel_worker(rank, world, arch, out):
    torch.save(train(arch, rank, world), f"{out}.{rank}")


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_two_process_data_parallel_run_equals_one_process_on_the_whole_batch(tmp_path, arch):
    torch.set_num_threads(1)
    one = train(arch)
    spawn(_data_parallel_worker, 2, arch, str(tmp_path / "w"))
    for rank in range(2):
        two = torch.load(tmp_path / f"w.{rank}")
        assert two.keys() == one.keys()
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=f"{arch} {name} rank {rank}")
    if arch == "topk":   # some latents went unused for a while: dead tracking and AuxK took part
        assert one["since_fired"].max() > 0
