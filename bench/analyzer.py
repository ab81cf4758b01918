"""Analyzer cost: feature statistics against harvest alone, and the HTML report at scale.

    python bench/analyzer.py --sae checkpoints/demo1/layers.2 --wait-idle 120      # BENCHMARKS.md
    python bench/analyzer.py --tokens 20000 --rounds 1 --sizes 4096 --skip-browser   # quick look

1. Throughput on the demo model at layers.2, on the same pre-packed contexts of
   ``builtin:python-docs`` (tokenization is not timed): (a) harvest alone (ActivationCapture,
   forward stopped after the hooked layer), (b) harvest + SAE encode, (c) the full
   ``compute_feature_stats`` (default StatsSettings). Rounds alternate a, b, c (and a, c
   with one torch thread, unless ``--no-one-thread``) so drifts in machine speed hit all
   alike; medians are reported, over all rounds and over the quiet ones (no other process
   used >= 0.3 cores during any run of the round). One more run of (c), outside the table,
   splits its time into forward, encode, top-example offers, reservoir offers and the rest
   of the accumulator update.
2. Report build time and file size for synthetic FeatureStats of each ``--sizes`` feature
   count (every feature with a card, and with cards for the first 4,096 only), plus the
   real statistics of part 1 and a synthetic twin of the same size, which checks that the
   synthetic data compresses like the real thing. Builds run with ``--build-threads`` (1)
   torch threads: on this 2-core box a second thread gains little on the report's small
   tensor ops and loses 2-3x whenever another process holds a core (the real-stats build is
   timed both ways, interleaved).
3. Each report opened in headless Chromium: time from ``driver.get`` until the index has
   rows, time to sort the index by density, and time for a card to render its examples
   after ``location.hash = '#f=N'`` (the first card of a block decodes it; the second is
   from an already decoded block).

Synthetic statistics: densities log-normal (median 10^-3.5, 0.7 decades), a 2^20-token
scan, 20 top examples and 4 x 5 reservoir samples per feature (fewer for a feature that
fired less often), 17-token windows cut from the real token stream of ``builtin:python-docs``
(so the page's text compresses like real text; 1.5% of windows padded at a context start),
window activations nonzero on the example token and on ~6% of the others (as measured on
the demo SAE), 10 promoted + 10 suppressed tokens and 8 nearest features per feature.
Temporary files go under /tmp and are removed at the end. On a shared machine, ``--wait-idle S``
waits up to S seconds before each round and each build for other processes to go quiet; the
cores they used during each timed run are recorded either way.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from browser import start_chromium  # noqa: E402

from sae.activations.capture import special_token_ids
from sae.activations.hooks import ActivationCapture, resolve_hook
from sae.analysis.feature_stats import (
    HIST_BINS,
    Examples,
    FeatureStats,
    StatsAccumulator,
    StatsSettings,
    compute_feature_stats,
    hist_bin,
)
from sae.analysis.logit_effects import logit_effects, nearest_features
from sae.analysis.report import build_report
from sae.config import ModelConfig, sae_config
from sae.data.text import context_batches, load_text_dataset
from sae.formats import load_sae
from sae.models.loading import load_model
from sae.training.trainer import make_sae

HOOK = "layers.2"
CARDS_SUBSET = 4096
MiB = 2**20
T0 = time.perf_counter()


def log(message: str) -> None:
    click.echo(f"[{time.perf_counter() - T0:6.0f} s] {message}", err=True)


class OtherLoad:
    """Cores used by other processes while it runs (from /proc: all busy time minus ours)."""

    TICK = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        busy = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait
        with open("/proc/self/stat") as f:
            own = f.read().rpartition(")")[2].split()
        return time.perf_counter(), busy, int(own[11]) + int(own[12])  # utime + stime

    def __enter__(self):
        self.start = self._sample()
        return self

    def __exit__(self, *exc):
        t1, busy1, own1 = self._sample()
        t0, busy0, own0 = self.start
        self.cores = max(0.0, (busy1 - busy0) - (own1 - own0)) / self.TICK / max(t1 - t0, 1e-9)


QUIET = 0.3  # other processes' cores below which the machine counts as quiet


def wait_idle(max_s: float, below: float = QUIET) -> float:
    """Wait (at most max_s seconds) until other processes use < ``below`` cores over one
    second; the seconds waited. With a busy machine, timings mean little (see --wait-idle)."""
    t = time.perf_counter()
    while time.perf_counter() - t < max_s:
        with OtherLoad() as load:
            time.sleep(1.0)
        if load.cores < below:
            break
    return time.perf_counter() - t


# ---- part 1: statistics throughput --------------------------------------------------------


def throughput(
    model,
    tokenizer,
    sae,
    all_batches: list[torch.Tensor],
    rounds: int,
    one_thread: bool,
    idle_s: float,
) -> dict:
    point = resolve_hook(model, HOOK)
    n_tokens = sum(b.numel() for b in all_batches)
    batches = list(all_batches)  # what the runs below iterate: two batches in the warm-up round
    settings = (
        StatsSettings()
    )  # 2^20 tokens: more than any --tokens here, so every batch is scanned

    @torch.no_grad()
    def harvest():
        capture = ActivationCapture(model, [point])
        for ids in batches:
            capture.run(input_ids=ids)

    @torch.no_grad()
    def encode():
        capture = ActivationCapture(model, [point])
        for ids in batches:
            acts = capture.run(input_ids=ids)[HOOK]
            sae.encode(acts.reshape(-1, acts.shape[-1]))

    def stats():
        return compute_feature_stats(model, tokenizer, sae, HOOK, batches, settings, progress=False)

    runs = {"harvest": harvest, "harvest+encode": encode, "feature stats": stats}
    default_threads = torch.get_num_threads()
    variants = [(default_threads, "")] + (
        [(1, " (1 thread)")] if one_thread and default_threads > 1 else []
    )
    times: dict[str, list[float]] = {}
    others: dict[str, list[float]] = {}
    waited = 0.0
    timed_batches = all_batches
    for r in range(rounds + 1):
        batches[:] = (
            timed_batches[:2] if r == 0 else timed_batches
        )  # round 0 warms up on two batches
        waited += wait_idle(idle_s) if r else 0.0
        for threads, suffix in variants:
            torch.set_num_threads(threads)
            for name, fn in runs.items():
                if suffix and name == "harvest+encode":
                    continue  # one thread: only the two ends
                with OtherLoad() as load:
                    t = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t
                if r:
                    times.setdefault(name + suffix, []).append(dt)
                    others.setdefault(name + suffix, []).append(load.cores)
                    log(
                        f"round {r}: {name + suffix} {dt:.1f} s (other processes: {load.cores:.2f} cores)"
                    )
    torch.set_num_threads(default_threads)
    med = {k: statistics.median(v) for k, v in times.items()}
    # Rounds in which no run shared the machine (other processes < QUIET cores throughout).
    quiet = [r for r in range(rounds) if all(v[r] < QUIET for v in others.values())]
    flat = [x for v in others.values() for x in v]
    return {
        "tokens": n_tokens,
        "threads": default_threads,
        "rounds": rounds,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "other_cores": {k: [round(x, 2) for x in v] for k, v in others.items()},
        "other_cores_median": statistics.median(flat),
        "other_cores_max": max(flat),
        "waited_s": waited,
        "quiet_rounds": quiet,
        "tok_per_s_quiet": {
            k: n_tokens / statistics.median([v[r] for r in quiet]) for k, v in times.items()
        }
        if quiet
        else None,
        "tok_per_s": {k: n_tokens / v for k, v in med.items()},
        "breakdown": breakdown(model, tokenizer, sae, all_batches, settings, point),
    }


@torch.no_grad()
def breakdown(model, tokenizer, sae, batches, settings: StatsSettings, point) -> dict:
    """One pass of compute_feature_stats's loop, its parts timed (seconds)."""
    capture = ActivationCapture(model, [point])
    special = special_token_ids(tokenizer)
    acc = StatsAccumulator(sae.cfg.num_latents, settings, "cpu")
    parts = {
        "forward": 0.0,
        "encode": 0.0,
        "top offer": 0.0,
        "reservoir offer": 0.0,
        "update, other": 0.0,
    }

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            fn(*args, **kwargs)
            parts[key] += time.perf_counter() - t

        return wrapper

    acc.top.offer = timed("top offer", acc.top.offer)
    acc.reservoir.offer = timed("reservoir offer", acc.reservoir.offer)
    t_all = time.perf_counter()
    for ids in batches:
        t = time.perf_counter()
        acts = capture.run(input_ids=ids)[HOOK]
        t1 = time.perf_counter()
        z = sae.encode(acts.reshape(-1, acts.shape[-1])).view(*acts.shape[:2], -1)
        t2 = time.perf_counter()
        offers = parts["top offer"] + parts["reservoir offer"]
        acc.update(z, ids, ~torch.isin(ids, special))
        parts["forward"] += t1 - t
        parts["encode"] += t2 - t1
        parts["update, other"] += (
            time.perf_counter() - t2 - (parts["top offer"] + parts["reservoir offer"] - offers)
        )
    t = time.perf_counter()
    acc.result({})
    parts["result (sort, copy)"] = time.perf_counter() - t
    parts["total"] = time.perf_counter() - t_all
    return parts


