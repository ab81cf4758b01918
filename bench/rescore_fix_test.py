"""Score the continuations of a finished fix test again with another scorer.

    python analyze.py fix-test ... --scorer words:FILE --json > fix.json
    python bench/rescore_fix_test.py fix.json --scorer profanity

Sampling is the expensive part of a fix test (minutes on a CPU); the continuations are the
same for any scorer (same seed), so a second scorer only needs them scored again. Prints
the mean score and the fraction above --threshold for baseline and intervened, with 95%
bootstrap intervals over prompts and the paired change, as ``fix-test`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from sae.interventions.fix_test import bootstrap_ci
from sae.interventions.scorers import load_scorer

CONDITIONS = ("baseline", "intervened")


@click.command()
@click.argument("fix_json", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--scorer", "spec", required=True, help="Any fix-test scorer: words:..., hf:..., profanity."
)
@click.option("--threshold", type=float, default=0.5, show_default=True)
def main(fix_json: Path, spec: str, threshold: float) -> None:
    data = json.loads(fix_json.read_text())
    scorer = load_scorer(spec)
    prompts = data["prompts"]
    samples = len(prompts[0]["baseline"])
    scores = {
        c: torch.tensor(
            scorer([s["text"] for p in prompts for s in p[c]]), dtype=torch.float64
        ).view(len(prompts), samples)
        for c in CONDITIONS
    }  # [prompts, samples]
    paired = torch.stack([scores[c] for c in CONDITIONS], 1)  # [prompts, 2, samples]
    stats = {
        "mean score": lambda s: s.mean(),
        f"fraction > {threshold:g}": lambda s: (s > threshold).double().mean(),
    }
    print(f"{len(prompts)} prompts x {samples} samples of {fix_json}; scorer {scorer.name}")
    for label, fn in stats.items():
        cells = []
        for c in CONDITIONS:
            lo, hi = bootstrap_ci(scores[c], fn, seed=1)
            cells.append(f"{float(fn(scores[c])):.4f} [{lo:.4f}, {hi:.4f}]")
        diff = lambda p, fn=fn: fn(p[:, 1]) - fn(p[:, 0])  # noqa: E731
        lo, hi = bootstrap_ci(paired, diff, seed=1)
        cells.append(f"{float(diff(paired)):+.4f} [{lo:+.4f}, {hi:+.4f}]")
        print(f"  {label:<16} baseline {cells[0]}  intervened {cells[1]}  change {cells[2]}")


if __name__ == "__main__":
    main()
