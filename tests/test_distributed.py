"""Several processes on this CPU (gloo): a data-parallel step equals one process's step on
the whole batch; sharded data; checkpoints and resume of a 2-process run."""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_resume import record_resamples

from sae.config import load_config
from sae.distributed import Dist, join_group, native_threads
from sae.training.parallel import LatentParallel
from sae.training.trainer import Trainer

D, M, N = 16, 64, 48  # width, latents, global batch rows


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
    join_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        fn(rank, world, *args)
    finally:
        Dist(rank, world).close()


def trainer_config(arch: str, mode: str = "data"):
    extra = ["sae.k=4"] if "topk" in arch else []
    extra += ["sae.resample_dead=true"] if arch == "relu" else []
    return load_config(
        None,
        [
            f"sae.architecture={arch}",
            f"sae.num_latents={M}",
            f"train.batch_tokens={N}",
            "train.warmup_steps=3",
            "train.dead_tokens=200",
            "train.lr=3e-3",
            f"distributed.mode={mode}",
            *extra,
        ],
    )


def batches(steps: int):
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(D, generator=g) * 3
    return [torch.randn(N, D, generator=g) * scale + 0.5 for _ in range(steps)]


STEPS = 25


def train(
    arch: str, rank: int = 0, world: int = 1, mode: str = "data", hook: str = "h"
) -> dict[str, torch.Tensor]:
    """The SAE at ``hook`` after STEPS steps, trained by this process of ``world``; every
    hook point ("h", "g") gets the same batches, offset."""
    cfg = trainer_config(arch, mode)
    d = Dist(rank, world) if world > 1 else None
    trainer = Trainer(cfg, {"h": D, "g": D}, STEPS, "cpu", d)
    share = N // world
    for x in batches(STEPS):
        mine = x[rank * share : (rank + 1) * share]
        trainer.step({"h": mine, "g": mine * 0.5 + 1})
    if hook not in trainer.saes:
        return {}
    sae = trainer.trained_sae(hook)  # the whole SAE, gathered when its latents are sharded
    since = trainer.states[hook].since_fired
    if isinstance(trainer.parallel, LatentParallel):
        since = d.gather_rows(since)
    return {
        **{k: v.detach().clone() for k, v in sae.state_dict().items()},
        "since_fired": since.clone(),
        "input_scale": trainer.states[hook].input_scale.clone(),
        "tokens": torch.tensor(trainer.tokens_seen),
    }


