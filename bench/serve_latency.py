"""Latency and memory of the explorer (``analyze.py serve``) as the page uses it, over HTTP
on this machine: the issue's targets are prompt -> highlighted features for a 256-token prompt
under 200 ms, the first generated token under 300 ms, and a feature card from the statistics
cache under 150 ms, with memory that does not grow per request.

    python train.py configs/demo.yaml                       # the demo SAE, if not there yet
    PYTHONPATH=. python bench/serve_latency.py checkpoints/demo --rounds 20

First the SAE's statistics are scanned as the page's first card does (into a fresh cache
folder): while that scan runs on the model worker, prompts are analysed back to back, to
time how long a prompt waits behind the scan (one model batch at most).

Each round times, in turn: POST /api/features (a 256-token prompt), GET /api/card of a new
feature each time (statistics already cached: the first card is opened before timing), and
the time to the first line of POST /api/generate (first token of both sides and its KL),
then reads the rest of that stream (max_new_tokens 40) for the per-token time. The server
runs in this process (uvicorn in a thread); resident memory is read before and after.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from explorer_server import call, served  # noqa: E402

from sae.analysis.feature_stats import StatsSettings  # noqa: E402
from sae.serve.app import make_app  # noqa: E402
from sae.serve.explorer import Explorer  # noqa: E402

TEXT = (
    "If the key is missing, a KeyError is raised. The dictionary maps each name to a value, "
    "and get() returns None when the key is absent. "
)


def rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_of(explorer: Explorer, tokens: int) -> str:
    """A prompt of exactly ``tokens`` tokens (BOS included)."""
    ids = explorer.tokenizer(TEXT * 12, add_special_tokens=False)["input_ids"][: tokens - 1]
    text = explorer.tokenizer.decode(ids)
    assert len(explorer.prompt_ids(text)) == tokens, len(explorer.prompt_ids(text))
    return text


def timed_generation(url: str, body: dict) -> tuple[float, float, int]:
    """(seconds to the first step, seconds per later step, steps) of one generation."""
    request = urllib.request.Request(
        url + "/api/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        response.readline()
        first = time.perf_counter() - start
        steps = sum(1 for line in response if b'"baseline"' in line) + 1
    rest = time.perf_counter() - start - first
    return first, rest / max(steps - 1, 1), steps


def during_scan(url: str, prompt: str) -> tuple[list[float], float]:
    """Seconds of each POST /api/features made while the first statistics scan runs, and
    the seconds the scan took (to the first card)."""
    start = time.perf_counter()
    status, got = call(url + "/api/card?sae=0&feature=0")
    assert status == 202, (status, got)
    times = []
    while True:
        t = time.perf_counter()
        status, got = call(url + "/api/features", {"prompt": prompt})
        times.append(time.perf_counter() - t)
        assert status == 200, got
        status, got = call(url + "/api/card?sae=0&feature=0")
        if status != 202:
            assert status == 200, got
            return times, time.perf_counter() - start


def one_round(url: str, prompt: str, feature: int) -> dict:
    t = time.perf_counter()
    status, got = call(url + "/api/features", {"prompt": prompt})
    features_s = time.perf_counter() - t
    assert status == 200, got
    t = time.perf_counter()
    status, card = call(url + f"/api/card?sae=0&feature={feature}")
    card_s = time.perf_counter() - t
    assert status == 200, card
    body = {
        "prompt": TEXT,
        "edits": [{"sae": 0, "kind": "steer", "feature": 5, "value": 8}],
        "max_new_tokens": 40,
        "seed": 0,
    }
    first, per_token, _ = timed_generation(url, body)
    return {"features": features_s, "card": card_s, "first_token": first, "per_token": per_token}


@click.command()
@click.argument("sae", default="checkpoints/demo")
@click.option("--rounds", default=20, show_default=True)
@click.option("--prompt-tokens", default=256, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--stats-tokens", default=200_000, show_default=True)
@click.option(
    "--set", "overrides", multiple=True, help="Config overrides, as analyze.py serve --set."
)
def main(sae, rounds, prompt_tokens, threads, stats_tokens, overrides):
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as cache:
        settings = StatsSettings(tokens=stats_tokens)
        explorer = Explorer.open([sae], overrides, settings=settings, cache_dir=Path(cache))
        prompt = prompt_of(explorer, prompt_tokens)
        with served(make_app(explorer)) as url:
            scan_times, scan_s = during_scan(url, prompt)
            one_round(url, prompt, 1)  # warm-up
            before = rss_mb()
            times = [one_round(url, prompt, 2 + r) for r in range(rounds)]
            after = rss_mb()
    print(
        f"explorer latency: {sae}, {prompt_tokens}-token prompt, {rounds} rounds, {threads} threads"
    )
    print("| request | median ms | p90 ms | target ms |")
    print("| --- | --: | --: | --: |")
    rows = [(key, [t[key] for t in times], target) for key, target in TARGETS]
    rows.append(("features during the first scan", scan_times, None))
    for key, seconds, target in rows:
        values = sorted(1000 * t for t in seconds)
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        print(f"| {key} | {statistics.median(values):.1f} | {p90:.1f} | {target or '-'} |")
    print(
        f"the first scan ({stats_tokens:,} tokens) took {scan_s:.1f} s with {len(scan_times)} prompts beside it"
    )
    print(f"resident memory: {before:.0f} MiB before the timed rounds, {after:.0f} MiB after")


TARGETS = (("features", 200), ("first_token", 300), ("card", 150), ("per_token", None))


if __name__ == "__main__":
    main()
