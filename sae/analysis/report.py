"""A self-contained HTML dashboard of an SAE's features (docs/design.md §6).

    info = build_report(stats, tokenizer, Path("report.html"), title="layers.2", sae_info={...},
                        summary=run_summary(sae_folder, run_config))

One file that works offline: inline CSS, JS and SVG, no network. It holds

* a header (``sae_info``, what was scanned) and, given a ``summary``, the run's metrics,
  training curves and config;
* the histogram of log10 feature density;
* a sortable, filterable, paginated index of every feature (only one page of rows is ever
  in the DOM, so 131k features stay usable);
* a card per feature (or per feature in ``cards``), rendered only when opened: top
  examples with each token shaded by its activation, quantile-bin samples, the activation
  histogram, promoted / suppressed tokens and nearest features.

Data layout in the page (all JSON in ``<script type="application/json">`` elements, with
``<``, ``>`` and ``&`` escaped so no text can end the element):

* ``#strings``: the string table, a list of decoded tokens, each as it appears inside
  decoded text (its leading space included); everything below refers to tokens by their
  index in it.
* ``#bytes``: ``{"<string index>": [bytes]}`` for the tokens that hold part of a UTF-8
  character; the page decodes an example's runs of them together, so an example's tokens
  read exactly as the tokenizer decodes them.
* ``#index``: ``{"M", "block", "edges", "cards", "columns": [{key, label, help}],
  "sort": {key, desc}, "data": {key: [M values]}}``, column arrays (id is implicit);
  ``top`` holds string indices, ``cards`` is null when every feature has a card, else the
  sorted card ids; ``sort`` is the initial order.
* ``#b-<n>``: features ``n*block .. (n+1)*block - 1`` that have a card, as a JSON string
  holding base64 of gzip of ``{"<f>": card}``. A card is ``{"ex": [example], "q": [[example]
  per quantile bin, lowest first], "h": [first bin, [counts]], "lt"/"lb": [[string, logit]],
  "nn": [[feature, cosine]]}`` and an example is ``[activation, centre index, [strings],
  [activations]]`` with padding tokens dropped.

The page's script decodes a block (``atob`` + ``DecompressionStream``) the first time one of
its cards is opened. Dataset text is untrusted: the script inserts it only as text
(``textContent``), and everything rendered here goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sae.analysis.feature_stats import FeatureStats, check_feature, density_histogram
from sae.atomic_io import check_output_path, write_output
from sae.errors import ConfigError

# Features per lazily decoded card block: small enough that opening a card decodes little.
BLOCK = 256
# Points per training curve at most: more add bytes, not information, to a 260 px chart.
CURVE_POINTS = 400
# Width of a bar in the log10-density histogram, in decades.
DENSITY_BIN = 0.25
# Exact powers of ten for rounding (float(int) is exact, unlike some pow implementations).
_POW10 = torch.tensor([float(10**i) for i in range(40)], dtype=torch.float64)


@dataclass
class ReportInfo:
    path: Path
    bytes: int
    features: int  # features in the index
    cards: int  # features with a card


# ---- run summary ------------------------------------------------------------------------


def run_summary(sae_folder: Path, run_config: Path | None) -> dict:
    """What the run left behind, JSON-able: {"config_yaml": text of config.yaml or None,
    "metrics": sae_folder/metrics.json or None, "curves": {tag: [[step, value], ...]}} with
    every scalar of the run's TensorBoard events (``run_config.parent / "tensorboard"``)."""
    config_yaml = _read_text(run_config) if run_config is not None else None
    metrics_text = _read_text(Path(sae_folder) / "metrics.json")
    try:
        metrics = json.loads(metrics_text) if metrics_text is not None else None
    except json.JSONDecodeError:
        metrics = None
    curves = (
        _scalar_curves(Path(run_config).parent / "tensorboard") if run_config is not None else {}
    )
    return {
        "config_yaml": config_yaml,
        "metrics": metrics if isinstance(metrics, dict) else None,
        "curves": curves,
    }


