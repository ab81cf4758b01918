"""Activation patching: which layer, position or attention head carries the information
that makes a clean prompt behave differently from a corrupted one.

Both prompts run once; then the corrupted prompt runs again with one activation replaced
by the clean run's, and a metric of the output logits is recorded::

    metric = logit_diff(" raised", " returned", tokenizer)      # from sae.evaluation.lm_metrics
    patcher = ActivationPatcher(model, tokenizer, "If the key is missing, a KeyError is",
                                "If the key is missing, the default is", metric)
    result = patcher.sweep("position")          # layers x positions
    print(result.table_text()); Path("patch.svg").write_text(result.heatmap_svg())

What gets patched (a ``Patch``):

* ``Patch(layer)``                 the residual stream after decoder layer N (its output,
                                    the ``layers.N`` hook point) at every position;
* ``Patch(layer, position=p)``     the same at position p only;
* ``Patch(layer, head=h)``         head h's slice of the input of layer N's attention output
                                    projection (Llama, Mistral, Qwen2, Gemma 2 ``o_proj``,
                                    GPT-2 ``c_proj``, GPT-NeoX and Falcon ``dense``): that
                                    head's contribution to the attention output.

Patches are applied to a copy of the corrupted prompt, so the clean and corrupted prompts
must tokenize to the same number of tokens. Prompts are tokenized like the training
contexts: BOS, then the text without special tokens.

The normalised score of a patched run is (m_patched - m_corrupted) / (m_clean -
m_corrupted): 0 = no effect, 1 = the clean behaviour restored; NaN when clean and
corrupted score the same. Patching the residual stream after any layer at every position
reproduces the clean run from there on, so it scores exactly the clean metric; patching
nothing scores the corrupted one.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sae.activations.hooks import ALIASES, HookPoint, attach, resolve_hook
from sae.atomic_io import check_output_path, write_output
from sae.config import ModelConfig
from sae.errors import ConfigError
from sae.evaluation.lm_metrics import Metric, answer_metric, at_least_fp32
from sae.models.generation import prompt_token_ids
from sae.models.loading import decoder_layers, load_model

MODES = ("layer", "position", "head")
# Names of the attention output projection (its input holds the heads side by side).
OUTPUT_PROJECTIONS = ("o_proj", "c_proj", "dense", "out_proj")


def normalized_score(value, clean: float, corrupted: float):
    """(value - corrupted) / (clean - corrupted): a float or tensor; NaN where clean == corrupted."""
    span = clean - corrupted
    if not math.isfinite(span) or abs(span) <= 1e-12 * max(1.0, abs(clean), abs(corrupted)):
        return value * float("nan") if isinstance(value, torch.Tensor) else float("nan")
    return (value - corrupted) / span


# ---- prompts, layers, projections -----------------------------------------------------------


def prompt_ids(tokenizer, text: str | Sequence[int]) -> list[int]:
    """BOS + the text's tokens without special tokens (as the training contexts); a list of
    ids is taken as is."""
    if not isinstance(text, str):
        return [int(i) for i in text]
    return prompt_token_ids(tokenizer, text)


def parse_layers(
    spec: str | Sequence[int] | None, n_layers: int, what: str = "--layers"
) -> list[int]:
    """``None`` -> every layer; "0-3", "1,2", "0-1,3" or a list of ints -> those layers, sorted."""
    if spec is None:
        return list(range(n_layers))
    valid = f"give layers like 0-{n_layers - 1} or 0,2 within 0..{n_layers - 1}"
    if isinstance(spec, str):
        out: set[int] = set()
        for part in spec.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if m is None:
                raise ConfigError(f"{what}: {spec!r} is not a layer list; {valid}")
            lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if hi < lo:
                raise ConfigError(f"{what}: range {part!r} runs backwards; {valid}")
            out.update(range(lo, hi + 1))
        layers = sorted(out)
    else:
        layers = sorted(set(int(i) for i in spec))
    if not layers:
        raise ConfigError(f"{what}: no layers given; {valid}")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(
            f"{what}: layer {bad[0]} is out of range; this model has layers 0..{n_layers - 1}"
        )
    return layers


def attention_output_projection(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of a decoder layer's attention output projection, or None."""
    children = dict(layer.named_children())
    for attn_name in ALIASES["attn"]:
        attn = children.get(attn_name)
        if attn is None:
            continue
        sub = dict(attn.named_children())
        for proj in OUTPUT_PROJECTIONS:
            if proj in sub:
                return f"{attn_name}.{proj}", sub[proj]
    return None


