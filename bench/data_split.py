"""What holding out a test split costs the data path: tokenize + pack of local files,
with the split by text hash (data.split: train) against reading every document.

    python bench/data_split.py --rounds 5        # BENCHMARKS.md, "Held-out split of local data"

Both read the built-in corpus's train split written out as one JSONL file, with the demo
tokenizer, 256-token contexts; the two are interleaved round by round, and the ratio of
their medians is reported (tokens/s of packed contexts; the held-out run packs ~10% fewer).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
from transformers import AutoTokenizer

from sae.data.corpus import load
from sae.data.text import context_batches, load_text_dataset
from sae.models.demo_model import DEMO_MODEL_DIR


def packed_tokens_per_s(path: Path, tokenizer, hold_out: bool, streaming: bool) -> float:
    start = time.perf_counter()
    ds = load_text_dataset(str(path), "train", streaming=streaming, hold_out=hold_out)
    tokens = sum(
        b.numel() for b in context_batches(ds, tokenizer, context_tokens=256, batch_contexts=32)
    )
    return tokens / (time.perf_counter() - start)


@click.command()
@click.option("--rounds", default=5, show_default=True)
@click.option(
    "--streaming",
    is_flag=True,
    help="Stream the files (IterableDataset.filter) instead of loading them.",
)
def main(rounds: int, streaming: bool) -> None:
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in load("train")["text"]))
        runs: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):
            for hold_out in (False, True):
                runs[hold_out].append(packed_tokens_per_s(path, tokenizer, hold_out, streaming))
    every, held = statistics.median(runs[False]), statistics.median(runs[True])
    click.echo(
        f"all documents: {every:,.0f} tok/s; train split (10% held out by hash): {held:,.0f} tok/s; "
        f"ratio {held / every:.2f} ({rounds} rounds, medians, streaming={streaming})"
    )


if __name__ == "__main__":
    main()