# ---- part 2: synthetic statistics and report build ----------------------------------------


def synthetic_stats(
    M: int,
    stream: torch.Tensor,
    vocab: int,
    seed: int = 0,
    settings: StatsSettings = StatsSettings(),
) -> FeatureStats:
    """FeatureStats of M features shaped like a real scan (see the module docstring).

    stream: the real token ids [N] that windows are cut from (BOS/EOS included)."""
    g = torch.Generator().manual_seed(seed)
    tokens = 2**20
    before, W = settings.context_before, settings.window
    log10_density = (-3.5 + 0.7 * torch.randn(M, generator=g, dtype=torch.float64)).clamp(max=-0.5)
    fires = (10**log10_density * tokens).round().long()
    mean = torch.exp(0.7 + 0.4 * torch.randn(M, generator=g))  # mean activation where it fires
    act_max = mean * (2.5 + torch.rand(M, generator=g))

    def examples(S: int, top: bool) -> Examples:
        n = fires.clamp(max=S)
        filled = torch.arange(S)[None, :] < n[:, None]  # [M, S]
        if top:  # largest first, down to ~0.7 of the maximum
            frac = 1 - 0.3 * torch.rand(M, S, generator=g).sort(dim=1).values
        else:
            frac = 0.05 + 0.65 * torch.rand(M, S, generator=g)
        values = act_max[:, None] * frac
        start = torch.randint(0, len(stream) - W, (M, S), generator=g)
        win_tokens = stream[start[..., None] + torch.arange(W)]  # [M, S, W]
        win_acts = torch.where(
            torch.rand(M, S, W, generator=g) < 0.06,
            values[..., None] * torch.rand(M, S, W, generator=g),
            0.0,
        )
        win_acts[..., before] = values
        # 1.5% of examples sit near a context start: padding (-1, activation 0) in front.
        pos = torch.randint(0, 256, (M, S), generator=g)
        near = torch.rand(M, S, generator=g) < 0.015
        pos = torch.where(
            near, torch.randint(0, before, (M, S), generator=g), pos.clamp(min=before)
        )
        pad = torch.arange(W)[None, None, :] < (before - pos)[..., None]
        win_tokens[pad], win_acts[pad] = -1, 0.0
        win_acts = win_acts.half().float()
        keys = values if top else torch.rand(M, S, generator=g)
        ctx = torch.randint(0, 4096, (M, S), generator=g)
        return Examples(
            keys=torch.where(filled, keys, -math.inf),
            values=torch.where(filled, values, math.nan),
            context=torch.where(filled, ctx, -1),
            position=torch.where(filled, pos, -1),
            window_tokens=torch.where(filled[..., None], win_tokens, -1),
            window_acts=torch.where(filled[..., None], win_acts, 0.0),
        )

    top = examples(settings.top_examples, top=True)
    reservoir = examples(settings.quantile_bins * settings.samples_per_bin, top=False)
    # Histogram: ~10 neighbouring log2 bins around the mean, counts summing to fires.
    hist = torch.zeros(M, HIST_BINS, dtype=torch.long)
    centre = hist_bin(mean)
    spread = torch.arange(-6, 4)
    weight = torch.exp(-0.5 * (spread / 2.0) ** 2)
    cols = (centre[:, None] + spread).clamp(0, HIST_BINS - 1)
    counts = (fires[:, None].double() * weight / weight.sum()).floor().long()
    counts[:, 6] += fires - counts.sum(1)
    hist.scatter_add_(1, cols, counts)
    logits = {
        "top_ids": torch.randint(0, vocab, (M, 10), generator=g),
        "top_values": (0.3 + 0.4 * torch.rand(M, 10, generator=g)).sort(1, descending=True).values,
        "bottom_ids": torch.randint(0, vocab, (M, 10), generator=g),
        "bottom_values": -(0.3 + 0.4 * torch.rand(M, 10, generator=g))
        .sort(1, descending=True)
        .values,
    }
    nearest = {
        "ids": torch.randint(0, M, (M, 8), generator=g),
        "cosine": (0.1 + 0.5 * torch.rand(M, 8, generator=g)).sort(1, descending=True).values,
    }
    return FeatureStats(
        tokens=tokens,
        contexts=tokens // 256,
        fires=fires,
        act_sum=fires.double() * mean.double(),
        act_max=torch.where(fires > 0, act_max, 0.0),
        hist=hist,
        top=top,
        reservoir=reservoir,
        settings=settings,
        info={"logit_rule": "synthetic"},
        logits=logits,
        nearest=nearest,
    )