def _read_text(path: Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _scalar_curves(folder: Path) -> dict[str, list[list[float]]]:
    """{tag: [[step, value], ...]} of the event files in ``folder``; {} without any."""
    if not folder.is_dir() or not any(folder.glob("events.out.tfevents*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    try:
        acc.Reload()
    except Exception:  # a truncated or foreign event file: the report goes on without curves
        return {}
    return {
        tag: [[e.step, e.value] for e in acc.Scalars(tag)]
        for tag in sorted(acc.Tags().get("scalars", []))
    }


# ---- numbers and JSON -------------------------------------------------------------------


def round_sig(x: torch.Tensor, digits: int = 3) -> torch.Tensor:
    """x rounded to ``digits`` significant digits, float64, any shape; 0, NaN and inf kept.

    Rounds as integer / 10^k, so each value is the double nearest a short decimal and
    JSON prints it short ("0.734", not "0.7340000000000001")."""
    x = x.double()
    finite = torch.isfinite(x) & (x != 0)
    safe = torch.where(finite, x.abs(), torch.ones_like(x))
    shift = (digits - 1 - safe.log10().floor()).long().clamp(-39, 39)  # decimals to keep
    up = _POW10[shift.clamp(min=0)]
    down = _POW10[(-shift).clamp(min=0)]
    rounded = torch.where(shift >= 0, torch.round(x * up) / up, torch.round(x / down) * down)
    return torch.where(finite, rounded, x)


def _finite_list(x: torch.Tensor, digits: int) -> list:
    """Rounded values of a 1-d tensor as a list, NaN/inf as None (JSON has no NaN)."""
    return [v if math.isfinite(v) else None for v in round_sig(x, digits).tolist()]


def script_json(obj) -> str:
    """Compact JSON safe inside a <script> element: <, > and & escaped as \\u003c etc."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _packed_block(obj) -> str:
    """gzip + base64 of the JSON of ``obj``, as a JSON string (mtime 0: same input, same bytes)."""
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return json.dumps(
        base64.b64encode(gzip.compress(raw, compresslevel=6, mtime=0)).decode("ascii")
    )


# ---- token strings ----------------------------------------------------------------------


class StringTable:
    """Token strings, each distinct token id decoded once, in order of first use.

    A token's string is its text as it appears inside decoded text, its leading space
    included (``token_pieces``), so an example's strings joined read as the tokenizer
    decodes them. ``bytes`` maps the string index of a token that holds only part of a
    UTF-8 character to its raw bytes: the page joins those bytes across tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.strings: list[str] = []
        self.bytes: dict[int, list[int]] = {}
        # token id -> string index (-1: not added); its last slot is where id -1 looks up.
        self.table = torch.full((1,), -1, dtype=torch.long)

    def add(self, ids: torch.Tensor) -> None:
        """Make room for the token ids in ``ids`` (any shape; -1 padding ignored)."""
        ids = ids[ids >= 0]
        if ids.numel() == 0:
            return
        top = int(ids.max())
        if top + 2 > len(self.table):
            grown = torch.full((top + 2,), -1, dtype=torch.long)
            grown[: len(self.table) - 1] = self.table[:-1]
            self.table = grown
        # Presence flags, not torch.unique: ids are small integers, and this is O(n).
        seen = torch.zeros(len(self.table), dtype=torch.bool)
        seen[ids] = True
        new = (seen & (self.table < 0)).nonzero()[:, 0]
        self.table[new] = torch.arange(len(self.strings), len(self.strings) + len(new))
        for i, piece in zip(new.tolist(), token_pieces(self.tokenizer, new.tolist())):
            if "\ufffd" in piece:  # maybe part of a character: keep its bytes if we can read them
                raw = token_bytes(self.tokenizer, i)
                if raw is not None and raw.decode("utf-8", "replace") == piece:
                    self.bytes[len(self.strings)] = list(raw)
            self.strings.append(piece)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """String indices of token ids (any shape, all added before); -1 stays -1."""
        return self.table[torch.where(ids >= 0, ids, len(self.table) - 1)]


def token_pieces(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """Each token's text as it appears inside decoded text, leading space included.

    Decoding a token alone is not that for every tokenizer: SentencePiece-style decoders
    drop the leading space of the first token ("\u2581mechanism" -> "mechanism"), which
    would run words together. So each token is decoded after an anchor token ("a") and the
    anchor's text cut off; a token where that fails (the anchor's text is not a prefix)
    is decoded alone. No clean-up of spaces: it depends on the neighbours, not the token."""
    if not ids:
        return []
    keep = {"clean_up_tokenization_spaces": False}
    anchor_ids = tokenizer.encode("a", add_special_tokens=False)
    head = tokenizer.decode(anchor_ids[-1:], **keep) if anchor_ids else ""
    if not head:
        return tokenizer.batch_decode([[i] for i in ids], **keep)
    after = tokenizer.batch_decode([[anchor_ids[-1], i] for i in ids], **keep)
    return [
        text[len(head) :] if text.startswith(head) else tokenizer.decode([i], **keep)
        for i, text in zip(ids, after)
    ]


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte (printable bytes stand for
    themselves, the others for chr(256 + n))."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes | None:
    """The raw bytes of a token, for tokens that may hold part of a UTF-8 character:
    SentencePiece byte-fallback tokens ("<0xE6>") and byte-level BPE tokens (GPT-2
    alphabet); None for anything else."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(token, str) or not token:
        return None
    m = _BYTE_TOKEN.fullmatch(token)
    if m:
        return bytes([int(m[1], 16)])
    alphabet = _byte_level_decoder()
    return bytes(alphabet[c] for c in token) if all(c in alphabet for c in token) else None


# ---- per-feature data -------------------------------------------------------------------


def top_tokens(stats: FeatureStats, features: slice) -> torch.Tensor:
    """The most common centre token among each feature's top examples, [F] token ids (-1
    without examples); ties go to the token of the higher-activation example."""
    centre = stats.top.window_tokens[features, :, stats.settings.context_before]  # [F, S]
    valid = centre >= 0
    same = (centre[:, :, None] == centre[:, None, :]) & valid[:, None, :]  # [F, S, S]
    count = torch.where(valid, same.sum(-1), -1)
    best = count.argmax(1)  # first maximum: the examples are sorted by activation
    return torch.where(valid.any(1), centre.gather(1, best[:, None])[:, 0], -1)


def index_data(
    stats: FeatureStats, strings: StringTable, columns: dict[str, torch.Tensor]
) -> dict[str, list]:
    """The index columns, each a list of M values (id is the position)."""
    M = stats.num_features
    top = torch.cat([top_tokens(stats, slice(s, s + BLOCK)) for s in range(0, M, BLOCK)])  # [M]
    strings.add(top)
    data = {
        "density": _finite_list(stats.density, 3),
        "max": _finite_list(stats.act_max, 3),
        "mean": _finite_list(stats.mean_act, 3),
        "top": [i if i >= 0 else None for i in strings.lookup(top).tolist()],
    }
    for n, values in enumerate(columns.values()):
        data[f"c{n}"] = _finite_list(values.detach().cpu().reshape(-1), 4)
    return data


def encode_examples(
    stats: FeatureStats, which: str, features: torch.Tensor, slots: int, strings: StringTable
) -> list[list[list]]:
    """Slots 0..slots-1 of ``features`` [F] in ``stats.top`` or ``stats.reservoir``
    (``which``): per feature, per slot, [activation, centre index, [string indices],
    [activations]] with padding dropped (empty slots give empty token lists).

    Works on the whole block at once: per-example tensor calls would cost minutes at
    131k features."""
    ex = getattr(stats, which)
    tokens = ex.window_tokens[features, :slots]  # [F, n, W]
    before = stats.settings.context_before
    # Padding (-1) only ever sits at the window's ends: keep the slice start..end, and the
    # centre moves left by the padding in front of it.
    inside = tokens >= 0
    start = (~inside[..., :before]).sum(-1)
    end = tokens.shape[-1] - (~inside[..., before + 1 :]).sum(-1)
    rows = zip(
        round_sig(ex.values[features, :slots], 3).tolist(),
        (before - start).tolist(),
        start.tolist(),
        end.tolist(),
        strings.lookup(tokens).tolist(),
        round_sig(ex.window_acts[features, :slots], 3).tolist(),
    )
    return [[[v, c, t[s:e], a[s:e]] for v, c, s, e, t, a in zip(*feature)] for feature in rows]


def histogram_runs(hist: torch.Tensor) -> list[list]:
    """Per feature of hist [F, HIST_BINS]: [first nonzero bin, [counts up to the last
    nonzero bin]]; [0, []] for one that never fired."""
    nonzero = hist > 0
    bins = hist.shape[1]
    first = nonzero.int().argmax(1).tolist()
    last = (bins - 1 - nonzero.flip(1).int().argmax(1)).tolist()
    fired = nonzero.any(1).tolist()
    return [
        [lo, row[lo : hi + 1]] if any_ else [0, []]
        for lo, hi, any_, row in zip(first, last, fired, hist.tolist())
    ]


def pairs(first: torch.Tensor, second: torch.Tensor) -> list[list[list]]:
    """[F, n] and [F, n] -> per feature [[first, second], ...] (second rounded)."""
    return [
        [list(p) for p in zip(a, b)] for a, b in zip(first.tolist(), round_sig(second, 3).tolist())
    ]


def spread(group: list[int], k: int | None) -> list[int]:
    """At most k items of ``group``, evenly spaced over it (its ends included)."""
    if k is None or len(group) <= k:
        return group
    if k == 1:
        return [group[len(group) // 2]]
    return [group[round(i * (len(group) - 1) / (k - 1))] for i in range(k)]


def block_cards(
    stats: FeatureStats,
    features: list[int],
    examples: int,
    strings: StringTable,
    samples_per_bin: int | None = None,
) -> dict:
    """{str(f): card} for ``features`` (layout in the module docstring)."""
    fs = torch.tensor(features)
    # Decode this block's tokens first, so lookups in it are plain table reads.
    strings.add(stats.top.window_tokens[fs, :examples])
    strings.add(stats.reservoir.window_tokens[fs])
    top = encode_examples(stats, "top", fs, examples, strings)
    res = encode_examples(stats, "reservoir", fs, stats.reservoir.values.shape[1], strings)
    top_count = (stats.top.context[fs, :examples] >= 0).sum(1).tolist()
    cards = {}
    for i, (f, hist) in enumerate(zip(features, histogram_runs(stats.hist[fs]))):
        cards[str(f)] = {
            "ex": top[i][: top_count[i]],
            "q": [
                [res[i][slot] for slot in spread(group, samples_per_bin)]
                for group in stats.quantile_samples(f)
            ],
            "h": hist,
        }
    if stats.logits:
        for key, ids, values in (
            ("lt", "top_ids", "top_values"),
            ("lb", "bottom_ids", "bottom_values"),
        ):
            strings.add(stats.logits[ids][fs])
            for f, p in zip(
                features, pairs(strings.lookup(stats.logits[ids][fs]), stats.logits[values][fs])
            ):
                cards[str(f)][key] = p
    if stats.nearest:
        for f, p in zip(features, pairs(stats.nearest["ids"][fs], stats.nearest["cosine"][fs])):
            cards[str(f)]["nn"] = p
    return cards


def card_blocks(
    stats: FeatureStats,
    cards: list[int],
    examples: int,
    strings: StringTable,
    progress: bool,
    samples_per_bin: int | None = None,
) -> list[tuple[int, str]]:
    """[(block number, packed block)] for the blocks holding a card, in order."""
    by_block: dict[int, list[int]] = {}
    for f in cards:
        by_block.setdefault(f // BLOCK, []).append(f)
    return [
        (n, _packed_block(block_cards(stats, feats, examples, strings, samples_per_bin)))
        for n, feats in tqdm(
            by_block.items(), desc="report cards", unit="block", disable=not progress
        )
    ]


# ---- static parts rendered here ---------------------------------------------------------


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    """A number for display, 4 significant digits; anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def short(value: float) -> str:
    """A number in at most about 7 characters, for chart axes."""
    text = f"{value:.3g}"
    if len(text) > 7:
        text = f"{value:.2e}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")
    return text


def kv_table(rows: dict, cls: str = "kv", labels=None) -> str:
    """A two-column table; ``labels`` maps a key to the text shown (the key stays its tooltip)."""

    def th(k) -> str:
        label = labels(k) if labels else str(k)
        return (
            f"<th>{esc(label)}</th>"
            if label == str(k)
            else f'<th title="{esc(k)}">{esc(label)}</th>'
        )

    body = "".join(f"<tr>{th(k)}<td>{esc(fmt(v))}</td></tr>" for k, v in rows.items())
    return f'<table class="{cls}">{body}</table>'


# What the keys of metrics.json (sae.evaluation.metrics, sae.evaluation.splice) and the TensorBoard tags
# (sae.training.trainer) mean, for the run summary.
METRIC_LABELS = {
    "fvu": "FVU (fraction of variance unexplained)",
    "l0": "L0 (active features per token)",
    "dead_fraction": "dead fraction (features that never fired)",
    "dense_fraction": "dense fraction (features firing on > 10% of tokens)",
    "tokens": "evaluation tokens",
    "hook": "hook point",
    "loss": "training loss",
    "lr": "learning rate",
    "tokens_per_s": "tokens per second",
    "splice.ce_clean": "CE loss, clean model",
    "splice.ce_sae": "CE loss, SAE spliced in",
    "splice.ce_zero": "CE loss, activations zeroed",
    "splice.ce_loss_recovered": "CE loss recovered",
    "splice.delta_lm_loss": "delta LM loss (SAE spliced in - clean)",
    "splice.kl": "KL (clean || SAE spliced in), per token",
    "splice.tokens": "tokens for the spliced metrics",
}


def metric_label(key: str) -> str:
    """Human label of a metrics key; an unknown one made readable ("a.b_c" -> "a: b c")."""
    if key in METRIC_LABELS:
        return METRIC_LABELS[key]
    if f"splice.{key}" in METRIC_LABELS:  # held-out curves name splice metrics without the prefix
        return METRIC_LABELS[f"splice.{key}"]
    return ": ".join(part.replace("_", " ") for part in key.split("."))


def curve_label(tag: str) -> str:
    """A TensorBoard tag ("layers.2/fvu", "heldout/layers.2/kl") with its metric labelled."""
    *where, name = tag.split("/")
    label = METRIC_LABELS.get(name) or METRIC_LABELS.get(f"splice.{name}") or name.replace("_", " ")
    return " / ".join([*where, label])


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one level with dotted keys ({"splice": {"kl": 1}} -> {"splice.kl": 1})."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def line_chart(tag: str, points: list[list[float]], width: int = 260, height: int = 130) -> str:
    """One training curve as an inline SVG line chart, with its y range and last step."""
    points = [p for p in points if math.isfinite(p[1])]
    if len(points) > CURVE_POINTS:
        stride = math.ceil(len(points) / CURVE_POINTS)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    left, right, top, bottom = 44, 6, 6, 18
    w, h = width - left - right, height - top - bottom
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        sx = w / (x1 - x0) if x1 > x0 else 0
        sy = h / (y1 - y0) if y1 > y0 else 0
        coords = " ".join(
            f"{left + (x - x0) * sx:.1f},{top + h - (y - y0) * sy if sy else top + h / 2:.1f}"
            for x, y in zip(xs, ys)
        )
        line = f'<polyline points="{coords}"/>'
        labels = (
            f'<text x="{left - 3}" y="{top + 8}" class="r">{esc(short(y1))}</text>'
            f'<text x="{left - 3}" y="{top + h}" class="r">{esc(short(y0))}</text>'
            f'<text x="{left}" y="{height - 4}">{esc(fmt(x0))}</text>'
            f'<text x="{width - right}" y="{height - 4}" class="r">step {esc(fmt(x1))}</text>'
        )
    else:
        line, labels = "", f'<text x="{left}" y="{top + h / 2}">no points</text>'
    return (
        f'<figure class="chart"><figcaption title="{esc(tag)}">{esc(curve_label(tag))}</figcaption>'
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
        f"<title>{esc(tag)}</title>"
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" class="frame"/>{line}{labels}</svg></figure>'
    )


def summary_section(summary: dict) -> str:
    """Metrics table, training curves and collapsible config of a run_summary."""
    parts = ['<section id="summary"><h2>Run summary</h2>']
    metrics, curves, config = (
        summary.get("metrics"),
        summary.get("curves") or {},
        summary.get("config_yaml"),
    )
    # A tag with one point (the held-out metrics, logged once at the end) is no curve; the table has it.
    curves = {tag: pts for tag, pts in curves.items() if len(pts) > 1}
    if metrics:
        parts.append(f"<h3>Held-out metrics</h3>{kv_table(flatten(metrics), labels=metric_label)}")
    if curves:
        parts.append('<h3>Training curves</h3><div class="charts">')
        parts.extend(line_chart(tag, pts) for tag, pts in curves.items())
        parts.append("</div>")
    if config is not None:
        parts.append(f"<details><summary>config.yaml</summary><pre>{esc(config)}</pre></details>")
    if not (metrics or curves or config is not None):
        parts.append("<p>No config, metrics or TensorBoard events found for this SAE.</p>")
    parts.append("</section>")
    return "".join(parts)


def density_section(stats: FeatureStats, width: int = 560, height: int = 150) -> str:
    """Histogram (SVG) of log10 density over the features that fired, and the dead count."""
    hist = density_histogram(stats, bins_per_decade=round(1 / DENSITY_BIN))
    dead = hist["never_fired"]
    text = (
        f"<p>{dead:,} of {stats.num_features:,} features ({dead / max(stats.num_features, 1):.1%}) "
        f"never fired in the scan.</p>"
    )
    if dead == stats.num_features:
        return f'<section id="density"><h2>Feature density</h2>{text}</section>'
    counts, lo, nbins = hist["counts"], hist["edges"][0], len(hist["counts"])
    left, bottom, top = 36, 20, 6
    w, h = width - left - 16, height - bottom - top  # room for the last tick label
    bw, peak = w / nbins, max(counts)
    bars = []
    for i, c in enumerate(counts):
        bh = h * c / peak
        a, b = lo + i * DENSITY_BIN, lo + (i + 1) * DENSITY_BIN
        bars.append(
            f'<rect x="{left + i * bw:.1f}" y="{top + h - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" '
            f'height="{bh:.1f}"><title>10^{a:.2f} .. 10^{b:.2f}: {c:,} features</title></rect>'
        )
    ticks = "".join(
        f'<text x="{left + (d - lo) / DENSITY_BIN * bw:.1f}" y="{height - 5}" class="m">1e{d}</text>'
        for d in range(math.ceil(lo), 1)
    )
    svg = (
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" class="bars">'
        f"<title>log10 feature density</title>"
        f'<text x="{left - 3}" y="{top + 8}" class="r">{peak:,}</text>'
        f'<text x="{left - 3}" y="{top + h}" class="r">0</text>{"".join(bars)}{ticks}</svg>'
    )
    return (
        f'<section id="density"><h2>Feature density</h2>{svg}'
        f'<p class="note">Features by log10 of the fraction of scanned tokens they fire on.</p>{text}</section>'
    )


def header(stats: FeatureStats, title: str, sae_info: dict) -> str:
    scan = (
        f"Scanned {stats.tokens:,} tokens in {stats.contexts:,} contexts; "
        f"{stats.settings.top_examples} top examples and {stats.settings.quantile_bins} quantile bins "
        f"of {stats.settings.samples_per_bin} samples per feature."
    )
    rule = stats.info.get("logit_rule")
    if rule:
        scan += f" Logit effects: {rule}."
    return (
        f'<header><h1>{esc(title)}</h1>{kv_table(sae_info)}<p class="note">{esc(scan)}</p></header>'
    )


INDEX_PANEL = """<main>
<section id="index-panel"><h2>Features</h2>
<div class="controls"><input id="filter" type="search" placeholder="feature id or top token" aria-label="filter">
<select id="page-size" aria-label="rows per page">
<option>50</option><option selected>100</option><option>250</option></select>
<button id="prev" type="button">&#8249; prev</button><span id="page-info"></span>
<button id="next" type="button">next &#8250;</button></div>
<div class="index-box"><table id="feature-index"><thead><tr></tr></thead><tbody></tbody></table></div></section>
<section id="card"><p class="note">Click a feature in the index to open its card.</p></section>
</main>"""


def page(title: str, body: str, data_scripts: str) -> str:
    assets = resources.files("sae.analysis") / "report_assets"
    css = (assets / "report.css").read_text(encoding="utf-8")
    js = "\n".join((assets / name).read_text(encoding="utf-8") for name in ("card.js", "report.js"))
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{esc(title)}</title><link rel="icon" href="data:,"><style>{css}</style></head>\n<body>\n'
        f"{body}\n<noscript><p>The feature index and cards need JavaScript.</p></noscript>\n"
        f"{data_scripts}\n<script>{js}</script>\n</body></html>\n"
    )


# ---- build ------------------------------------------------------------------------------


def build_report(
    stats: FeatureStats,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    *,
    title: str,
    sae_info: dict,
    summary: dict | None = None,
    columns: dict[str, torch.Tensor] | None = None,
    column_help: dict[str, str] | None = None,
    sort_by: str | None = None,
    cards: Sequence[int] | None = None,
    examples: int = 10,
    samples_per_bin: int | None = None,
    progress: bool = True,
) -> ReportInfo:
    """Write the dashboard of ``stats`` to ``path`` (atomically) and say what it holds.

    columns: extra index columns, name -> [M] values (e.g. contrast scores), with tooltips
    in ``column_help``; sort_by: the column the index is first sorted by, largest first
    (default: the first of ``columns``, e.g. a contrast's effect size, else feature id
    ascending; "id" for that); cards: the features that get a card (default all M); examples: top
    examples per card; samples_per_bin: quantile-bin samples per bin on a card (default
    all; they are most of a card's bytes)."""
    path = Path(path)
    check_output_path(path, "--output")
    M = stats.num_features
    columns = dict(columns or {})
    check_columns(columns, M)
    sort_by = sort_column(sort_by, columns)
    card_ids = (
        sorted({check_feature(int(f), M) for f in cards}) if cards is not None else list(range(M))
    )
    examples = max(0, min(examples, stats.settings.top_examples))

    strings = StringTable(tokenizer)
    data = index_data(stats, strings, columns)
    blocks = card_blocks(stats, card_ids, examples, strings, progress, samples_per_bin)
    index = {
        "M": M,
        "block": BLOCK,
        "edges": round_sig(stats.hist_edges(), 4).tolist(),
        "cards": None if len(card_ids) == M else card_ids,
        "columns": index_columns(columns, column_help or {}),
        "sort": index_sort(sort_by, columns),
        "data": data,
    }
    body = (
        header(stats, title, sae_info)
        + (summary_section(summary) if summary is not None else "")
        + density_section(stats)
        + INDEX_PANEL
    )
    size = write_output(path, page(title, body, data_scripts(index, strings, blocks)), "--output")
    return ReportInfo(path=path, bytes=size, features=M, cards=len(card_ids))


def check_columns(columns: dict[str, torch.Tensor], M: int) -> None:
    """Refuse an extra index column that does not hold one value per feature ([M] values)."""
    for name, values in columns.items():
        if values.numel() != M:
            raise ConfigError(f"report column {name!r}: {values.numel()} values for {M} features")


def sort_column(sort_by: str | None, columns: dict[str, torch.Tensor]) -> str:
    """The column the index is first sorted by: ``sort_by``, else the first of ``columns``,
    else "id"; one that is neither "id" nor a column is refused."""
    sort_by = sort_by or next(iter(columns), "id")
    if sort_by != "id" and sort_by not in columns:
        raise ConfigError(f"report: sort_by {sort_by!r} is not one of the columns {list(columns)}")
    return sort_by


def index_columns(columns: dict[str, torch.Tensor], column_help: dict[str, str]) -> list[dict]:
    """The index's columns, [{key, label, help}]: the built-in ones, then ``columns`` as
    c0, c1, ... with their tooltips from ``column_help``."""
    return [
        {"key": "id", "label": "id", "help": "feature index"},
        {
            "key": "density",
            "label": "density",
            "help": "fraction of scanned tokens it fires on",
        },
        {"key": "max", "label": "max act", "help": "largest activation in the scan"},
        {"key": "mean", "label": "mean act", "help": "mean activation where it fires"},
        {
            "key": "top",
            "label": "top token",
            "help": "most common token among its top examples",
        },
        *(
            {"key": f"c{n}", "label": name, "help": column_help.get(name, "")}
            for n, name in enumerate(columns)
        ),
    ]


def index_sort(sort_by: str, columns: dict[str, torch.Tensor]) -> dict:
    """The index's initial order, {key, desc}: feature id ascending, or an extra column
    largest first (extra columns are scores to rank by: contrast effect, AUROC)."""
    if sort_by == "id":
        return {"key": "id", "desc": False}
    return {"key": f"c{list(columns).index(sort_by)}", "desc": True}


def data_scripts(index: dict, strings: StringTable, blocks: list[tuple[int, str]]) -> str:
    """The page's JSON data elements (layout in the module docstring): #index, #strings,
    #bytes and one #b-<n> per packed card block, one per line."""
    scripts = [
        f'<script type="application/json" id="index">{script_json(index)}</script>',
        f'<script type="application/json" id="strings">{script_json(strings.strings)}</script>',
        f'<script type="application/json" id="bytes">{script_json(strings.bytes)}</script>',
        *(f'<script type="application/json" id="b-{n}">{packed}</script>' for n, packed in blocks),
    ]
    return "\n".join(scripts)
