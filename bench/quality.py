"""SAE quality at equal tokens: our trainer vs EleutherAI sparsify on the same activations.

    PYTHONPATH=/path/to/sparsify-site python bench/quality.py            # the demo run, ~20 min on 2 CPU cores
    PYTHONPATH=... python bench/quality.py --token-budget 40000 --epochs 1   # smoke run, ~1 min
    python bench/quality.py --contenders topk,batchtopk                  # ours only (no sparsify needed)

Activations: the residual stream that ``configs/demo.yaml`` trains on (layers.2 of the
built-in demo model, d = 256), harvested once into ``--cache-dir`` and served by
``sae.activations.stream.activation_batches`` (the shuffling buffer, ``harvest.cache_epochs``
passes). The batches are materialized once, so every contender sees the same batches in
the same order; the held-out set is the config's eval split (``sae.evaluation.heldout.eval_config``).

Contenders (k = 32, 2048 latents, the demo's lr / warmup / dead window for all):

- ``topk``, ``batchtopk``, ``topk_multi``: ``sae.training.trainer.Trainer.step`` per batch, with
  ``sae.architecture`` / ``sae.multi_topk`` overridden; evaluated as ``trained_sae`` (BatchTopK
  with its learned inference threshold).
- ``topk_unit_enc``, ``topk_enc058``: ablations, ``topk`` with the encoder rows set after
  init to norm 1 (the plain transpose init) or 1/sqrt(3) (the row norm of sparsify's
  encoder: ``nn.Linear``'s kaiming-uniform init; sparsify normalizes only the decoder
  copy). ``init_encoder_row_norm`` in each result says where every contender started.
- ``sparsify``, ``sparsify_multi``: ``sparsify.SparseCoder`` trained with the step of
  sparsify's own trainer: loss = fvu + auxk_loss / 32 (+ multi_topk_fvu / 8), backward,
  gradient parallel to decoder rows removed, ``torch.optim.Adam`` with our lr schedule
  (``sae.training.trainer.learning_rate``, same peak), decoder rows renormalized. b_dec starts at
  the mean of the first batch (what sparsify's trainer does at step 0); a latent is dead
  for AuxK once it is absent from ``latent_indices`` for ``train.dead_tokens`` tokens
  (sparsify's bookkeeping, with our ``>=`` window test).

Every SAE is scored by one function (``held_out_metrics``) on dense latents z [n, M]:
FVU = sum|x - x_hat|^2 / sum|x - mean(x)|^2 over the whole held-out set, L0 = mean
non-zero latents per token, dead = never non-zero on the held-out set, dense = non-zero on
more than 10% of its tokens. FVU and L0 are also taken on the last 4 training batches
(``train_batches``), to tell a held-out shift from a training gap. For our SAEs the
held-out result is cross-checked against ``sae.evaluation.metrics.evaluate``. Wall times (training
loop only) are informative.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
from pathlib import Path

import click
import torch

from sae.activations.stream import activation_batches, make_harvester
from sae.config import load_config
from sae.evaluation.heldout import eval_config
from sae.evaluation.metrics import evaluate
from sae.models.loading import load_model
from sae.training.trainer import Trainer, learning_rate, run_schedule

OURS = {
    "topk": [],
    "batchtopk": ["sae.architecture=batchtopk"],
    "topk_multi": ["sae.multi_topk=true"],
    "topk_unit_enc": [],
    "topk_enc058": [],
}
# Ablations: our TopK with the encoder rows set after init to this norm (directions = the
# decoder rows, which are unit): 1 is the plain transpose init, 1/sqrt(3) the row norm of
# sparsify's encoder (nn.Linear's kaiming-uniform init; sparsify normalizes only the decoder).
ENCODER_NORM = {"topk_unit_enc": 1.0, "topk_enc058": 3**-0.5}
SPARSIFY = {"sparsify": False, "sparsify_multi": True}
TRAIN_CHECK = 4  # the metrics are also taken on the last 4 training batches (seen in training)


def load_activations(config, overrides):
    """(cfg, training batches [list of [N, d]], held-out [n, d]) for the config's single hook."""
    cfg, _, _, batches, held_out = load_model_and_activations(config, overrides)
    return cfg, batches, held_out