def timed_build(
    stats: FeatureStats,
    tokenizer,
    path: Path,
    label: str,
    threads: int,
    cards=None,
    idle_s: float = 0.0,
) -> dict:
    waited = wait_idle(idle_s)
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with OtherLoad() as load:
            t = time.perf_counter()
            info = build_report(
                stats,
                tokenizer,
                path,
                title=label,
                sae_info={"SAE": label},
                cards=cards,
                progress=False,
            )
            seconds = time.perf_counter() - t
    finally:
        torch.set_num_threads(default)
    log(f"built {label} ({threads} thread(s)): {seconds:.1f} s, {info.bytes / MiB:.1f} MiB")
    return {
        "label": label,
        "path": str(path),
        "features": info.features,
        "cards": info.cards,
        "threads": threads,
        "build_s": seconds,
        "mib": info.bytes / MiB,
        "bytes_per_card": info.bytes / max(info.cards, 1),
        "other_cores": load.cores,
        "waited_s": waited,
    }


# ---- part 3: headless Chromium -------------------------------------------------------------


def tree_pss_mib(root: int) -> float:
    """Proportional set size of a process and all its descendants (Linux /proc), MiB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])  # kB
        except OSError:
            pass
    return total / 1024


# Sets the hash and resolves with the ms until card f shows its examples (or its "no card" note).
OPEN_CARD_JS = """
const [f, done] = arguments;
const card = document.getElementById('card');
const ready = () => { const h = card.querySelector('h2');
  return h && h.textContent === 'Feature ' + f && !card.textContent.includes('loading')
    && (card.querySelector('.ex') || card.textContent.includes('No card')
        || card.textContent.includes('never fired')); };