@pytest.fixture
def one_thread():
    """One intra-op thread, as in the spawned processes (same rounding), given back after:
    later tests compare against fresh processes, which use the default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data_parallel_worker(rank, world, arch, out, mode="data", hook="h"):
    torch.save(train(arch, rank, world, mode, hook), f"{out}.{rank}")


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_two_process_data_parallel_run_equals_one_process_on_the_whole_batch(
    tmp_path, arch, one_thread, monkeypatch
):
    renewed = record_resamples(monkeypatch)  # in the one-process run
    one = train(arch)
    spawn(_data_parallel_worker, 2, arch, str(tmp_path / "w"))
    for rank in range(2):
        two = torch.load(tmp_path / f"w.{rank}")
        assert two.keys() == one.keys()
        for name in one:
            torch.testing.assert_close(
                two[name], one[name], rtol=1e-4, atol=1e-5, msg=f"{arch} {name} rank {rank}"
            )
    if arch == "topk":  # some latents went unused for a while: dead tracking and AuxK took part
        assert one["since_fired"].max() > 0
    if arch == "relu":  # resampling took part, on the whole batch's rows in each process
        assert sum(renewed) > 0, renewed


def _threads_worker(rank, world, out):
    train("topk", rank, world)  # a trainer, its optimizers, collectives: the group is in use
    before = native_threads("gloo") + native_threads("pt_gloo")
    Dist(rank, world).close()
    Path(f"{out}.{rank}").write_text(
        json.dumps([before, native_threads("gloo") + native_threads("pt_gloo")])
    )


def test_closing_the_group_stops_its_native_threads(tmp_path):
    # Threads of a group still alive at interpreter exit aborted processes at random
    # (SIGABRT): a process that closes its group must have none left.
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux's /proc to list threads")
    spawn(_threads_worker, 2, str(tmp_path / "t"))
    for rank in range(2):
        before, after = json.loads((tmp_path / f"t.{rank}").read_text())
        assert before and after == [], f"rank {rank}: {after}"


# ---- whole runs: two processes, checkpoints, resume ----------------------------------


def small_run(root, name="r", mode="data"):
    return load_config(
        None,
        [
            f"distributed.mode={mode}",
            "hooks=[layers.1,layers.2]" if mode == "hooks" else "hooks=[layers.2]",
            f"output.root={root}",
            f"output.run_name={name}",
            "output.tensorboard=false",
            "output.log_every_steps=5",
            "output.checkpoint_every_steps=7",
            "data.token_budget=16384",
            "data.eval_split=null",
            "train.batch_tokens=512",
            "harvest.buffer_tokens=2048",
            "train.warmup_steps=2",
            "train.dead_tokens=2000",
            "sae.expansion_factor=4",
        ],
    )


def _run_worker(rank, world, root, name, stop_at, resume, mode="data"):
    from test_resume import signalling_step

    from sae.errors import TrainingStopped
    from sae.training.run import train_run
    from sae.training.run_folder import resume_config

    if (
        stop_at is not None and rank == world - 1
    ):  # Ctrl-C reaches one process; all must stop together
        Trainer.step = signalling_step(stop_at)
    cfg = resume_config(Path(root) / name) if resume else small_run(root, name, mode)
    try:
        train_run(cfg, log=lambda line: None, resume=resume, dist=Dist(rank, world))
    except TrainingStopped as e:
        Path(root, f"stopped-{name}-{rank}").write_text(str(e.step))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["data", "latents", "hooks"])
def test_two_process_run_checkpoints_and_resumes_bit_identical(tmp_path, mode):
    import json

    from safetensors.torch import load_file

    from sae.errors import ConfigError
    from sae.training.run import train_run
    from sae.training.run_folder import resume_config

    spawn(_run_worker, 2, str(tmp_path), "whole", None, False, mode)
    spawn(_run_worker, 2, str(tmp_path), "parts", 10, False, mode)
    assert [(tmp_path / f"stopped-parts-{r}").read_text() for r in range(2)] == ["10", "10"]
    state = tmp_path / "parts" / "state"
    doc = json.loads((state / "state.json").read_text())
    assert doc["world_size"] == 2 and len(doc["buffers"]) == 2 and doc["trainer"]["step"] == 10
    trainer_files = (
        ["trainer-rank0.safetensors", "trainer-rank1.safetensors"]
        if mode != "data"
        else ["trainer.safetensors"]
    )
    assert sorted(p.name for p in state.iterdir()) == sorted(
        ["buffer-rank0.safetensors", "buffer-rank1.safetensors", "state.json", *trainer_files]
    )
    with pytest.raises(ConfigError, match="written by 2 process.*resume it with 2"):
        train_run(resume_config(tmp_path / "parts"), log=lambda line: None, resume=True)
    spawn(_run_worker, 2, str(tmp_path), "parts", None, True, mode)
    for hook in ["layers.1", "layers.2"] if mode == "hooks" else ["layers.2"]:
        whole = load_file(tmp_path / "whole" / hook / "sae_weights.safetensors")
        parts = load_file(tmp_path / "parts" / hook / "sae_weights.safetensors")
        assert all(torch.equal(whole[k], parts[k]) for k in whole), hook
    assert not state.exists()


# ---- latent-sharded TopK SAE ---------------------------------------------------------


def sharded_problem():
    g = torch.Generator().manual_seed(3)
    W_dec = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1)
    return {
        "x": torch.randn(N, D, generator=g) * 2 + 1,
        "W_enc": W_dec.clone() * 0.6 + 0.05 * torch.randn(M, D, generator=g),
        "b_enc": 0.1 * torch.randn(M, generator=g),
        "W_dec": W_dec,
        "b_dec": 0.2 * torch.randn(D, generator=g),
        "dead": torch.rand(M, generator=g) < 0.4,
    }


def reference_loss_and_grads(k, k_aux):
    from sae.architectures.fused_topk import topk_loss_reference

    p = sharded_problem()
    params = {n: p[n].clone().requires_grad_() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    loss = topk_loss_reference(
        p["x"],
        params["W_enc"],
        params["b_enc"],
        params["W_dec"],
        params["b_dec"],
        k,
        p["dead"],
        k_aux=k_aux,
    )
    loss.backward()
    return loss.detach(), {n: t.grad for n, t in params.items()}


def _sharded_worker(rank, world, k, k_aux, out):
    from sae.architectures.sharded_topk import sharded_topk_loss

    p = sharded_problem()
    m = M // world
    mine = slice(rank * m, (rank + 1) * m)
    params = {
        "W_enc": p["W_enc"][mine].clone(),
        "b_enc": p["b_enc"][mine].clone(),
        "W_dec": p["W_dec"][mine].clone(),
        "b_dec": p["b_dec"].clone(),
    }
    for t in params.values():
        t.requires_grad_()
    loss, fvu, fires = sharded_topk_loss(
        p["x"],
        params["W_enc"],
        params["b_enc"],
        params["W_dec"],
        params["b_dec"],
        k,
        Dist(rank, world),
        p["dead"][mine],
        k_aux=k_aux,
    )
    loss.backward()
    torch.save(
        {"loss": loss.detach(), "fires": fires, **{n: t.grad for n, t in params.items()}},
        f"{out}.{rank}",
    )


@pytest.mark.parametrize("k,k_aux", [(4, 8), (9, 40)])  # k_aux 40 > the 16 latents one rank holds
def test_latent_sharded_topk_gives_the_unsharded_loss_and_gradients(tmp_path, k, k_aux):
    loss, grads = reference_loss_and_grads(k, k_aux)
    spawn(_sharded_worker, 2, k, k_aux, str(tmp_path / "s"))
    parts = [torch.load(tmp_path / f"s.{r}") for r in range(2)]
    for part in parts:
        torch.testing.assert_close(part["loss"], loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(part["b_dec"], grads["b_dec"], rtol=1e-4, atol=1e-6)
    for name in ("W_enc", "b_enc", "W_dec"):
        torch.testing.assert_close(
            torch.cat([p[name] for p in parts]), grads[name], rtol=1e-4, atol=1e-6
        )
    assert (
        sum(int(p["fires"].sum()) for p in parts) == N * k
    )  # k latents per token, over both shards
    assert (
        grads["W_enc"][sharded_problem()["dead"]].abs().sum() > 0
    )  # AuxK reached the dead latents


def test_two_process_latent_sharded_training_equals_one_process(tmp_path, one_thread):
    one = train("topk")
    spawn(_data_parallel_worker, 2, "topk", str(tmp_path / "w"), "latents")
    for rank in range(2):
        two = torch.load(tmp_path / f"w.{rank}")
        for name in one:
            torch.testing.assert_close(
                two[name], one[name], rtol=1e-4, atol=2e-5, msg=f"{name} rank {rank}"
            )
    assert one["since_fired"].max() > 0


def test_hook_points_split_over_two_processes_train_as_one_process(tmp_path, one_thread):
    for rank, hook in enumerate(["h", "g"]):  # rank 0 trains h's SAE, rank 1 g's
        one = train("topk", hook=hook)
        spawn(_data_parallel_worker, 2, "topk", str(tmp_path / hook), "hooks", hook)
        two = torch.load(tmp_path / f"{hook}.{rank}")
        assert (
            torch.load(tmp_path / f"{hook}.{1 - rank}") == {}
        )  # the other process holds no SAE for it
        for name in one:
            torch.testing.assert_close(
                two[name], one[name], rtol=1e-5, atol=1e-6, msg=f"{hook} {name}"
            )


# ---- bad input and dead processes: one line, no hang ------------------------------------


def _refusal_worker(rank, world, what, out):
    from sae.errors import ConfigError

    cfgs = {
        "hooks": (trainer_config("topk", "hooks"), {"h": D, "g": D, "f": D}),
        "latents": (
            load_config(None, ["sae.num_latents=63", "sae.k=4", "distributed.mode=latents"]),
            {"h": D},
        ),
        "relu-latents": (
            load_config(None, ["sae.architecture=relu", "distributed.mode=latents"]),
            {"h": D},
        ),
        "clip-latents": (
            load_config(None, ["sae.k=4", "train.grad_clip=1", "distributed.mode=latents"]),
            {"h": D},
        ),
    }
    cfg, widths = cfgs[what]
    try:
        Trainer(cfg, widths, 10, "cpu", Dist(rank, world))
    except ConfigError as e:
        Path(f"{out}.{rank}").write_text(str(e))


@pytest.mark.parametrize(
    "what,message",
    [
        ("hooks", "distributed.mode: 3 hook points do not divide evenly over 2 processes"),
        (
            "latents",
            "distributed.mode: latents: the 63 latents of h do not divide over 2 processes",
        ),
        ("relu-latents", "distributed.mode: latents trains TopK SAEs .*; h is relu"),
        ("clip-latents", "train.grad_clip: 1.0 cannot be applied with distributed.mode: latents"),
    ],
)
def test_splits_that_do_not_work_are_refused_in_one_line(tmp_path, what, message):
    import re

    spawn(_refusal_worker, 2, what, str(tmp_path / "e"))
    for rank in range(2):
        text = (tmp_path / f"e.{rank}").read_text()
        assert re.search(message, text) and "\n" not in text


def _dying_worker(rank, world, out):
    from sae.errors import ConfigError

    trainer = Trainer(trainer_config("topk"), {"h": D}, STEPS, "cpu", Dist(rank, world))
    for i, x in enumerate(batches(STEPS)):
        if rank == 1 and i == 3:
            os._exit(3)  # a process that dies mid-run
        try:
            trainer.step({"h": x[: N // 2]})
        except ConfigError as e:
            Path(f"{out}.{rank}").write_text(str(e))
            return


def test_a_dead_process_stops_the_others_with_one_line(tmp_path):
    # Started by hand: mp.spawn would kill rank 0 as soon as rank 1 dies, before it can tell.
    ctx, store = mp.get_context("spawn"), str(tmp_path / "store")
    procs = [
        ctx.Process(target=_entry, args=(rank, _dying_worker, 2, store, (str(tmp_path / "d"),)))
        for rank in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 3]
    text = (tmp_path / "d.0").read_text()
    assert text.startswith("rank 0: another process stopped or timed out") and "\n" not in text


def test_a_run_whose_batch_does_not_split_is_refused(tmp_path):
    from sae.errors import ConfigError
    from sae.training.run import train_run

    cfg = load_config(None, [f"output.root={tmp_path}", "train.batch_tokens=1001"])
    with pytest.raises(
        ConfigError, match="train.batch_tokens: 1001 does not divide over 2 processes"
    ):
        train_run(cfg, log=lambda line: None, dist=Dist(0, 2))


@pytest.mark.slow
def test_torchrun_launches_train_py_on_two_processes(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "train.py",
            "--set",
            f"output.root={tmp_path}",
            "--set",
            "output.run_name=tr",
            "--set",
            "harvest.cache_dir=null",
            "--set",
            "harvest.cache_epochs=1",
            "--set",
            "data.token_budget=8192",
            "--set",
            "train.batch_tokens=512",
            "--set",
            "data.eval_tokens=1024",
            "--set",
            "sae.expansion_factor=2",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "2 processes, each harvesting 1 context in 2" in result.stdout
    assert result.stdout.count("run folder:") == 1  # rank 0 alone speaks
    assert json.loads((tmp_path / "tr" / "layers.2" / "metrics.json").read_text())["fvu"] < 1
