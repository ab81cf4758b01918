"""Feature statistics over a dataset, streamed in one pass with bounded memory.

    stats = compute_feature_stats(model, tokenizer, sae, "layers.2", contexts, StatsSettings())
    stats.density            # [M] fraction of scanned tokens on which each feature fires
    stats.top.values[f]      # the feature's top activations, largest first
    stats.top.window_tokens[f, i]   # the token ids around example i, [W]
    stats.top.window_acts[f, i]     # the feature's activation on each of them, [W]

Per feature (M features): firing count, sum and maximum of its activation, a histogram
of its nonzero activations on a fixed log2 grid (``HIST_*``), the ``top_examples``
token positions with the largest activation, and a uniform random sample of its firing
positions (``samples_per_bin`` x ``quantile_bins`` of them, a reservoir kept by random
keys), which ``quantile_samples`` splits into activation-quantile bins. Every example
keeps a window of ``context_before`` tokens before and ``context_after`` after it, with
the feature's activation on each, so a report can highlight it without running the
model again.

Memory is O(M x examples x window), whatever the number of tokens scanned. Special
tokens (BOS, EOS, pad) are never counted and never examples; they appear in windows with
activation 0.

``save_feature_stats`` / ``load_feature_stats`` keep it as one safetensors file whose
header metadata holds the settings and an identity (SAE, model, hook, data) that decides
whether a cached file is still valid.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Generator, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.activations.capture import MaskedCapture
from sae.architectures import SparseAutoencoder
from sae.atomic_io import fsync_dir, save_tensors
from sae.errors import ConfigError, DataError, StorageError

FORMAT = "sae-feature-stats/1"
T = TypeVar("T")
# Histogram of nonzero activations: bin i holds values in [2^((i + 1) / 4 + LOG2_MIN) ...),
# clamped at both ends, so it needs no range known in advance.
HIST_BINS_PER_OCTAVE = 4
HIST_LOG2_MIN = -16
HIST_BINS = 32 * HIST_BINS_PER_OCTAVE  # 2^-16 .. 2^16
# Elements of the [tokens, M] latent matrix processed at once (512 MB in fp32).
CHUNK_ELEMENTS = 2**27


@dataclass(frozen=True)
class StatsSettings:
    """What a statistics pass collects. ``tokens`` counts scanned (non-special) tokens."""

    tokens: int = 2**20
    top_examples: int = 20
    quantile_bins: int = 4
    samples_per_bin: int = 5
    context_before: int = 12
    context_after: int = 4
    seed: int = 0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name in ("context_before", "context_after", "seed") else 1
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{f.name}: {value!r} must be an integer >= {low}")

    @property
    def window(self) -> int:
        return self.context_before + 1 + self.context_after


@dataclass
class Examples:
    """S example token positions per feature, M features; empty slots have value NaN,
    context -1 and window tokens -1.

    keys [M, S]: what selected them (the activation, or a random key for the reservoir);
    values [M, S]: the feature's activation at the example token;
    context [M, S] int64: index of the context (in scan order); position [M, S] int64;
    window_tokens [M, S, W] int64: token ids from position - before .. position + after
    (-1 outside the context); window_acts [M, S, W]: the feature's activation on them.
    """

    keys: torch.Tensor
    values: torch.Tensor
    context: torch.Tensor
    position: torch.Tensor
    window_tokens: torch.Tensor
    window_acts: torch.Tensor

    @classmethod
    def empty(cls, M: int, S: int, W: int, device) -> Examples:
        return cls(
            keys=torch.full((M, S), -math.inf, device=device),
            values=torch.full((M, S), math.nan, device=device),
            context=torch.full((M, S), -1, dtype=torch.long, device=device),
            position=torch.full((M, S), -1, dtype=torch.long, device=device),
            window_tokens=torch.full((M, S, W), -1, dtype=torch.long, device=device),
            window_acts=torch.zeros(M, S, W, device=device),
        )

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{f.name}": getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> Examples:
        return cls(**{f.name: tensors[f"{prefix}.{f.name}"] for f in fields(cls)})

    def count(self) -> torch.Tensor:
        """Filled slots per feature, [M]."""
        return (self.context >= 0).sum(1)

    def offer(
        self,
        row: torch.Tensor,
        feat: torch.Tensor,
        key: torch.Tensor,
        z: torch.Tensor,
        ids: torch.Tensor,
        context0: int,
        before: int,
        after: int,
    ) -> None:
        """Keep, per feature, the S largest keys among the current ones and this chunk's.

        Candidates are sparse: row, feat, key [E] (token row in the chunk, feature, key).
        z: [n, M] latents of the chunk (n = B * T); ids: [B, T] its token ids, whose first
        context has scan index ``context0``. Slots are unordered (``sorted`` orders them):
        a new entry takes the slot of one it evicts, so only new entries are written.
        """
        S = self.keys.shape[1]
        B, T = ids.shape
        # Only a key above the feature's current worst can enter: after the first chunks
        # few do, so the dense top-k below runs on a few features.
        beats = key > self.keys.min(1).values[feat]
        row, feat, key = row[beats], feat[beats], key[beats]
        if feat.numel() == 0:
            return
        feats, col = feat.unique(return_inverse=True)  # [F], [E]
        new_keys, rows = _top_per_group(key, row, col, feats.numel(), S)  # [F, S] each
        slot = torch.cat([self.keys[feats], new_keys], 1).topk(S, dim=1).indices  # [F, S]
        fresh = slot >= S
        kept_old = torch.zeros(feats.numel(), S + 1, dtype=torch.bool, device=slot.device)
        kept_old.scatter_(1, slot.clamp(max=S), True)
        # Pair the j-th evicted old slot of each feature with its j-th fresh entry.
        evicted = (~kept_old[:, :S]).to(torch.uint8).argsort(dim=1, descending=True, stable=True)
        fresh_at = fresh.to(torch.uint8).argsort(dim=1, descending=True, stable=True)
        n_new = fresh.sum(1)
        i, j = (torch.arange(S, device=slot.device) < n_new[:, None]).nonzero(as_tuple=True)
        k = slot[i, fresh_at[i, j]] - S  # index into new_keys
        f, s = feats[i], evicted[i, j]
        keep_key = new_keys[i, k]
        real = keep_key > -math.inf
        f, s, i, k, keep_key = f[real], s[real], i[real], k[real], keep_key[real]
        r = rows[i, k]  # token row in the chunk
        ctx, pos = r // T, r % T
        win = pos[:, None] + torch.arange(-before, after + 1, device=pos.device)  # [E, W]
        inside = (win >= 0) & (win < T)
        win_rows = ctx[:, None] * T + win.clamp(0, T - 1)
        self.keys[f, s] = keep_key
        self.values[f, s] = z[r, f]
        self.context[f, s] = ctx + context0
        self.position[f, s] = pos
        self.window_tokens[f, s] = torch.where(inside, ids.reshape(-1)[win_rows], -1)
        self.window_acts[f, s] = torch.where(inside, z[win_rows, f[:, None]], 0.0)

    def sorted(self) -> Examples:
        """The same examples with each feature's slots ordered by key, largest first."""
        order = self.keys.argsort(dim=1, descending=True, stable=True)
        W = self.window_tokens.shape[2]
        return Examples(
            keys=self.keys.gather(1, order),
            values=self.values.gather(1, order),
            context=self.context.gather(1, order),
            position=self.position.gather(1, order),
            window_tokens=self.window_tokens.gather(1, order[..., None].expand(-1, -1, W)),
            window_acts=self.window_acts.gather(1, order[..., None].expand(-1, -1, W)),
        )


