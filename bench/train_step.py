"""TopK training-step throughput: our fused step vs EleutherAI sparsify vs a naive dense step.

    python bench/train_step.py                         # CPU: d=256 and d=512, 16x, k=32, N=4096
    PYTHONPATH=/path/to/sparsify-site python bench/train_step.py    # with sparsify side by side
    python bench/train_step.py --device cuda --d 4096 --latents 131072 --tokens 8192 --rounds 5 --no-dense [--autocast]

One step = loss (MSE + AuxK, alpha 1/32, k_aux = d/2, ~2% dead latents) + backward +
removing the gradient parallel to decoder rows + Adam + renormalizing decoder rows, on the
same activations and the same Adam settings for every contender. Ours is
``sae.training.trainer.Trainer.step`` itself (dead-latent bookkeeping and schedule included). Rounds interleave ours
and sparsify; the dense step runs alone afterwards (see run_shape); medians are reported. sparsify (PyPI eai-sparsify) is optional: its
SparseCoder forward/backward and its decoder-norm helpers are used when importable.
"""

from __future__ import annotations

import json
import statistics
import time

import click
import torch

from sae.architectures.fused_topk import topk_loss_reference
from sae.config import load_config
from sae.training.trainer import Trainer


def make_ours(d, M, k, device, x, dead, autocast=False):
    """The real training step: sae.training.trainer.Trainer.step, with the same dead latents forced."""
    cfg = load_config(
        None,
        [
            f"sae.num_latents={M}",
            f"sae.k={k}",
            f"train.batch_tokens={x.shape[0]}",
            "train.lr=2e-4",
            "train.warmup_steps=0",
            f"train.autocast={str(autocast).lower()}",
        ],
    )
    trainer = Trainer(cfg, {"x": d}, total_steps=10**6, device=device)
    forced = dead.nonzero().squeeze(1)

    def step():
        trainer.states["x"].since_fired[forced] = (
            cfg.train.dead_tokens
        )  # same ~2% dead as the others
        trainer.step({"x": x})

    step.trainer = trainer
    return step


def make_dense(d, M, k, device, x, dead, autocast=False):
    """The same Trainer.step with the dense reference loss in place of the fused one."""
    step = make_ours(d, M, k, device, x, dead, autocast)
    trainer = step.trainer
    sae = trainer.saes["x"]

    def dense_loss(x, dead, workspace=None, progress=1.0):
        loss = topk_loss_reference(
            x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, k, dead, d // 2, 1 / 32
        )
        return loss, loss.detach(), torch.zeros(M, dtype=torch.long, device=x.device)

    sae.training_loss = dense_loss
    return step


def make_sparsify(d, M, k, device, x, dead, autocast=False):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=M, k=k), device=device, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4, fused=True)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            out = sae(x, dead_mask=dead)
            loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    return step


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_round(steps, times, peak, device):
    for name, step in steps.items():
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times[name].append(time.perf_counter() - t)
        if device.startswith("cuda"):
            peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated() / 2**30)


def run_shape(d, M, k, N, device, rounds, with_dense, autocast=False):
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(N, d, generator=g).to(device)
    dead = torch.zeros(M, dtype=torch.bool, device=device)
    dead[: M // 50] = True
    contenders = {"ours_fused": lambda: make_ours(d, M, k, device, x, dead, autocast)}
    try:
        import sparsify  # noqa: F401

        contenders["sparsify"] = lambda: make_sparsify(d, M, k, device, x, dead, autocast)
    except ImportError:
        pass
    if with_dense:
        contenders["naive_dense"] = lambda: make_dense(d, M, k, device, x, dead, autocast)
    times, peak = {n: [] for n in contenders}, {}
    # The dense step allocates and frees several [N, M] tensors per step; interleaved with
    # the others, the allocator churn it causes slowed every contender several-fold on CPU.
    # So the sparse contenders interleave with each other, and the dense one runs alone after.
    phases = [
        [n for n in contenders if n != "naive_dense"],
        [n for n in contenders if n == "naive_dense"],
    ]
    for phase in phases:
        steps = {name: contenders[name]() for name in phase}
        for step in steps.values():
            step()  # warm-up, allocates optimizer state
        for _ in range(rounds):
            _timed_round(steps, times, peak, device)
        del steps
    rate = {n: N / statistics.median(t) for n, t in times.items()}
    result = {
        "d": d,
        "latents": M,
        "k": k,
        "tokens": N,
        "autocast_bf16": autocast,
        "ms_per_step": {n: round(1000 * statistics.median(t), 1) for n, t in times.items()},
        "tokens_per_s": {n: round(r) for n, r in rate.items()},
    }
    if "sparsify" in rate:
        result["ours_vs_sparsify"] = round(rate["ours_fused"] / rate["sparsify"], 2)
    if with_dense:
        result["ours_vs_dense"] = round(rate["ours_fused"] / rate["naive_dense"], 2)
    if peak:
        result["peak_gib"] = {n: round(v, 2) for n, v in peak.items()}
    return result


@click.command()
@click.option("--device", default="cpu", show_default=True)
@click.option("--d", "dims", multiple=True, type=int, default=(256, 512), show_default=True)
@click.option("--expansion", default=16, show_default=True)
@click.option("--latents", default=None, type=int, help="Overrides expansion.")
@click.option("--k", default=32, show_default=True)
@click.option("--tokens", default=4096, show_default=True)
@click.option("--rounds", default=7, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option(
    "--dense/--no-dense", default=True, show_default=True, help="Include the naive dense step."
)
@click.option(
    "--autocast",
    is_flag=True,
    help="bfloat16 autocast for every contender (ours: encoder GEMM only).",
)
def main(device, dims, expansion, latents, k, tokens, rounds, threads, dense, autocast):
    torch.set_num_threads(threads)
    out = {
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu, {threads} threads",
        "torch": torch.__version__,
        "results": [],
    }
    for d in dims:
        out["results"].append(
            run_shape(d, latents or expansion * d, k, tokens, device, rounds, dense, autocast)
        )
        print(json.dumps(out["results"][-1]), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