def load_model_and_activations(config, overrides):
    """(cfg, model, tokenizer, training batches, held-out) for the config's single hook: the
    model stays loaded for benchmarks that also splice the SAEs in (bench/peers.py)."""
    cfg = load_config(config, overrides)
    if len(cfg.hooks) != 1:
        raise click.UsageError(f"the benchmark takes one hook point, the config has {cfg.hooks}")
    hook = cfg.hooks[0]
    model, tokenizer = load_model(cfg.model)
    batches = [b[hook].float().contiguous() for b in activation_batches(cfg, model, tokenizer)]
    held_out = torch.cat(
        [a[hook].float().cpu() for a in make_harvester(eval_config(cfg), model, tokenizer)]
    )
    return cfg, model, tokenizer, batches, held_out


@torch.no_grad()
def held_out_metrics(encode, decode, x, chunk=4096, dense_threshold=0.1):
    """FVU, L0, dead and dense fraction of an SAE given as encode(x) -> dense z [n, M] and
    decode(z) -> x_hat [n, d]; sums in float64 over the whole set."""
    sq_err = torch.zeros((), dtype=torch.float64)
    fires = None
    for i in range(0, x.shape[0], chunk):
        xc = x[i : i + chunk]
        z = encode(xc)
        sq_err += (xc - decode(z)).double().pow(2).sum()
        f = (z > 0).sum(0)
        fires = f if fires is None else fires + f
    xd = x.double()
    total_var = (xd - xd.mean(0)).pow(2).sum()
    n = x.shape[0]
    return {
        "fvu": (sq_err / total_var).item(),
        "l0": fires.sum().item() / n,
        "dead_fraction": (fires == 0).double().mean().item(),
        "dense_fraction": (fires.double() / n > dense_threshold).double().mean().item(),
        "tokens": n,
    }


def train_ours(cfg, hook, batches, held_out, encoder_norm=None):
    trainer = Trainer(cfg, {hook: batches[0].shape[1]}, total_steps=len(batches))
    sae = trainer.saes[hook]
    if encoder_norm is not None:
        with torch.no_grad():
            sae.W_enc.copy_(torch.nn.functional.normalize(sae.W_dec, dim=1) * encoder_norm)
    enc_norm = sae.W_enc.norm(dim=1).mean().item()
    max_dead, steps_with_dead = torch.zeros(()), torch.zeros((), dtype=torch.long)
    start = time.perf_counter()
    for x in batches:
        dead = trainer.step({hook: x})[hook]["silent_fraction"]  # dead for AuxK in this step
        max_dead, steps_with_dead = torch.maximum(max_dead, dead), steps_with_dead + (dead > 0)
    seconds = time.perf_counter() - start
    trainer.check_finite()
    train_dead = (trainer.states[hook].since_fired >= trainer.dead_tokens).double().mean().item()
    sae = trainer.trained_sae(hook).eval()
    result = held_out_metrics(sae.encode, sae.decode, held_out)
    result["train_batches"] = held_out_metrics(
        sae.encode, sae.decode, torch.cat(batches[-TRAIN_CHECK:])
    )
    check = evaluate(sae, [held_out])
    assert abs(check["fvu"] - result["fvu"]) <= 1e-4 * max(1.0, check["fvu"]), (check, result)
    assert (
        check["dead_fraction"] == result["dead_fraction"] and abs(check["l0"] - result["l0"]) < 1e-6
    )
    return {
        **result,
        "train_dead_fraction": train_dead,
        "max_train_dead_fraction": max_dead.item(),
        "steps_with_dead": steps_with_dead.item(),
        "init_encoder_row_norm": enc_norm,
        "seconds": seconds,
        "steps": len(batches),
    }


