"""Where our ReLU SAE's dead latents come from on SmolLM2's layer 15 (issue 18), without a
model: batches drawn from the activation cache that ``configs/smollm2-135m-topk.yaml``
harvests, trained by ``Trainer.step`` with the settings ``bench/peers.py`` gives
``ours:relu`` (the config, ``train.lr`` null, ``--set`` on top).

    PYTHONPATH=. python bench/relu_dead.py --latents 9216                                  # defaults
    PYTHONPATH=. python bench/relu_dead.py --latents 9216 --set sae.sparsity_warmup_fraction=0.5
    PYTHONPATH=. python bench/relu_dead.py --latents 2304 --centre                         # b_enc init

The cache's rows are shuffled (seed 0); the first ``--held-out`` rows are kept out, and the
rest give ``--steps`` batches of ``train.batch_tokens`` rows over as many shuffled epochs as
that takes, as the config's cache epochs do. Held-out metrics (``quality.held_out_metrics``) are printed at
a few steps along the way and at the end. The held-out rows come from the training split, so
FVU is lower than on the config's held-out split, but dead and dense compare across runs.
``--centre`` sets b_enc at init so that each pre-activation is centred on the first batch's
mean (the encoder otherwise starts by reading the mean, which dominates these activations).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import Setup, ours_config  # noqa: E402
from quality import held_out_metrics  # noqa: E402

from sae.activations.cache import read_manifest, read_shard  # noqa: E402
from sae.config import load_config  # noqa: E402
from sae.errors import ConfigError  # noqa: E402
from sae.training.trainer import Trainer  # noqa: E402

CONFIG = "configs/smollm2-135m-topk.yaml"


def cache_batches(cache: Path, steps: int, rows_per_batch: int, held_out: int):
    """(training batches [rows_per_batch, d] x steps, held-out rows [held_out, d]) from the
    cache's listed shards, each checked against its manifest checksum."""
    try:
        manifest = read_manifest(cache)
        rows = torch.cat(
            [next(iter(read_shard(cache, s).values())).float() for s in manifest["shards"]]
        )
    except ConfigError as e:
        raise click.UsageError(f"--cache: {e}") from None
    if rows.shape[0] < held_out + rows_per_batch:
        raise click.UsageError(
            f"--cache: {rows.shape[0]:,} rows in {cache}, fewer than --held-out {held_out:,} "
            f"plus one batch of {rows_per_batch:,}"
        )
    g = torch.Generator().manual_seed(0)
    rows = rows[torch.randperm(rows.shape[0], generator=g)]
    held, pool = rows[:held_out], rows[held_out:]
    batches = []
    while len(batches) < steps:  # another shuffled epoch, as the config's cache epochs
        p = pool[torch.randperm(pool.shape[0], generator=g)]
        batches += [
            p[i : i + rows_per_batch] for i in range(0, len(p) - rows_per_batch + 1, rows_per_batch)
        ]
    return batches[:steps], held


@click.command()
@click.option(
    "--config", "config", default=CONFIG, show_default=True, help="Its recipe and batch size."
)
@click.option("--cache", type=click.Path(path_type=Path), default=Path("checkpoints/smollm2-cache"))
@click.option("--latents", type=int, default=9216, show_default=True)
@click.option("--steps", type=int, default=291, show_default=True)
@click.option("--held-out", type=int, default=20_000, show_default=True)
@click.option(
    "--centre", is_flag=True, help="Centre every pre-activation on the data mean at init."
)
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE", help="Config overrides.")
@click.option("--threads", type=int, default=1, show_default=True)
def main(config, cache, latents, steps, held_out, centre, extra, threads):
    torch.set_num_threads(threads)
    try:
        cfg0 = load_config(config, [])
    except ConfigError as e:
        raise click.UsageError(f"--config: {e}") from None
    batches, held = cache_batches(cache, steps, cfg0.train.batch_tokens, held_out)
    settings = [f"sae.num_latents={latents}", *extra]
    setup = Setup(config, settings, cfg0, batches, Path("."), 0)
    trainer = Trainer(
        ours_config(setup, "relu", settings), {setup.hook: setup.d}, total_steps=steps
    )
    sae = trainer.saes[setup.hook]
    if centre:
        x0 = batches[0]
        scale = x0.shape[1] ** 0.5 / x0.norm(dim=1).mean()
        with torch.no_grad():
            sae.b_enc.copy_(-(x0.mean(0) * scale) @ sae.W_enc.t())
    # the step where lambda's default warm-up (5% of the run) ends, then every 25 steps
    report_at = {len(batches) // 20, *range(25, len(batches) - 1, 25)}
    start = time.perf_counter()
    for i, x in enumerate(batches):
        trainer.step({setup.hook: x})
        if i in report_at:
            s = trainer.trained_sae(setup.hook).eval()
            click.echo(f"step {i}: {json.dumps(held_out_metrics(s.encode, s.decode, held[:8192]))}")
    s = trainer.trained_sae(setup.hook).eval()
    # silent for the trainer's dead window at the end: what the pull and resampling act on
    silent = trainer.states[setup.hook].since_fired >= trainer.dead_tokens
    result = {
        **held_out_metrics(s.encode, s.decode, held),
        "silent_in_training": silent.float().mean().item(),
        "seconds": time.perf_counter() - start,
    }
    click.echo(json.dumps({"latents": latents, "centre": centre, "set": list(extra), **result}))


if __name__ == "__main__":
    main()
