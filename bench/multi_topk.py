"""multi-TopK against plain TopK on one activation set: held-out FVU and dead latents at k,
and FVU when the same SAE is read with 4k latents (what multi-TopK is for).

    PYTHONPATH=. python bench/multi_topk.py                      # the demo: 3 runs, ~10 min
    PYTHONPATH=. python bench/multi_topk.py --variant "ramp p^3=sae.multi_topk=true sae.multi_topk_ramp_power=3"

Every variant trains our TopK SAE with the config's settings plus its overrides on the same
cached batches (``bench/quality.py``'s loader), one after another.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (  # noqa: E402
    activation_options,
    activation_overrides,
    held_out_metrics,
    load_activations,
)

from sae.config import load_config  # noqa: E402
from sae.training.trainer import Trainer  # noqa: E402

VARIANTS = (
    "plain TopK=sae.multi_topk=false",
    "multi-TopK, 1/8 throughout (Gao et al.)=sae.multi_topk=true sae.multi_topk_ramp_power=0",
    "multi-TopK, the default ramp=sae.multi_topk=true",
)


def read_at(sae, k: int, held_out: torch.Tensor) -> dict:
    """Held-out metrics of ``sae`` read with k latents per token."""
    sae.cfg = dataclasses.replace(sae.cfg, k=k)
    with torch.no_grad():
        return held_out_metrics(sae.encode, sae.decode, held_out)


def run_variant(config: str, base: list[str], overrides: list[str], batches, held_out) -> dict:
    """Train one variant on ``batches``; its metrics at k and at 4k."""
    cfg = load_config(config, [*base, "sae.architecture=topk", *overrides])
    hook = cfg.hooks[0]
    start = time.perf_counter()
    trainer = Trainer(cfg, {hook: batches[0].shape[1]}, total_steps=len(batches))
    for x in batches:
        trainer.step({hook: x})
    sae = trainer.trained_sae(hook).eval()
    k = sae.cfg.k
    at_k, at_4k = read_at(sae, k, held_out), read_at(sae, 4 * k, held_out)
    return {
        "fvu_k": at_k["fvu"],
        "dead_k": at_k["dead_fraction"],
        "fvu_4k": at_4k["fvu"],
        "seconds": time.perf_counter() - start,
    }


@click.command()
@activation_options
@click.option(
    "--variant",
    "variants",
    multiple=True,
    help='"NAME=KEY=VALUE KEY=VALUE ..." (repeatable); default: plain, constant 1/8, the ramp.',
)
@click.option("--threads", default=2, show_default=True)
@click.option("--json-out", default=None)
def main(config, cache_dir, token_budget, epochs, eval_tokens, variants, threads, json_out):
    torch.set_num_threads(threads)
    base = activation_overrides(config, cache_dir, token_budget, epochs, eval_tokens, [])
    _, batches, held_out = load_activations(config, base)
    print(f"{len(batches)} batches x {batches[0].shape[0]} tokens, {len(held_out):,} held out")
    print("| variant | FVU at k | dead at k | FVU at 4k |\n| --- | --: | --: | --: |")
    results = {}
    for variant in variants or VARIANTS:
        name, _, sets = variant.partition("=")
        r = results[name] = run_variant(config, base, sets.split(), batches, held_out)
        print(f"| {name} | {r['fvu_k']:.4f} | {r['dead_k']:.1%} | {r['fvu_4k']:.4f} |", flush=True)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