def _top_per_group(
    key: torch.Tensor, value: torch.Tensor, group: torch.Tensor, groups: int, S: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The S largest keys of each group and their values: ([G, S] keys, -inf padded;
    [G, S] values, 0 padded), largest first. key, value, group: [E].

    Two stable sorts (by key, then by group) instead of a dense [tokens, features] top-k:
    the work grows with the E firing entries, not with tokens x features.
    """
    order = key.argsort(descending=True, stable=True)
    order = order[group[order].argsort(stable=True)]  # grouped, largest key first in each
    g = group[order]
    counts = torch.bincount(g, minlength=groups)
    rank = torch.arange(g.numel(), device=g.device) - (counts.cumsum(0) - counts)[g]
    take = rank < S
    keys = torch.full((groups, S), -math.inf, device=key.device, dtype=key.dtype)
    values = torch.zeros(groups, S, device=key.device, dtype=value.dtype)
    keys[g[take], rank[take]] = key[order[take]]
    values[g[take], rank[take]] = value[order[take]]
    return keys, values


@dataclass
class FeatureStats:
    """Statistics of M features over ``tokens`` scanned tokens (see the module docstring).

    fires [M] int64, act_sum [M] float64, act_max [M] float32 (0 for a feature that never
    fired), hist [M, HIST_BINS] int64, top and reservoir: Examples. ``logits`` and
    ``nearest`` are filled by ``sae.analysis.logit_effects`` (empty dicts until then). ``info``
    records settings and what was scanned (JSON-able).
    """

    tokens: int
    contexts: int
    fires: torch.Tensor
    act_sum: torch.Tensor
    act_max: torch.Tensor
    hist: torch.Tensor
    top: Examples
    reservoir: Examples
    settings: StatsSettings
    info: dict
    logits: dict[str, torch.Tensor]
    nearest: dict[str, torch.Tensor]

    @property
    def num_features(self) -> int:
        return self.fires.shape[0]

    @property
    def density(self) -> torch.Tensor:
        """Fraction of scanned tokens on which each feature fires, [M] float64."""
        return self.fires.double() / max(self.tokens, 1)

    @property
    def mean_act(self) -> torch.Tensor:
        """Mean activation over the tokens it fires on, [M] (0 if it never fired)."""
        return (self.act_sum / self.fires.clamp_min(1)).float()

    def quantile_samples(self, f: int) -> list[list[int]]:
        """Reservoir slots of feature f split into ``quantile_bins`` groups by activation,
        lowest first: group b holds the samples between quantiles b/bins and (b+1)/bins of
        a uniform sample of the positions the feature fires on. Empty groups when it fired
        fewer times than there are bins."""
        n = int((self.reservoir.context[f] >= 0).sum())  # this row only: a report calls it M times
        order = self.reservoir.values[f, :n].argsort().tolist() if n else []
        bins = self.settings.quantile_bins
        return [[order[i] for i in range(n) if i * bins // n == b] for b in range(bins)]

    def hist_edges(self) -> torch.Tensor:
        """Lower edges of the histogram bins (the first bin also holds everything below), [HIST_BINS]."""
        return 2.0 ** (
            HIST_LOG2_MIN + torch.arange(HIST_BINS, dtype=torch.float64) / HIST_BINS_PER_OCTAVE
        )


def hist_bin(values: torch.Tensor) -> torch.Tensor:
    """Histogram bin of positive activations (any shape), clamped to 0..HIST_BINS-1."""
    b = ((values.log2() - HIST_LOG2_MIN) * HIST_BINS_PER_OCTAVE).floor()
    return b.clamp(0, HIST_BINS - 1).long()


class StatsAccumulator:
    """Streaming half of ``compute_feature_stats``: feed it latents chunk by chunk."""

    def __init__(self, num_features: int, settings: StatsSettings, device: torch.device | str):
        M, s = num_features, settings
        self.settings, self.device = s, torch.device(device)
        self.tokens = self.contexts = 0
        self.fires = torch.zeros(M, dtype=torch.long, device=device)
        self.act_sum = torch.zeros(M, dtype=torch.float64, device=device)
        self.act_max = torch.zeros(M, device=device)
        self.hist = torch.zeros(M * HIST_BINS, dtype=torch.long, device=device)
        self.top = Examples.empty(M, s.top_examples, s.window, device)
        self.reservoir = Examples.empty(M, s.quantile_bins * s.samples_per_bin, s.window, device)
        self.generator = torch.Generator(device=device).manual_seed(s.seed)

    def update(self, z: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> None:
        """z: latents [B, T, M] of contexts ids [B, T] (overwritten: rows of tokens not
        kept are zeroed); keep: bool [B, T], False for tokens that must not count
        (special tokens)."""
        B, T, M = z.shape
        z = z.float().view(B * T, M)
        z[~keep.view(-1)] = 0.0
        # Everything below works on the sparse firing entries, not the dense [n, M] matrix.
        row, f = (z > 0).nonzero(as_tuple=True)
        val = z[row, f]
        self.fires += torch.bincount(f, minlength=M)
        self.act_sum.index_add_(0, f, val.double())
        self.act_max.scatter_reduce_(0, f, val, "amax")
        self.hist.index_add_(0, f * HIST_BINS + hist_bin(val), torch.ones_like(f))
        s = self.settings
        self.top.offer(row, f, val, z, ids, self.contexts, s.context_before, s.context_after)
        # Uniform random keys over the firing positions: keeping the largest keys is
        # reservoir sampling, so every firing position is equally likely to be kept.
        u = torch.rand(val.shape, generator=self.generator, device=z.device)
        self.reservoir.offer(row, f, u, z, ids, self.contexts, s.context_before, s.context_after)
        self.tokens += int(keep.sum())
        self.contexts += B

    def result(self, info: dict) -> FeatureStats:
        cpu = {
            k: v.cpu()
            for k, v in (
                ("fires", self.fires),
                ("act_sum", self.act_sum),
                ("act_max", self.act_max),
            )
        }
        top, res = (
            Examples(**{f.name: getattr(e.sorted(), f.name).cpu() for f in fields(Examples)})
            for e in (self.top, self.reservoir)
        )
        for e in (top, res):  # stored in half precision: the same numbers whether fresh or cached
            e.window_acts = e.window_acts.half().float()
        return FeatureStats(
            tokens=self.tokens,
            contexts=self.contexts,
            **cpu,
            hist=self.hist.view(-1, HIST_BINS).cpu(),
            top=top,
            reservoir=res,
            settings=self.settings,
            info=info,
            logits={},
            nearest={},
        )


@torch.no_grad()  # applies around every resumption of the generator
def feature_stats_steps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sae: SparseAutoencoder,
    hook: str,
    contexts: Iterable[torch.Tensor],
    settings: StatsSettings = StatsSettings(),
    info: dict | None = None,
    progress: bool = True,
) -> Generator[int, None, FeatureStats]:
    """Statistics of every feature of ``sae`` (applied at ``hook``) over ``contexts``
    (LongTensor batches [B, T], e.g. ``sae.activations.stream.contexts_for``), until
    ``settings.tokens`` non-special tokens have been scanned or the data ends; ``info``
    gets ``data_ran_out``: whether the contexts ended before ``settings.tokens``.

    A generator: it yields the tokens scanned so far after each batch and returns the
    statistics, so a caller that shares the model (the explorer's worker) can run other
    work between batches and show how far it got. ``compute_feature_stats`` takes the
    same arguments and returns the statistics at once."""
    capture = MaskedCapture(model, tokenizer, [hook])
    device = next(model.parameters()).device
    acc = StatsAccumulator(sae.cfg.num_latents, settings, device)
    bar = tqdm(
        total=settings.tokens,
        unit="tok",
        unit_scale=True,
        desc="feature stats",
        disable=not progress,
    )
    with contextlib.closing(bar):
        for batch in capture.batches(contexts):
            acts = batch.acts[hook]
            if acts.shape[-1] != sae.d_in:
                raise ConfigError(
                    f"the SAE takes inputs of width {sae.d_in}, but {hook} of this model has "
                    f"width {acts.shape[-1]}; is it the SAE of another model or hook?"
                )
            _scan_batch(acc, sae, acts, batch.ids, batch.keep, settings.tokens)
            bar.update(acc.tokens - bar.n)
            if acc.tokens >= settings.tokens:
                break
            yield acc.tokens
        ran_out = acc.tokens < settings.tokens
        if ran_out:
            # The contexts ended first: a bar left at its asked-for total would stop short
            # of 100% with an ETA that never comes, so its total becomes what was scanned.
            bar.total = acc.tokens
            bar.refresh()
    if acc.tokens == 0:
        raise DataError("feature stats: the data gave no tokens to scan; is the dataset empty?")
    return acc.result({**(info or {}), "settings": asdict(settings), "data_ran_out": ran_out})


def _scan_batch(
    acc: StatsAccumulator,
    sae: SparseAutoencoder,
    acts: torch.Tensor,
    ids: torch.Tensor,
    keep: torch.Tensor,
    budget: int,
) -> None:
    """Add one batch (activations [B, T, d], ids and keep [B, T]) to ``acc``, stopping
    exactly at ``budget`` tokens: later tokens of the batch are masked out."""
    room = budget - acc.tokens
    keep = keep & (keep.view(-1).cumsum(0).view(ids.shape) <= room)
    # Latents on the whole [B, T] grid, not only the kept rows: examples and their
    # windows are found by (context, position); update zeroes the positions not kept.
    per_chunk = max(1, CHUNK_ELEMENTS // (ids.shape[1] * sae.cfg.num_latents))
    for start in range(0, ids.shape[0], per_chunk):
        sl = slice(start, start + per_chunk)
        x = acts[sl].to(sae.W_dec.dtype)
        z = sae.encode(x.reshape(-1, x.shape[-1])).view(*x.shape[:2], -1)
        acc.update(z, ids[sl], keep[sl])


def run_steps(steps: Generator[object, None, T]) -> T:
    """Run a step generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def compute_feature_stats(*args: Any, **kwargs: Any) -> FeatureStats:
    """``feature_stats_steps`` (the same arguments) run to its end: the statistics at once."""
    return run_steps(feature_stats_steps(*args, **kwargs))


# ---- on disk ----------------------------------------------------------------------------


def save_feature_stats(stats: FeatureStats, path: Path) -> None:
    """One safetensors file (written atomically); settings, counts and ``info`` in its header."""
    tensors = {
        "fires": stats.fires,
        "act_sum": stats.act_sum,
        "act_max": stats.act_max,
        "hist": stats.hist,
        **stats.top.tensors("top"),
        **stats.reservoir.tensors("reservoir"),
        **{f"logits.{k}": v for k, v in stats.logits.items()},
        **{f"nearest.{k}": v for k, v in stats.nearest.items()},
    }
    # Half the size on disk; window activations are only ever shown, never computed on
    # (StatsAccumulator.result already rounded them, so nothing changes here).
    tensors = {
        k: (v.half() if k.endswith("window_acts") else v).contiguous() for k, v in tensors.items()
    }
    meta = {
        "format": FORMAT,
        "tokens": str(stats.tokens),
        "contexts": str(stats.contexts),
        "settings": json.dumps(asdict(stats.settings)),
        "info": json.dumps(stats.info),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(tensors, tmp, metadata=meta)
        tmp.replace(path)
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):  # e.g. the parent is a file: there is no tmp either
            tmp.unlink()
        raise StorageError(
            f"cannot write feature statistics to {str(path)!r}: {e.strerror}; "
            "choose another --cache-dir"
        ) from None


def read_stats_header(path: Path) -> dict:
    """A stats file's header metadata (format, tokens, contexts, settings, info as JSON
    text); cheap: the tensors are not read."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise DataError(f"{str(path)!r}: not a feature statistics file ({e})") from None
    if meta.get("format") != FORMAT:
        raise DataError(
            f"{str(path)!r}: not a feature statistics file (format {meta.get('format')!r})"
        )
    return meta


def read_stats_info(path: Path) -> dict:
    """The ``info`` a stats file was saved with (cheap: reads the header only)."""
    return json.loads(read_stats_header(path)["info"])


def load_feature_stats(path: Path) -> FeatureStats:
    """Inverse of ``save_feature_stats`` (window activations come back as float32)."""
    read_stats_info(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: (v.float() if k.endswith("window_acts") else v) for k, v in tensors.items()}
    return FeatureStats(
        tokens=int(meta["tokens"]),
        contexts=int(meta["contexts"]),
        fires=tensors["fires"],
        act_sum=tensors["act_sum"],
        act_max=tensors["act_max"],
        hist=tensors["hist"],
        top=Examples.from_tensors(tensors, "top"),
        reservoir=Examples.from_tensors(tensors, "reservoir"),
        settings=StatsSettings(**json.loads(meta["settings"])),
        info=json.loads(meta["info"]),
        logits={
            k.removeprefix("logits."): v for k, v in tensors.items() if k.startswith("logits.")
        },
        nearest={
            k.removeprefix("nearest."): v for k, v in tensors.items() if k.startswith("nearest.")
        },
    )


# ---- one feature, JSON-able ----------------------------------------------------------------


def token_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[int], str]:
    """id -> its text as the tokenizer decodes it alone (cached; many ids repeat)."""
    return functools.lru_cache(maxsize=None)(lambda i: tokenizer.decode([i]))


def check_feature(f: int, num_features: int) -> int:
    if not 0 <= f < num_features:
        raise ConfigError(
            f"feature {f} is out of range; this SAE has features 0..{num_features - 1}"
        )
    return f


def distinct_tokens(ids: Iterable[int], decode: Callable[[int], str], n: int = 3) -> list[str]:
    """The first ``n`` distinct texts of token ids, in order. A feature's top examples
    often repeat one token; saying it once leaves room for the next one."""
    return list(dict.fromkeys(decode(int(i)) for i in ids))[:n]


def top_tokens(stats: FeatureStats, f: int, decode: Callable[[int], str], n: int = 3) -> list[str]:
    """The first ``n`` distinct tokens feature f's top examples are centred on, most
    activating first; [] if it never fired."""
    check_feature(f, stats.num_features)
    before = stats.settings.context_before
    return distinct_tokens(
        stats.top.window_tokens[f, : int(stats.top.count()[f]), before].tolist(), decode, n
    )


def read_top_token_ids(path: Path, features: Iterable[int]) -> dict[int, list[int]]:
    """The token ids each feature's top examples in a stats file are centred on, most
    activating first (``top_tokens`` without loading the file): only these features'
    rows are read, since for a wide SAE the file holds gigabytes of examples."""
    before = json.loads(read_stats_header(path)["settings"])["context_before"]
    out = {}
    with safe_open(str(path), "pt") as file:
        windows, contexts = file.get_slice("top.window_tokens"), file.get_slice("top.context")
        for f in features:
            check_feature(f, windows.get_shape()[0])
            filled = contexts[f : f + 1][0] >= 0  # sorted, so the filled slots come first
            out[f] = windows[f : f + 1][0, :, before][filled].tolist()
    return out


def _example(ex: Examples, f: int, slot: int, decode: Callable[[int], str], before: int) -> dict:
    ids, acts = ex.window_tokens[f, slot], ex.window_acts[f, slot]
    inside = ids >= 0
    # The example token's index within the kept (in-context) part of the window.
    centre = int(inside[:before].sum())
    return {
        "activation": round(float(ex.values[f, slot]), 4),
        "context": int(ex.context[f, slot]),
        "position": int(ex.position[f, slot]),
        "centre": centre,
        "tokens": [decode(int(i)) for i in ids[inside]],
        "acts": [round(float(a), 4) for a in acts[inside]],
    }


def feature_record(
    stats: FeatureStats, f: int, decode: Callable[[int], str], examples: int | None = None
) -> dict:
    """Everything known about feature f as plain data: counts, top examples (``examples``
    of them), quantile-bin samples, promoted / suppressed tokens, nearest features."""
    check_feature(f, stats.num_features)
    before = stats.settings.context_before
    n_top = (
        int(stats.top.count()[f]) if examples is None else min(examples, int(stats.top.count()[f]))
    )
    record = {
        "feature": f,
        "fires": int(stats.fires[f]),
        "density": float(stats.density[f]),
        "max": float(stats.act_max[f]),
        "mean": float(stats.mean_act[f]),
        "top_examples": [_example(stats.top, f, s, decode, before) for s in range(n_top)],
        "quantile_bins": [
            [_example(stats.reservoir, f, s, decode, before) for s in group]
            for group in stats.quantile_samples(f)
        ],
    }
    if stats.logits:
        L = stats.logits
        record["promoted"] = [
            {"token": decode(int(i)), "logit": round(float(v), 4)}
            for i, v in zip(L["top_ids"][f], L["top_values"][f])
        ]
        record["suppressed"] = [
            {"token": decode(int(i)), "logit": round(float(v), 4)}
            for i, v in zip(L["bottom_ids"][f], L["bottom_values"][f])
        ]
    if stats.nearest:
        record["nearest"] = [
            {"feature": int(i), "cosine": round(float(c), 4)}
            for i, c in zip(stats.nearest["ids"][f], stats.nearest["cosine"][f])
        ]
    return record


def density_histogram(stats: FeatureStats, bins_per_decade: int = 2) -> dict:
    """Histogram of log10 density over the features that fired at least once, plus the
    count that never fired: {"never_fired", "edges" (log10 density), "counts"}."""
    fired = stats.fires > 0
    log_d = stats.density[fired].log10()
    low = math.floor(log_d.min().item()) if fired.any() else -1
    edges = torch.arange(low * bins_per_decade, 1, dtype=torch.float64) / bins_per_decade
    counts = (
        torch.histogram(log_d, bins=torch.cat([edges, edges[-1:] + 1 / bins_per_decade]))[0]
        if fired.any()
        else torch.zeros(len(edges))
    )
    return {
        "never_fired": int((~fired).sum()),
        "edges": edges.tolist(),
        "counts": counts.long().tolist(),
    }