def num_heads(model: nn.Module) -> int:
    n = getattr(model.config, "num_attention_heads", None) or getattr(model.config, "n_head", None)
    if not n:
        raise ConfigError(
            f"--mode head: {type(model).__name__}'s config names no num_attention_heads"
        )
    return int(n)


# ---- patching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """One activation of the corrupted run replaced by the clean run's: the residual stream
    after ``layer`` (``head`` None) or one head's input slice of its attention output
    projection; at every position (``position`` None) or one."""

    layer: int
    position: int | None = None
    head: int | None = None


@dataclass
class PatchResult:
    """A sweep: ``values[r, c]`` is the metric with the patch of row r (a layer) and column
    c (a position, a head, or all positions) applied to the corrupted run."""

    mode: str
    metric: str
    values: torch.Tensor  # [rows, columns] float64
    rows: list[str]  # "layers.N"
    columns: list[str]  # "all positions", "p 'tok'" or "head h"
    clean_metric: float
    corrupted_metric: float
    clean_tokens: list[str]
    corrupted_tokens: list[str]
    column_title: str = field(default="")

    @property
    def normalized(self) -> torch.Tensor:
        return normalized_score(self.values, self.clean_metric, self.corrupted_metric)

    def to_dict(self) -> dict:
        def num(x: float):
            return None if not math.isfinite(x) else round(float(x), 6)

        return {
            "mode": self.mode,
            "metric": self.metric,
            "clean_metric": num(self.clean_metric),
            "corrupted_metric": num(self.corrupted_metric),
            "clean_tokens": self.clean_tokens,
            "corrupted_tokens": self.corrupted_tokens,
            "rows": self.rows,
            "columns": self.columns,
            "values": [[num(v) for v in row] for row in self.values.tolist()],
            "normalized": [[num(v) for v in row] for row in self.normalized.tolist()],
        }

    def table_text(self, normalized: bool = False) -> str:
        """The grid as a text table: rows are layers, columns numbered (a key line below
        names them); the patched metric, or the normalised score."""
        grid = self.normalized if normalized else self.values
        width = max(7, *(len(f"{v:.3f}") for v in grid.flatten().tolist()))
        row_w = max(len(r) for r in self.rows)
        if len(self.columns) == 1:
            head = f"{'':<{row_w}} {self.columns[0]:>{width}}"
            key = ""
        else:
            head = f"{'':<{row_w}} " + " ".join(f"{i:>{width}}" for i in range(len(self.columns)))
            key = "\ncolumns: " + "  ".join(
                f"{i}={c}" if not c.startswith(f"{i} ") else c for i, c in enumerate(self.columns)
            )
        lines = [head] + [
            f"{r:<{row_w}} " + " ".join(f"{_fmt(v):>{width}}" for v in row)
            for r, row in zip(self.rows, grid.tolist())
        ]
        return "\n".join(lines) + key

    def heatmap_svg(self, cell: int = 34) -> str:
        """A self-contained SVG heatmap of the normalised score (of the change from the
        corrupted metric when clean and corrupted score alike): diverging colours, blue <
        0 < red, labelled axes and a colour legend; hover a cell for its values."""
        norm = self.normalized
        if bool(torch.isfinite(norm).any()):
            shown, what = norm, "normalised score (patched - corrupted) / (clean - corrupted)"
        else:
            shown, what = self.values - self.corrupted_metric, "patched - corrupted metric"
        finite = shown[torch.isfinite(shown)]
        vmax = (
            max(1.0 if shown is norm else 0.0, float(finite.abs().max()) if finite.numel() else 0.0)
            or 1.0
        )
        n_rows, n_cols = shown.shape
        label_w = 8 + 7 * max(len(r) for r in self.rows)
        top_h = 30 + 7 * min(28, max(len(c) for c in self.columns))
        left, top = label_w + 10, top_h + 40
        grid_w, grid_h = n_cols * cell, n_rows * cell
        legend_y = top + grid_h + 30
        title = f"activation patching ({self.mode}): {self.metric}"
        subtitle = f"clean {self.clean_metric:.4g}, corrupted {self.corrupted_metric:.4g}" + (
            f"; columns: {self.column_title}" if self.column_title else ""
        )
        width = round(
            max(
                left + grid_w + 20 + 4 * min(28, max(len(c) for c in self.columns)),
                20 + 8 * len(title),
                20 + 7 * len(subtitle),
                left + 20 + 7 * len(what),
                420,
            )
        )
        height = legend_y + 60
        esc = html.escape
        out = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">',
            f'<rect width="{width}" height="{height}" fill="white"/>',
            f'<text x="10" y="18" {_font(13)} font-weight="bold">{esc(title)}</text>',
            f'<text x="10" y="34" {_font()}>{esc(subtitle)}</text>',
        ]
        for c, name in enumerate(self.columns):
            x, y = left + c * cell + cell / 2, top - 6
            short = name if len(name) <= 28 else name[:27] + "…"
            out.append(
                f'<text x="{x:.1f}" y="{y}" {_font()} transform="rotate(-60 {x:.1f} {y})">'
                f"<title>{esc(name)}</title>{esc(short)}</text>"
            )
        for r, name in enumerate(self.rows):
            y = top + r * cell + cell / 2 + 4
            out.append(
                f'<text x="{left - 6}" y="{y:.1f}" {_font()} text-anchor="end">{esc(name)}</text>'
            )
        out += self._svg_cells(shown, vmax, left, top, cell)
        out += _svg_legend(vmax, left, legend_y, what)
        out.append("</svg>")
        return "\n".join(out) + "\n"

    def _svg_cells(
        self, shown: torch.Tensor, vmax: float, left: int, top: int, cell: int
    ) -> list[str]:
        """One coloured square per (row, column) of ``shown`` [rows, columns], its value
        written in it and the raw and normalised metric in its tooltip."""
        out, esc, norm = [], html.escape, self.normalized
        for r in range(shown.shape[0]):
            for c in range(shown.shape[1]):
                v, raw, nv = float(shown[r, c]), float(self.values[r, c]), float(norm[r, c])
                x, y = left + c * cell, top + r * cell
                tip = (
                    f"{self.rows[r]}, {self.columns[c]}: metric {raw:.4f}, normalised "
                    f"{'n/a' if not math.isfinite(nv) else f'{nv:.3f}'}"
                )
                text = (
                    ""
                    if not math.isfinite(v)
                    else f"{v:.2f}".replace("-0.00", "0.00")
                    if abs(v) < 10
                    else f"{v:.0f}"
                )
                ink = "white" if math.isfinite(v) and abs(v) / vmax > 0.6 else "black"
                out.append(
                    f'<g><title>{esc(tip)}</title><rect x="{x}" y="{y}" width="{cell}" height="{cell}" '
                    f'fill="{_colour(v, vmax)}" stroke="white"/>'
                    f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 3.5:.1f}" {_font(9)} '
                    f'text-anchor="middle" fill="{ink}">{text}</text></g>'
                )
        return out


def _svg_legend(vmax: float, left: int, legend_y: int, what: str) -> list[str]:
    """A gradient bar from -vmax to +vmax under the grid, its ticks, and what it measures."""
    bar_w = 240
    out = [
        '<defs><linearGradient id="diverging" x1="0" x2="1" y1="0" y2="0">'
        + "".join(
            f'<stop offset="{i / 8:.3f}" stop-color="{_colour((i / 4 - 1) * vmax, vmax)}"/>'
            for i in range(9)
        )
        + "</linearGradient></defs>",
        f'<rect x="{left}" y="{legend_y}" width="{bar_w}" height="12" fill="url(#diverging)" stroke="#999"/>',
    ]
    for frac, val in ((0, -vmax), (0.5, 0.0), (1, vmax)):
        out.append(
            f'<text x="{left + frac * bar_w:.1f}" y="{legend_y + 26}" {_font()} text-anchor="middle">'
            f"{val:.3g}</text>"
        )
    out.append(f'<text x="{left}" y="{legend_y - 6}" {_font()}>{html.escape(what)}</text>')
    return out


def _font(size: int = 11) -> str:
    return f'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="{size}"'


def _fmt(v: float) -> str:
    text = f"{v:.3f}"
    return "0.000" if text == "-0.000" else text


def _colour(v: float, vmax: float) -> str:
    """Diverging colour: blue (-vmax) .. white (0) .. red (+vmax); grey for NaN."""
    if not math.isfinite(v):
        return "#d9d9d9"
    t = max(-1.0, min(1.0, v / vmax))
    end = (178, 24, 43) if t > 0 else (33, 102, 172)
    rgb = [round(255 + (e - 255) * abs(t)) for e in end]
    return "#" + "".join(f"{c:02x}" for c in rgb)


class ActivationPatcher:
    """Runs the clean and corrupted prompts once (caching every layer's residual stream and,
    where the family has one, every attention output projection's input), then scores the
    corrupted prompt under any set of patches.

    ``metric_position`` is the position whose logits the metric reads (default: the last).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        clean: str | Sequence[int],
        corrupted: str | Sequence[int],
        metric: Metric,
        metric_position: int = -1,
    ):
        self.model, self.tokenizer, self.metric = model, tokenizer, metric
        self.clean_ids, self.corrupted_ids = (
            prompt_ids(tokenizer, clean),
            prompt_ids(tokenizer, corrupted),
        )
        tc, tk = len(self.clean_ids), len(self.corrupted_ids)
        if tc != tk:
            raise ConfigError(
                f"--clean and --corrupted tokenize to {tc} and {tk} tokens (BOS included); patching "
                "needs equal lengths (reword one)"
            )
        self.n_tokens = tc
        if not -tc <= metric_position < tc:
            raise ConfigError(
                f"metric position {metric_position} is outside the prompt's {tc} tokens"
            )
        self.metric_position = metric_position
        self.layer_list_name, layers = decoder_layers(model)
        self.n_layers = len(layers)
        self.residual = [resolve_hook(model, f"layers.{i}") for i in range(self.n_layers)]
        projections = [attention_output_projection(layer) for layer in layers]
        self.projections: list[HookPoint] | None = None
        if all(p is not None for p in projections):
            self.projections = [
                HookPoint(f"layers.{i}.{name}", i, module, pre=True)
                for i, (name, module) in enumerate(projections)
            ]
        self.device = next(model.parameters()).device
        self.decode = lambda i: tokenizer.decode([i])
        self.clean_tokens = [self.decode(i) for i in self.clean_ids]
        self.corrupted_tokens = [self.decode(i) for i in self.corrupted_ids]
        self._clean_cache()

    @torch.no_grad()
    def _clean_cache(self) -> None:
        self.clean_resid: list[torch.Tensor | None] = [None] * self.n_layers
        self.clean_heads: list[torch.Tensor | None] = [None] * self.n_layers

        def store(cache, i):
            def fn(value):
                cache[i] = value[0].detach().clone()  # clone: models may later edit it in place

            return fn

        handles = [attach(p, store(self.clean_resid, i)) for i, p in enumerate(self.residual)]
        handles += [
            attach(p, store(self.clean_heads, i)) for i, p in enumerate(self.projections or [])
        ]
        try:
            clean_logits = self._logits(torch.tensor([self.clean_ids], device=self.device))
        finally:
            for h in handles:
                h.remove()
        vocab = clean_logits.shape[-1]
        bad = [t for t in self.metric.tokens if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"answer: token id {bad[0]} is outside the model's {vocab} logits")
        missing = [self.residual[i].name for i, v in enumerate(self.clean_resid) if v is None]
        if missing:
            raise ConfigError(f"patching: {', '.join(missing)} did not run in the forward pass")
        self.clean_metric = float(self.metric(clean_logits)[0])
        corrupted_logits = self._logits(torch.tensor([self.corrupted_ids], device=self.device))
        self.corrupted_metric = float(self.metric(corrupted_logits)[0])

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] at the metric position."""
        return at_least_fp32(
            self.model(input_ids=ids, use_cache=False).logits[:, self.metric_position]
        )

    def _check(self, p: Patch) -> None:
        if not 0 <= p.layer < self.n_layers:
            raise ConfigError(
                f"patch: layer {p.layer} is out of range; this model has layers 0..{self.n_layers - 1}"
            )
        if p.position is not None and not -self.n_tokens <= p.position < self.n_tokens:
            raise ConfigError(
                f"patch: position {p.position} is outside the prompt's {self.n_tokens} tokens"
            )
        if p.head is not None:
            if self.projections is None:
                raise ConfigError(
                    "--mode head: found no attention output projection "
                    f"({', '.join(OUTPUT_PROJECTIONS)}) "
                    f"in the attention of every layer of {type(self.model).__name__}; "
                    "use --mode layer or position"
                )
            if not 0 <= p.head < self.heads:
                raise ConfigError(
                    f"patch: head {p.head} is out of range; this model has heads 0..{self.heads - 1}"
                )

    @property
    def heads(self) -> int:
        """Attention heads per layer (query heads: the projection input holds one slice each)."""
        n = num_heads(self.model)
        width = self.clean_heads[0].shape[-1] if self.clean_heads[0] is not None else None
        if width is None or width % n:
            raise ConfigError(
                f"--mode head: the attention output projection's input ({width} wide) does not "
                f"split into {n} heads"
            )
        return n

    @torch.no_grad()
    def metrics(
        self, runs: Sequence[Sequence[Patch]], batch_size: int = 16, progress: bool = False
    ) -> torch.Tensor:
        """The metric [len(runs)] (float64) of the corrupted prompt with each run's patches
        applied together; an empty run is the corrupted prompt itself. Runs go through the
        model ``batch_size`` at a time (all share the corrupted input)."""
        if batch_size < 1:
            raise ConfigError(f"--batch-size: {batch_size} is not a positive number")
        for run in runs:
            for p in run:
                self._check(p)
        out = torch.empty(len(runs), dtype=torch.float64)
        ids = torch.tensor([self.corrupted_ids], device=self.device)
        bar = tqdm(total=len(runs), desc="patching", unit="run", disable=not progress, leave=False)
        try:
            for start in range(0, len(runs), batch_size):
                chunk = runs[start : start + batch_size]
                out[start : start + len(chunk)] = (
                    self._run_batch(ids.expand(len(chunk), -1), chunk).double().cpu()
                )
                bar.update(len(chunk))
        finally:
            bar.close()
        return out

    def _run_batch(self, ids: torch.Tensor, chunk: Sequence[Sequence[Patch]]) -> torch.Tensor:
        # Per hook point: the (row, patch) edits it applies.
        edits: dict[tuple[int, bool], list[tuple[int, Patch]]] = {}
        for row, run in enumerate(chunk):
            for p in run:
                edits.setdefault((p.layer, p.head is not None), []).append((row, p))
        handles = []
        head_width = self.clean_heads[0].shape[-1] // self.heads if any(k[1] for k in edits) else 0

        def patcher(layer: int, heads: bool):
            clean = (self.clean_heads if heads else self.clean_resid)[layer]
            todo = edits[(layer, heads)]

            def fn(value):
                new = value.clone()
                for row, p in todo:
                    pos = slice(None) if p.position is None else p.position
                    cols = (
                        slice(None)
                        if p.head is None
                        else slice(p.head * head_width, (p.head + 1) * head_width)
                    )
                    new[row, pos, cols] = clean[pos, cols].to(new.dtype)
                return new

            return fn

        try:
            for layer, heads in edits:
                point = (self.projections if heads else self.residual)[layer]
                handles.append(attach(point, patcher(layer, heads)))
            return self.metric(self._logits(ids))
        finally:
            for h in handles:
                h.remove()

    def sweep(
        self,
        mode: str = "position",
        layers: str | Sequence[int] | None = None,
        batch_size: int = 16,
        progress: bool = False,
    ) -> PatchResult:
        """Patch one thing at a time: each layer's residual stream at all positions
        (``layer``), at each position (``position``), or each attention head (``head``)."""
        if mode not in MODES:
            raise ConfigError(f"--mode: {mode!r} is not a patching mode; valid: {', '.join(MODES)}")
        chosen = parse_layers(layers, self.n_layers)
        if mode == "layer":
            columns, title = ["all positions"], "residual stream at every position"
            cells = [[Patch(i)] for i in chosen]
        elif mode == "position":
            columns = [
                f"{t} {self.clean_tokens[t]!r}"
                + (
                    ""
                    if self.clean_tokens[t] == self.corrupted_tokens[t]
                    else f"/{self.corrupted_tokens[t]!r}"
                )
                for t in range(self.n_tokens)
            ]
            title = "position and clean/corrupted token"
            cells = [[Patch(i, position=t)] for i in chosen for t in range(self.n_tokens)]
        else:
            self._check(Patch(0, head=0))
            columns = [f"head {h}" for h in range(self.heads)]
            title = f"attention head (input of {self.projections[0].name.split('.', 2)[2]}), every position"
            cells = [[Patch(i, head=h)] for i in chosen for h in range(self.heads)]
        values = self.metrics(cells, batch_size, progress).view(len(chosen), len(columns))
        return PatchResult(
            mode=mode,
            metric=self.metric.name,
            values=values,
            rows=[f"layers.{i}" for i in chosen],
            columns=columns,
            clean_metric=self.clean_metric,
            corrupted_metric=self.corrupted_metric,
            clean_tokens=self.clean_tokens,
            corrupted_tokens=self.corrupted_tokens,
            column_title=title,
        )


def activation_patching(
    model: nn.Module,
    tokenizer,
    clean: str | Sequence[int],
    corrupted: str | Sequence[int],
    metric: Metric,
    mode: str = "position",
    layers: str | Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    metric_position: int = -1,
) -> PatchResult:
    """One sweep in one call: ``ActivationPatcher(...).sweep(mode, layers)``."""
    if mode not in MODES:
        raise ConfigError(f"--mode: {mode!r} is not a patching mode; valid: {', '.join(MODES)}")
    patcher = ActivationPatcher(model, tokenizer, clean, corrupted, metric, metric_position)
    return patcher.sweep(mode, layers, batch_size, progress)


def answer_patching(
    model_cfg: ModelConfig,
    clean: str,
    corrupted: str,
    answer: str,
    wrong: str | None = None,
    mode: str = "position",
    layers: str | Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> PatchResult:
    """``activation_patching`` of the model ``model_cfg`` loads, measuring the metric of
    ``answer`` (and ``wrong``; ``answer_metric``) at the last position."""
    model, tokenizer = load_model(model_cfg)
    return activation_patching(
        model,
        tokenizer,
        clean,
        corrupted,
        answer_metric(tokenizer, answer, wrong),
        mode,
        layers,
        batch_size,
        progress,
    )


def check_svg_path(path, what: str = "--svg") -> None:
    """Fail now, in one line, if ``path`` cannot become a file (before the model runs)."""
    check_output_path(Path(path), what)


def write_svg(path, svg: str, what: str = "--svg") -> int:
    """Write the heatmap atomically (parent folders created); its size in bytes. OSError ->
    one-line ConfigError."""
    return write_output(Path(path), svg, what)
