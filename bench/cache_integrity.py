"""What checking the activation cache costs: reading shards with their CRC-32 checked
(``read_shard``, what runs read now) against the plain safetensors read without a check.

    python bench/cache_integrity.py [--shards 4] [--shard-mb 256] [--rounds 5]

Writes a cache of random float32 shards in a temporary folder (page-cached: this measures
the CPU cost of the check, the worst case; from a cold disk the check's read is the read
the run needs anyway), then times reading every shard and copying its rows out, both
ways, interleaved round by round, and prints the median of each and their ratio. Also times ``first_damaged`` (the size check made when a cache is opened).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import click
import torch
from safetensors.torch import load_file

from sae.activations.cache import CacheWriter, first_damaged, read_manifest, read_shard


def build_cache(folder: Path, shards: int, shard_mb: int, width: int = 2048) -> dict:
    rows = shard_mb * 2**20 // (4 * width)
    writer = CacheWriter(folder, {"model": "bench", "hooks": ["h"]}, shard_tokens=rows)
    for i in range(shards):
        writer.add({"h": torch.randn(rows, width)}, contexts_done=i + 1)
    writer.finish()
    return read_manifest(folder)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@click.command()
@click.option("--shards", default=4, show_default=True)
@click.option("--shard-mb", default=256, show_default=True, help="Size of each shard in MiB.")
@click.option("--rounds", default=5, show_default=True)
def main(shards: int, shard_mb: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = build_cache(folder, shards, shard_mb)
        listed = manifest["shards"]
        # Both copy every row out, as the shuffling buffer does: load_file alone maps the
        # file and reads nothing.
        contenders = {
            "plain load_file": lambda: [
                load_file(str(folder / s["file"]))["h"].clone() for s in listed
            ],
            "read_shard (CRC-32 checked)": lambda: [
                read_shard(folder, s)["h"].clone() for s in listed
            ],
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, fn in contenders.items():
                times[name].append(timed(fn))
        gb = shards * shard_mb / 1024
        for name, t in times.items():
            print(
                f"{name:<30} median {statistics.median(t):.3f} s for {gb:.2f} GiB "
                f"({gb / statistics.median(t):.2f} GiB/s)"
            )
        plain, checked = (statistics.median(t) for t in times.values())
        print(f"checked / plain: {checked / plain:.2f}x")
        sizes = statistics.median(
            timed(lambda: first_damaged(folder, listed)) for _ in range(rounds)
        )
        print(f"size check at open (first_damaged), {shards} shards: {sizes * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