def train_sparsify(cfg, hook, batches, held_out, multi_topk, seed):
    from sparsify import SparseCoder, SparseCoderConfig

    d = batches[0].shape[1]
    M = cfg.sae.num_latents or cfg.sae.expansion_factor * d
    torch.manual_seed(seed)  # sparsify's trainer seeds the global RNG before building each SAE
    sae = SparseCoder(
        d,
        SparseCoderConfig(num_latents=M, k=cfg.sae.k, multi_topk=multi_topk),
        device="cpu",
        dtype=torch.float32,
    )
    enc_norm = sae.encoder.weight.norm(dim=1).mean().item()
    peak = cfg.train.lr or 2e-4 / (M / 2**14) ** 0.5  # sparsify's Adam rule, unscaled
    opt = torch.optim.Adam(sae.parameters(), lr=peak)
    since_fired = torch.zeros(M, dtype=torch.long)
    max_dead, steps_with_dead = torch.zeros(()), torch.zeros((), dtype=torch.long)
    total = len(batches)
    warmup, dead_tokens = run_schedule(cfg.train, total)  # null settings scale with the run
    start = time.perf_counter()
    for step, x in enumerate(batches):
        if step == 0:
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0))  # sparsify/trainer.py: raw.b_dec.data = outputs.mean(0)
        dead = since_fired >= dead_tokens
        max_dead, steps_with_dead = (
            torch.maximum(max_dead, dead.float().mean()),
            steps_with_dead + dead.any(),
        )
        out = sae(x, dead_mask=dead)
        loss = out.fvu + out.auxk_loss / 32
        if multi_topk:
            loss = loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, total, peak, warmup, cfg.train.decay_fraction)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            since_fired += x.shape[0]
            since_fired[out.latent_indices.flatten()] = 0
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise click.ClickException("sparsify's training diverged")
    train_dead = (since_fired >= dead_tokens).double().mean().item()

    def encode(x):
        acts, idx, _ = sae.encode(x)
        return torch.zeros(x.shape[0], M).scatter_(1, idx, acts.float())

    decode = lambda z: z @ sae.W_dec + sae.b_dec  # noqa: E731
    result = held_out_metrics(encode, decode, held_out)
    result["train_batches"] = held_out_metrics(encode, decode, torch.cat(batches[-TRAIN_CHECK:]))
    return {
        **result,
        "train_dead_fraction": train_dead,
        "max_train_dead_fraction": max_dead.item(),
        "steps_with_dead": steps_with_dead.item(),
        "init_encoder_row_norm": enc_norm,
        "seconds": seconds,
        "steps": total,
    }


