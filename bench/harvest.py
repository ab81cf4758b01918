"""Harvest throughput against a bare forward pass truncated at the same layer.

    python bench/harvest.py                                  # demo model, CPU
    python bench/harvest.py --model tiny-llama               # Llama-shaped random model, CPU
    python bench/harvest.py --model llama3.1-8b --device cuda --batch 8 --context 2048 --hook layers.15

Each round runs, on the same token batches: (1) the model's base (no LM head) with its
decoder-layer list cut after the hooked layer, (2) the Harvester (hooks, early stop,
special-token masking, row extraction), (3) the full forward with logits. Rounds
alternate the three so that drifts in machine speed hit all of them alike; the median
round is reported. Then the end-to-end rate from raw text (tokenization included) is
measured with and without the prefetch thread.
"""

from __future__ import annotations

import json
import statistics
import time

import click
import torch
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sae.activations.harvest import Harvester
from sae.activations.hooks import resolve_hook
from sae.config import ModelConfig
from sae.data.text import context_batches, context_bos_id, load_text_dataset
from sae.models.demo_model import DEMO_MODEL_DIR
from sae.models.loading import decoder_layers, load_model

SHAPES = {  # random-weight Llama shapes
    "tiny-llama": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
    ),
    "llama3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}


def build(model_name: str, device: str):
    if model_name not in SHAPES:
        return load_model(ModelConfig(name_or_path=model_name, device=device))
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = LlamaConfig(**SHAPES[model_name], max_position_embeddings=8192)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(
        dtype
    )  # build in the final dtype: an 8B model in fp32 first would need 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    tokenizer = AutoTokenizer.from_pretrained(
        DEMO_MODEL_DIR
    )  # ids < 4096 are valid for every shape here
    return model, tokenizer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Truncated:
    """Context manager: the model's layer list cut after ``last`` (restored on exit)."""

    def __init__(self, model: nn.Module, last: int):
        self.model, self.last = model, last

    def __enter__(self):
        name, self.layers = decoder_layers(self.model)
        parent_name, _, attr = name.rpartition(".")
        self.parent, self.attr = self.model.get_submodule(parent_name), attr
        setattr(self.parent, attr, nn.ModuleList(self.layers[: self.last + 1]))
        return self.model.base_model

    def __exit__(self, *exc):
        setattr(self.parent, self.attr, self.layers)


def from_text(
    model, tokenizer, dataset, hook: str, batch: int, context: int, n_tokens: int, device: str
) -> dict:
    """End to end from text, tokenization included, with and without the prefetch thread
    (best of 2 each): does prefetching pay?"""
    e2e: dict[str, list[float]] = {}
    for prefetch in (False, True, False, True):
        contexts = context_batches(
            dataset, tokenizer, context_tokens=context, token_budget=n_tokens, batch_contexts=batch
        )
        h = Harvester(model, tokenizer, contexts, [hook], prefetch=prefetch)
        sync(device)
        t = time.perf_counter()
        for _ in h:
            pass
        sync(device)
        e2e.setdefault(f"from_text_prefetch_{prefetch}", []).append(
            h.tokens_seen / (time.perf_counter() - t)
        )
    return {k: max(v) for k, v in e2e.items()}


@click.command()
@click.option(
    "--model",
    "model_name",
    default="builtin:demo-llama",
    show_default=True,
    help=f"builtin:demo-llama, a path/hub id, or a random shape: {', '.join(SHAPES)}.",
)
@click.option("--device", default="cpu", show_default=True)
@click.option("--hook", default="layers.2", show_default=True)
@click.option("--batch", default=8, show_default=True, help="Contexts per forward.")
@click.option("--context", default=256, show_default=True, help="Tokens per context.")
@click.option("--steps", default=6, show_default=True, help="Forward passes per timed run.")
@click.option("--rounds", default=5, show_default=True)
@click.option("--threads", default=2, show_default=True, help="torch CPU threads.")
@click.option(
    "--dataset",
    default="builtin:python-docs",
    show_default=True,
    help="Text for the end-to-end rate.",
)
def main(model_name, device, hook, batch, context, steps, rounds, threads, dataset):
    torch.set_num_threads(threads)
    model, tokenizer = build(model_name, device)
    point = resolve_hook(model, hook)
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(3, min(4096, len(tokenizer)), (batch, context), generator=g)
        for _ in range(steps)
    ]
    for b in batches:
        b[:, 0] = context_bos_id(tokenizer)
    dev_batches = [b.to(device) for b in batches]
    n_tokens = steps * batch * context

    def bare():
        with Truncated(model, point.layer) as base, torch.no_grad():
            for ids in dev_batches:
                base(input_ids=ids, use_cache=False)

    def harvest():
        for _acts in Harvester(model, tokenizer, dev_batches, [hook]):
            pass

    def full():
        with torch.no_grad():
            for ids in dev_batches:
                model(input_ids=ids, use_cache=False)

    runs = {"bare_truncated": bare, "harvest": harvest, "full_with_logits": full}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds + 1):  # round 0 warms up
        for name, fn in runs.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if r:
                times[name].append(time.perf_counter() - t)
    rate = {k: n_tokens / statistics.median(v) for k, v in times.items()}

    e2e = from_text(
        model, tokenizer, load_text_dataset(dataset), hook, batch, context, n_tokens, device
    )

    result = {
        "model": model_name,
        "device": device,
        "dtype": str(next(model.parameters()).dtype),
        "hook": hook,
        "batch": f"{batch}x{context}",
        "threads": threads,
        "tokens_per_s": {k: round(v) for k, v in {**rate, **e2e}.items()},
        "harvest_vs_bare": round(rate["harvest"] / rate["bare_truncated"], 3),
        "prefetch_gain": round(e2e["from_text_prefetch_True"] / e2e["from_text_prefetch_False"], 3),
    }
    if device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
