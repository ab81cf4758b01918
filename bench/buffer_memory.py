"""Peak host memory of the shuffling buffer against its configured size.

    python bench/buffer_memory.py                      # demo model, 131072-token buffer
    MALLOC_MMAP_THRESHOLD_=131072 python bench/buffer_memory.py

Loads the model, resets the process's peak-RSS counter (Linux: /proc/self/clear_refs),
then harvests ``data.token_budget`` tokens through the buffer as training would, and
reports the growth of peak RSS next to the buffer's storage. The margin above storage is
what the harvest itself needs (a forward pass, one pending harvest batch, the batch being
served) plus whatever freed memory the C allocator keeps.
"""

from __future__ import annotations

import json

import click
import torch

from sae.activations.stream import activation_batches
from sae.config import load_config
from sae.models.loading import load_model


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


@click.command()
@click.option("--buffer-tokens", default=131072, show_default=True)
@click.option("--token-budget", default=400_000, show_default=True)
@click.option("--set", "overrides", multiple=True, help="More config overrides.")
def main(buffer_tokens, token_budget, overrides):
    torch.set_num_threads(2)
    cfg = load_config(
        "configs/demo.yaml",
        [f"harvest.buffer_tokens={buffer_tokens}", f"data.token_budget={token_budget}", *overrides],
    )
    model, tokenizer = load_model(cfg.model)
    buffer = activation_batches(cfg, model, tokenizer)
    model(
        input_ids=torch.ones(cfg.harvest.batch_contexts, cfg.data.context_tokens, dtype=torch.long)
    )  # warm up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = peak_rss_mib()
    served = 0
    for batch in buffer:
        served += next(iter(batch.values())).shape[0]
    growth = peak_rss_mib() - base
    storage = buffer.nbytes() / 2**20
    print(
        json.dumps(
            {
                "buffer_tokens": buffer_tokens,
                "storage_mib": round(storage, 1),
                "peak_rss_growth_mib": round(growth, 1),
                "margin_mib": round(growth - storage, 1),
                "tokens_served": served,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