def activation_options(command):
    """The options that choose the activation set (shared with bench/peers.py)."""
    options = [
        click.option("--config", default="configs/demo.yaml", show_default=True),
        click.option(
            "--cache-dir",
            default="/tmp/quality-cache",
            show_default=True,
            help="Activations are cached in CACHE_DIR/budget-<data.token_budget>, so a second "
            "run skips the model.",
        ),
        click.option(
            "--token-budget",
            type=int,
            default=None,
            help="data.token_budget (default: the config's).",
        ),
        click.option(
            "--epochs", type=int, default=None, help="harvest.cache_epochs (default: the config's)."
        ),
        click.option(
            "--eval-tokens",
            type=int,
            default=None,
            help="data.eval_tokens (default: the config's).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def activation_overrides(config, cache_dir, token_budget, epochs, eval_tokens, overrides):
    """Config overrides for the activation set the options chose: one cache per token
    budget (a cache holds one budget's activations), shared with bench/peers.py."""
    base = list(overrides)
    if token_budget is not None:
        base.append(f"data.token_budget={token_budget}")
    budget = load_config(config, base).data.token_budget
    base.insert(0, f"harvest.cache_dir={cache_dir}/budget-{budget}")
    if epochs is not None:
        base.append(f"harvest.cache_epochs={epochs}")
    if eval_tokens is not None:
        base.append(f"data.eval_tokens={eval_tokens}")
    return base


def sae_commit() -> dict:
    """Which code trained "ours": {"commit", "sae_dirty"} (uncommitted changes under sae/),
    or {} outside a git checkout."""
    git = ["git", "-C", str(Path(__file__).resolve().parent.parent)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "sae"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": commit, "sae_dirty": bool(dirty)}


@click.command()
@activation_options
@click.option(
    "--seeds",
    default="0",
    show_default=True,
    help="Comma-separated train.seed values (init and "
    "shuffle order; every contender sees the same batches per seed).",
)
@click.option(
    "--contenders",
    default="topk,sparsify,topk_unit_enc,topk_enc058,batchtopk,topk_multi,sparsify_multi",
    show_default=True,
    help=f"Comma-separated subset of {', '.join([*OURS, *SPARSIFY])}.",
)
@click.option(
    "--set", "overrides", multiple=True, help="Further config overrides KEY=VALUE (same for all)."
)
@click.option("--threads", default=2, show_default=True)
@click.option("--json-out", default=None, help="Also write the JSON blob to this file.")
def main(
    config,
    cache_dir,
    token_budget,
    epochs,
    eval_tokens,
    seeds,
    contenders,
    overrides,
    threads,
    json_out,
):
    torch.set_num_threads(threads)
    names = [c.strip() for c in contenders.split(",") if c.strip()]
    unknown = [c for c in names if c not in OURS and c not in SPARSIFY]
    if unknown:
        raise click.UsageError(f"unknown contender(s) {unknown}; choose from {[*OURS, *SPARSIFY]}")
    if any(c in SPARSIFY for c in names):
        try:
            import sparsify  # noqa: F401
        except ImportError:
            raise click.UsageError(
                "sparsify is not importable; put eai-sparsify on PYTHONPATH or drop the "
                "sparsify contenders"
            ) from None
    base = activation_overrides(config, cache_dir, token_budget, epochs, eval_tokens, overrides)
    out = {
        "machine": f"cpu, {threads} threads",
        "torch": torch.__version__,
        "config": config,
        "overrides": base,
        "runs": [],
    }
    try:
        import importlib.metadata as md

        out["sparsify"] = md.version("eai-sparsify")
    except Exception:
        pass
    out.update(sae_commit())
    for seed in [int(s) for s in seeds.split(",")]:
        t = time.perf_counter()
        cfg, batches, held_out = load_activations(config, [*base, f"train.seed={seed}"])
        hook = cfg.hooks[0]
        print(
            f"seed {seed}: {len(batches)} batches x {cfg.train.batch_tokens} = "
            f"{len(batches) * cfg.train.batch_tokens:,} training tokens, {held_out.shape[0]:,} held-out tokens "
            f"at {hook} (loaded in {time.perf_counter() - t:.0f} s)",
            flush=True,
        )
        for name in names:
            if name in OURS:
                c = load_config(config, [*base, f"train.seed={seed}", *OURS[name]])
                r = train_ours(c, hook, batches, held_out, ENCODER_NORM.get(name))
            else:
                c = copy.deepcopy(cfg)
                r = train_sparsify(c, hook, batches, held_out, SPARSIFY[name], seed)
            r = {
                "contender": name,
                "seed": seed,
                "train_tokens": len(batches) * cfg.train.batch_tokens,
                **r,
            }
            out["runs"].append(r)
            print(json.dumps(r), flush=True)
        del batches, held_out
    print_table(out["runs"])
    print(json.dumps(out, indent=1))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(out, f, indent=1)


def print_table(runs):
    print(
        "\nheld-out FVU, L0, dead, dense; AuxK dead: dead for AuxK at the end of training / at most during "
        "it (steps with any); tr FVU / L0: on the last training batches"
    )
    print(
        f"{'contender':<15} {'seed':>4} {'|W_enc|':>7} {'FVU':>8} {'L0':>6} {'dead':>6} {'dense':>6} "
        f"{'AuxK dead':>19} {'tr FVU':>7} {'tr L0':>6} {'wall s':>7}"
    )
    for r in runs:
        t = r["train_batches"]
        aux = f"{r['train_dead_fraction']:.1%} / {r['max_train_dead_fraction']:.1%} ({r['steps_with_dead']})"
        print(
            f"{r['contender']:<15} {r['seed']:>4} {r['init_encoder_row_norm']:>7.3f} {r['fvu']:>8.4f} "
            f"{r['l0']:>6.1f} {r['dead_fraction']:>6.1%} {r['dense_fraction']:>6.1%} {aux:>19} {t['fvu']:>7.4f} "
            f"{t['l0']:>6.1f} {r['seconds']:>7.0f}"
        )
    seeds = {r["seed"] for r in runs}
    if len(seeds) > 1:
        print(f"\nmean over {len(seeds)} seeds:")
        for name in dict.fromkeys(r["contender"] for r in runs):
            rs = [r for r in runs if r["contender"] == name]
            fvu = torch.tensor([r["fvu"] for r in rs], dtype=torch.float64)
            dead = sum(r["dead_fraction"] for r in rs) / len(rs)
            wall = sum(r["seconds"] for r in rs) / len(rs)
            print(
                f"{name:<15} FVU {fvu.mean():.4f} +- {fvu.std():.4f}  dead {dead:.1%}  wall {wall:.0f} s"
            )


if __name__ == "__main__":
    main()
