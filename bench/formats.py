"""Converting and loading a wide SAE in each format: time and peak memory (one process).

    python bench/formats.py --d 4096 --latents 65536 --dtype bfloat16

Builds a random SAELens folder of that shape, then times: SAELens -> ours, ours ->
SAELens, ours -> sparsify (W_enc transposed on write), sparsify -> ours, and load_sae of
each (into float32 on the CPU). Peak RSS is the process's, so run one size per call.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae.formats import convert, load_sae


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--latents", type=int, default=65536)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument(
        "--dir", type=Path, default=None, help="scratch folder (default: a temporary one)"
    )
    a = p.parse_args()
    root = Path(a.dir or tempfile.mkdtemp(prefix="sae-formats-"))
    dtype = getattr(torch, a.dtype)
    d, M = a.d, a.latents
    g = torch.Generator().manual_seed(0)
    src = root / "saelens"
    src.mkdir(parents=True, exist_ok=True)
    W = torch.randn(M, d, generator=g, dtype=torch.float32).to(dtype)
    save_file(
        {
            "W_enc": W.t().contiguous(),
            "W_dec": W,
            "b_enc": torch.zeros(M, dtype=dtype),
            "b_dec": torch.zeros(d, dtype=dtype),
        },
        str(src / "sae_weights.safetensors"),
    )
    del W
    (src / "cfg.json").write_text(
        json.dumps(
            {
                "architecture": "topk",
                "d_in": d,
                "d_sae": M,
                "k": 64,
                "dtype": a.dtype,
                "metadata": {"hook_name": "blocks.16.hook_resid_post", "sae_lens_version": "6.5.0"},
            }
        )
    )
    size = (src / "sae_weights.safetensors").stat().st_size
    print(
        f"SAE: d {d}, {M:,} latents, {a.dtype}, {size / 2**30:.2f} GiB of weights; CPU, torch {torch.__version__}"
    )
    steps = [
        ("SAELens -> ours", src, root / "ours", "sae"),
        ("ours -> SAELens", root / "ours", root / "sl", "saelens"),
        ("ours -> sparsify", root / "ours", root / "sp", "sparsify"),
        ("sparsify -> ours", root / "sp" / "layers.16", root / "back", "sae"),
    ]
    for label, s, t, fmt in steps:
        start = time.perf_counter()
        convert(s, t, fmt, log=lambda line: None)
        print(f"  convert {label:<18} {time.perf_counter() - start:6.2f} s")
    for label, folder in [
        ("ours", root / "ours"),
        ("SAELens", src),
        ("sparsify", root / "sp" / "layers.16"),
    ]:
        start = time.perf_counter()
        sae = load_sae(folder)
        print(
            f"  load_sae {label:<17} {time.perf_counter() - start:6.2f} s  (float32, {sae.cfg.num_latents:,} latents)"
        )
        del sae
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if a.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