const t0 = performance.now();
const obs = new MutationObserver(() => { if (ready()) { obs.disconnect();
  done({ms: performance.now() - t0, examples: card.querySelectorAll('.ex').length}); } });
obs.observe(card, {childList: true, subtree: true});
location.hash = 'f=' + f;
"""
SORT_JS = """
const t0 = performance.now();
document.querySelector('#feature-index th[data-key="density"]').click();
return performance.now() - t0;
"""
ROWS_JS = "return document.querySelectorAll('#feature-index tbody tr').length"


def open_in_browser(driver, build: dict, timeout_s: float) -> dict:
    from selenium.common.exceptions import TimeoutException, WebDriverException

    out = {}
    url = Path(build["path"]).as_uri()
    try:
        driver.get("about:blank")
        driver.set_page_load_timeout(timeout_s)
        driver.set_script_timeout(timeout_s)
        t = time.perf_counter()
        driver.get(url)
        while not driver.execute_script(ROWS_JS):
            if time.perf_counter() - t > timeout_s:
                raise TimeoutException("no index rows")
            time.sleep(0.01)
        out["load_s"] = time.perf_counter() - t
        nav = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            "return {dcl: n.domContentLoadedEventEnd, load: n.loadEventEnd};"
        )
        out["dom_content_loaded_s"] = nav["dcl"] / 1000
        out["sort_ms"] = driver.execute_script(SORT_JS)
        last = build["cards"] - 1 if build["cards"] < build["features"] else build["features"] - 1
        for key, f in (("card_cold_ms", 0), ("card_warm_ms", 1), ("card_last_ms", last)):
            r = driver.execute_async_script(OPEN_CARD_JS, f)
            out[key] = r["ms"]
            out[key.replace("_ms", "_examples")] = r["examples"]
        out["browser_pss_mib"] = tree_pss_mib(
            driver.service.process.pid
        )  # Chromium, all its processes
    except TimeoutException as e:
        out["error"] = f"timeout after {timeout_s:.0f} s ({e.msg or 'page load'})"
    except WebDriverException as e:
        out["error"] = f"browser error: {(e.msg or str(e)).splitlines()[0]}"
    return out


# ---- main -----------------------------------------------------------------------------------


def fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k"


@click.command()
@click.option(
    "--sae",
    "sae_path",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="SAE folder (e.g. checkpoints/demo1/layers.2); default: a random TopK SAE, 2048 latents, k = 32.",
)
@click.option(
    "--tokens", default=100_000, show_default=True, help="Tokens per timed pass (part 1)."
)
@click.option(
    "--rounds", default=3, show_default=True, help="Timed rounds (part 1), after one warm-up round."
)
@click.option(
    "--sizes",
    default="16384,131072",
    show_default=True,
    help="Feature counts of the synthetic reports.",
)
@click.option(
    "--skip-browser", is_flag=True, help="Build the reports but do not open them in Chromium."
)
@click.option("--skip-throughput", is_flag=True, help="Parts 2 and 3 only.")
@click.option(
    "--one-thread/--no-one-thread",
    default=True,
    show_default=True,
    help="Also time harvest and feature stats with torch.set_num_threads(1).",
)
@click.option(
    "--build-threads",
    default=1,
    show_default=True,
    help="torch threads while building reports (also compared with the default on the real stats).",
)
@click.option(
    "--wait-idle",
    "idle_s",
    default=0.0,
    show_default=True,
    help="Before each timed round and each build, wait up to this many seconds for other processes "
    "to use < 0.3 cores.",
)
@click.option(
    "--browser-timeout",
    default=120,
    show_default=True,
    help="Seconds before a page load counts as failed.",
)
@click.option(
    "--json-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the raw results here.",
)
def main(
    sae_path,
    tokens,
    rounds,
    sizes,
    skip_browser,
    skip_throughput,
    one_thread,
    build_threads,
    idle_s,
    browser_timeout,
    json_out,
):
    t_start = time.perf_counter()
    model, tokenizer = load_model(ModelConfig())
    torch.manual_seed(0)
    sae = (
        load_sae(sae_path)
        if sae_path
        else make_sae(sae_config("topk", num_latents=2048, k=32), model.config.hidden_size)
    )
    sae.eval()
    sae_label = sae_path or "random TopK, 2048 latents, k = 32"
    dataset = load_text_dataset("builtin:python-docs")
    batches = list(
        context_batches(
            dataset, tokenizer, context_tokens=256, token_budget=tokens, batch_contexts=8
        )
    )
    results: dict = {
        "sae": sae_label,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }

    if not skip_throughput:
        tp = throughput(model, tokenizer, sae, batches, rounds, one_thread, idle_s)
        results["throughput"] = tp
    real = compute_feature_stats(
        model, tokenizer, sae, HOOK, batches, StatsSettings(), progress=False
    )
    with torch.no_grad():
        real.logits, real.info["logit_rule"] = logit_effects(model, sae.W_dec, n=10, progress=False)
        real.nearest = nearest_features(sae.W_dec, n=8, progress=False)

    tmp = Path(tempfile.mkdtemp(prefix="sae-bench-analyzer-", dir="/tmp"))
    try:
        stream = torch.cat(batches).reshape(-1)
        vocab = len(tokenizer)
        label = f"real stats ({real.num_features:,} features)"
        # Threads for the tensor work of build_report: 1 vs the default, interleaved, on the real stats.
        check = {}
        for _ in range(2):
            for threads in dict.fromkeys((build_threads, results["threads"])):
                check.setdefault(threads, []).append(
                    timed_build(real, tokenizer, tmp / "real.html", label, threads, idle_s=idle_s)
                )
        results["build_threads_check"] = {t: [b["build_s"] for b in v] for t, v in check.items()}
        builds = [check[build_threads][-1]]
        builds[0]["build_s"] = statistics.median(results["build_threads_check"][build_threads])
        twin = synthetic_stats(real.num_features, stream, vocab)
        builds.append(
            timed_build(
                twin,
                tokenizer,
                tmp / "twin.html",
                f"synthetic, {real.num_features:,} features",
                build_threads,
                idle_s=idle_s,
            )
        )
        del twin
        for M in (int(s) for s in sizes.split(",") if s.strip()):
            t = time.perf_counter()
            stats = synthetic_stats(M, stream, vocab)
            gen_s = time.perf_counter() - t
            builds.append(
                {
                    **timed_build(
                        stats,
                        tokenizer,
                        tmp / f"all-{M}.html",
                        f"synthetic, {M:,} features",
                        build_threads,
                        idle_s=idle_s,
                    ),
                    "generate_s": gen_s,
                }
            )
            if M > CARDS_SUBSET:
                builds.append(
                    timed_build(
                        stats,
                        tokenizer,
                        tmp / f"cards-{M}.html",
                        f"synthetic, {M:,} features, cards for the first {CARDS_SUBSET:,}",
                        build_threads,
                        cards=range(CARDS_SUBSET),
                        idle_s=idle_s,
                    )
                )
            del stats
        results["builds"] = builds

        if not skip_browser:
            profile = tempfile.mkdtemp(prefix="sae-bench-chromium-", dir="/tmp")
            driver = start_chromium(profile)
            try:
                driver.get("about:blank")
                results["browser_pss_blank_mib"] = tree_pss_mib(driver.service.process.pid)
                for b in builds:
                    b["browser"] = open_in_browser(driver, b, browser_timeout)
                    log(f"opened {b['label']}: {b['browser']}")
                    if (
                        "error" in b["browser"]
                    ):  # a crashed or hung tab: carry on in a fresh browser
                        driver.quit()
                        driver = start_chromium(profile)
            finally:
                driver.quit()
                shutil.rmtree(profile, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - t_start

    print_tables(results)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=1, default=str))


def print_tables(results: dict) -> None:
    print(
        f"\nSAE: {results['sae']}; torch {results['torch']}, {results['threads']} threads; "
        f"wall {results['wall_s']:.0f} s\n"
    )
    tp = results.get("throughput")
    if tp:
        r = tp["tok_per_s"]
        print(
            f"Throughput, demo model, {HOOK}, {tp['tokens']:,} tokens in 8 x 256 batches, "
            f"median of {tp['rounds']} interleaved rounds; other processes used {tp['other_cores_median']:.2f} "
            f"cores (median, max {tp['other_cores_max']:.2f}) during the timed runs:\n"
        )
        print(
            "| rounds | threads | (a) harvest | (b) harvest + encode | (c) feature stats | (b)/(a) | (c)/(a) |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        sets = [(f"all {tp['rounds']}", r)]
        if tp.get("tok_per_s_quiet"):
            sets.append((f"{len(tp['quiet_rounds'])} quiet", tp["tok_per_s_quiet"]))
        for label, r in sets:
            print(
                f"| {label} | {tp['threads']} | {fmt_rate(r['harvest'])} tok/s | "
                f"{fmt_rate(r['harvest+encode'])} tok/s | {fmt_rate(r['feature stats'])} tok/s | "
                f"{r['harvest+encode'] / r['harvest']:.2f} | **{r['feature stats'] / r['harvest']:.2f}** |"
            )
            if "harvest (1 thread)" in r:
                a1, c1 = r["harvest (1 thread)"], r["feature stats (1 thread)"]
                print(
                    f"| {label} | 1 | {fmt_rate(a1)} tok/s | - | {fmt_rate(c1)} tok/s | - | **{c1 / a1:.2f}** |"
                )
        bd = tp["breakdown"]
        total = bd["total"]
        print(
            f"\nOne (c) pass split up ({total:.2f} s, {tp['tokens'] / total / 1000:.1f}k tok/s):\n"
        )
        print("| " + " | ".join(k for k in bd if k != "total") + " |")
        print("| " + " | ".join("---" for k in bd if k != "total") + " |")
        print(
            "| "
            + " | ".join(f"{v:.2f} s ({v / total:.0%})" for k, v in bd.items() if k != "total")
            + " |"
        )
    tc = results["build_threads_check"]
    runs = (
        f"{t} thread{'s' if int(t) > 1 else ''}: {', '.join(f'{x:.1f}' for x in v)}"
        for t, v in tc.items()
    )
    print(
        "\nbuild_report of the real stats, seconds by torch threads (interleaved): "
        + "; ".join(runs)
    )
    print(
        f"\nReport build ({results['builds'][0]['threads']} torch thread(s)) and opening in headless Chromium"
        + (
            f" (Chromium on about:blank: {results['browser_pss_blank_mib']:.0f} MiB PSS)"
            if "browser_pss_blank_mib" in results
            else ""
        )
        + ":\n"
    )
    print(
        "| report | cards | build | other cores | file | per card | load to index rows | sort by density "
        "| 1st card of a block | 2nd card, same block | last card | Chromium memory (PSS) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for b in results["builds"]:
        br = b.get("browser")
        if br is None:
            cols = ["-"] * 6
        elif "error" in br:
            cols = [br["error"]] + ["-"] * 5
        else:
            cols = [
                f"{br['load_s']:.2f} s",
                f"{br['sort_ms']:.0f} ms",
                f"{br['card_cold_ms']:.0f} ms",
                f"{br['card_warm_ms']:.0f} ms",
                f"{br['card_last_ms']:.0f} ms",
                f"{br['browser_pss_mib']:.0f} MiB",
            ]
        print(
            f"| {b['label']} | {b['cards']:,} | {b['build_s']:.1f} s | {b['other_cores']:.2f} | {b['mib']:.1f} MiB | "
            f"{b['bytes_per_card'] / 1024:.2f} KiB | " + " | ".join(cols) + " |"
        )


if __name__ == "__main__":
    main()
