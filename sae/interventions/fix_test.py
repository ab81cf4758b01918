"""Testing a fix: does an intervention remove a behaviour, and what does it cost?
(docs/design.md §6, "Effect of a fix".)

    result = fix_test(model, tokenizer, prompts, [Edit(sae, hook, [Ablate(features)])], scorer,
                      samples=8, neutral=neutral_contexts)
    print(result.table())

For each prompt, ``samples`` continuations are drawn with and without the edits, with the
same seed. Each is scored by ``scorer`` (higher = more of the behaviour). Reported for
both conditions, each with a 95% bootstrap confidence interval (resampling prompts, a
prompt's samples staying together, so correlated samples are not counted as independent):

* mean score, and the fraction of continuations scoring above ``threshold``;
* fluency: the perplexity of the continuations under the clean model (an edit that
  breaks the model produces text the clean model finds unlikely);
* and for the edit alone, the KL divergence KL(p_clean || p_edited) of next-token
  distributions on neutral text, per predicted token.

Differences (edited - baseline) get paired intervals, from the same resamples.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.activations.capture import special_token_ids
from sae.activations.stream import contexts_for
from sae.analysis.feature_search import read_prompts
from sae.analysis.target import Target
from sae.atomic_io import write_output
from sae.data.prompt_format import PLAIN, PromptFormat
from sae.evaluation.lm_metrics import at_least_fp32
from sae.interventions.edits import Edit, describe_edit, intervene
from sae.interventions.scorers import Scorer
from sae.models.generation import Sampling, continuation_ids, prompt_token_ids

CONDITIONS = ("baseline", "intervened")


def bootstrap_ci(
    values: torch.Tensor, statistic, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of ``statistic`` over resamples of the rows of ``values`` [n, ...]."""
    n = values.shape[0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    stats = torch.tensor([float(statistic(values[i])) for i in idx])
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return float(stats.quantile(lo)), float(stats.quantile(hi))


@torch.no_grad()
def continuation_nll(
    model: PreTrainedModel, prompt_ids: Sequence[int], cont: Sequence[int]
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens) of ``cont`` after ``prompt_ids``
    under ``model`` as it is now (call outside any intervention for the clean model)."""
    if not cont:
        return 0.0, 0
    device = next(model.parameters()).device
    ids = torch.tensor([[*prompt_ids, *cont]], device=device)
    logits = at_least_fp32(
        model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1]
    )
    targets = torch.tensor(cont, device=device)
    return float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum")), len(cont)


@torch.no_grad()
def neutral_kl(
    model: PreTrainedModel,
    edits: Sequence[Edit],
    contexts: Sequence[torch.Tensor],
    skip_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_clean || p_edited) per context, averaged over its predicted tokens: [n_contexts].
    ``skip_tokens``: ids whose positions the edits leave alone (``intervene``)."""
    device = next(model.parameters()).device
    out = []
    for ids in contexts:
        ids = ids.to(device).view(1, -1)
        clean = at_least_fp32(model(input_ids=ids, use_cache=False).logits[0]).log_softmax(-1)
        with intervene(model, edits, skip_tokens):
            edited = at_least_fp32(model(input_ids=ids, use_cache=False).logits[0]).log_softmax(-1)
        out.append(float((clean.exp() * (clean - edited)).sum(-1).mean()))
    return torch.tensor(out, dtype=torch.float64)


@dataclass
class FixTestResult:
    """Per prompt and sample: texts and scores; per condition: summary statistics with CIs."""

    prompts: list[str]
    texts: dict[str, list[list[str]]]  # condition -> [prompt][sample]
    scores: dict[str, torch.Tensor]  # condition -> [prompts, samples]
    nll: dict[
        str, torch.Tensor
    ]  # condition -> [prompts, samples] summed nats under the clean model
    tokens: dict[str, torch.Tensor]  # condition -> [prompts, samples] continuation tokens
    kl: torch.Tensor | None  # [neutral contexts]
    scorer: str
    threshold: float
    summary: dict
    marks: re.Pattern | None = None  # what a words: scorer counts, marked in html()
    neutral_tokens: int = 0  # tokens of neutral text the KL was measured on

    def table(self) -> str:
        s = self.summary
        rows = [
            ("mean score", "mean_score"),
            (f"fraction > {self.threshold:g}", "over_threshold"),
            ("perplexity (clean model)", "perplexity"),
        ]
        lines = [
            f"{len(self.prompts)} prompts x {self.scores['baseline'].shape[1]} samples; score: {self.scorer}",
            f"  {'':<26} {'baseline':>22} {'intervened':>22} {'change':>22}",
        ]
        for label, key in rows:
            cells = [_cell(s[c][key]) for c in CONDITIONS] + [_cell(s["change"][key])]
            lines.append(f"  {label:<26} " + " ".join(f"{c:>22}" for c in cells))
        if "kl" in s:
            lines.append(f"  {'KL on neutral text (nats)':<26} {'':>22} {_cell(s['kl']):>22}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "scorer": self.scorer,
            "threshold": self.threshold,
            "summary": self.summary,
            "prompts": [
                {
                    "prompt": p,
                    **{
                        c: [
                            {"text": t, "score": float(sc)}
                            for t, sc in zip(self.texts[c][i], self.scores[c][i])
                        ]
                        for c in CONDITIONS
                    },
                }
                for i, p in enumerate(self.prompts)
            ],
        }

    def html(self, title: str = "Fix test") -> str:
        """A small self-contained HTML page: the table, bar charts with CIs and axis values,
        and the first sample per prompt with its score (and, for a words: scorer, the words
        it counted marked). Prompts and samples are untrusted text: all of it is escaped."""
        s = self.summary
        charts = "".join(
            _bar_chart(label, [s[c][key] for c in CONDITIONS])
            for label, key in (
                ("mean score", "mean_score"),
                (f"fraction > {self.threshold:g}", "over_threshold"),
                ("perplexity", "perplexity"),
            )
        )
        rows = "".join(
            f"<tr><td>{html.escape(p)}</td>"
            + "".join(
                f"<td>{marked(self.texts[c][i][0], self.marks)}"
                f"<div class=score>score {float(self.scores[c][i, 0]):.4g}</div></td>"
                for c in CONDITIONS
            )
            + "</tr>"
            for i, p in enumerate(self.prompts[:20])
        )
        note = "<p>Marked: the words the scorer counted.</p>" if self.marks is not None else ""
        return (
            f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            "<style>body{font:14px system-ui,sans-serif;margin:1.5em}pre{background:#f4f4f4;padding:.8em}"
            "td{vertical-align:top;border-top:1px solid #ddd;padding:.3em .6em;white-space:pre-wrap}"
            "mark{background:#ffd27a;border-radius:2px}.score{color:#667;font-size:12px;white-space:normal}"
            "svg{margin-right:1.5em}svg text{fill:#444}</style>"
            f"<h1>{html.escape(title)}</h1><pre>{html.escape(self.table())}</pre><div>{charts}</div>"
            f"<h2>First sample per prompt</h2>{note}"
            "<table><tr><th>prompt</th><th>baseline</th><th>intervened</th></tr>"
            f"{rows}</table>"
        )


def _cell(stat: dict) -> str:
    return f"{stat['value']:.4g} [{stat['ci'][0]:.3g}, {stat['ci'][1]:.3g}]"


def marked(text: str, pattern: re.Pattern | None) -> str:
    """``text`` HTML-escaped, each match of ``pattern`` wrapped in <mark>.

    Matches are found in the raw text, as the scorer saw it (in escaped text a word could
    match inside an entity such as "&amp;" or miss one written with "<"), and every piece,
    matched or not, is escaped on its own: no text from the model becomes markup."""
    if pattern is None:
        return html.escape(text)
    out, last = [], 0
    for m in pattern.finditer(text):
        out.append(f"{html.escape(text[last : m.start()])}<mark>{html.escape(m.group())}</mark>")
        last = m.end()
    return "".join(out) + html.escape(text[last:])


def _axis_top(x: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k >= x: a round top for a value axis (1 without data)."""
    if not math.isfinite(x) or x <= 0:
        return 1.0
    step = 10.0 ** math.floor(math.log10(x))
    return next(m * step for m in (1, 2, 2.5, 5, 10) if m * step >= x * (1 - 1e-12))


def _bar_chart(label: str, stats: list[dict], width: int = 250, height: int = 180) -> str:
    """Inline SVG: one bar per condition with its CI as an error bar, its value above it,
    and a value axis with gridlines at 0, a quarter, ..., the (rounded) top."""
    finite = [v for s in stats for v in (s["ci"][1], s["value"]) if math.isfinite(v)]
    top = _axis_top(max(finite, default=0.0))
    left, plot_top, plot_h, bar_w = 46, 30, height - 54, 56

    def y(v: float) -> float:  # where value v sits; clipped to 0..top, not finite at 0
        return plot_top + plot_h * (1 - (min(max(v, 0.0), top) if math.isfinite(v) else 0.0) / top)

    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
        f'<title>{html.escape(label)}</title><text x="4" y="14" font-size="12">{html.escape(label)}</text>',
        f'<line x1="{left}" x2="{left}" y1="{plot_top}" y2="{plot_top + plot_h}" stroke="#888"/>',
    ]
    for k in range(5):
        v = top * k / 4
        parts.append(
            f'<line x1="{left - 4}" x2="{width - 4}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="10" text-anchor="end">{v:.3g}</text>'
        )
    for i, (name, s) in enumerate(zip(CONDITIONS, stats)):
        x, value = left + 22 + i * (bar_w + 40), s["value"] if math.isfinite(s["value"]) else 0.0
        color = "#9aa5b1" if i == 0 else "#d9822b"
        parts.append(
            f'<rect x="{x}" y="{y(value):.1f}" width="{bar_w}" height="{plot_top + plot_h - y(value):.1f}"'
            f' fill="{color}"><title>{name}: {s["value"]:.4g} '
            f"[{s['ci'][0]:.4g}, {s['ci'][1]:.4g}]</title></rect>"
            f'<line x1="{x + bar_w / 2}" x2="{x + bar_w / 2}" y1="{y(s["ci"][0]):.1f}" y2="{y(s["ci"][1]):.1f}"'
            ' stroke="#222" stroke-width="2"/>'
            f'<text x="{x + bar_w / 2}" y="{min(y(value), y(s["ci"][1])) - 4:.1f}" font-size="11"'
            f' text-anchor="middle">{s["value"]:.3g}</text>'
            f'<text x="{x + bar_w / 2}" y="{height - 6}" font-size="11" text-anchor="middle">{name}</text>'
        )
    return "".join(parts) + "</svg>"


def _statistics(threshold: float) -> dict:
    """Statistic name -> function of b [prompts, samples, 3] (score, summed nll, tokens)."""
    return {
        "mean_score": lambda b: b[..., 0].mean(),
        "over_threshold": lambda b: (b[..., 0] > threshold).double().mean(),
        "perplexity": lambda b: math.exp(b[..., 1].sum() / max(float(b[..., 2].sum()), 1.0)),
    }


def fix_test(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    edits: Sequence[Edit],
    scorer: Scorer,
    samples: int = 8,
    sampling: Sampling = Sampling(),
    threshold: float = 0.5,
    neutral: Sequence[torch.Tensor] = (),
    resamples: int = 1000,
    progress: bool = True,
    fmt: PromptFormat = PLAIN,
) -> FixTestResult:
    """Continuations with and without ``edits``, scored, with fluency costs (module docstring).
    ``fmt``: plain prompts, or chat prompts whose continuation is the assistant's reply."""
    skip = special_token_ids(tokenizer)  # the edits leave special tokens alone, as training did
    ids = _continuation_ids(
        model, tokenizer, prompts, edits, skip, samples, sampling, progress, fmt
    )
    texts = {
        c: [[tokenizer.decode(s, skip_special_tokens=True) for s in per] for per in ids[c]]
        for c in CONDITIONS
    }
    scores, nll, tokens = {}, {}, {}
    for c in CONDITIONS:
        scores[c], nll[c], tokens[c] = _measure(
            model, tokenizer, prompts, ids[c], texts[c], scorer, samples, fmt
        )
    summary = _summary(scores, nll, tokens, threshold, resamples)
    kl = None
    if neutral:
        kl = neutral_kl(model, edits, neutral, skip)
        summary["kl"] = _with_ci(kl, lambda v: v.mean(), resamples)
    return FixTestResult(
        prompts=list(prompts),
        texts=texts,
        scores=scores,
        nll=nll,
        tokens=tokens,
        kl=kl,
        scorer=scorer.name,
        threshold=threshold,
        summary=summary,
        marks=scorer.pattern,
        neutral_tokens=sum(c.numel() for c in neutral),
    )


def _continuation_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    edits: Sequence[Edit],
    skip: torch.Tensor,
    samples: int,
    sampling: Sampling,
    progress: bool,
    fmt: PromptFormat,
) -> dict[str, list[list[list[int]]]]:
    """Condition -> continuation ids [prompt][sample]: drawn without, then with, ``edits``
    (which leave the ``skip`` ids alone), with the same seed."""
    ids = {
        "baseline": continuation_ids(
            model, tokenizer, prompts, samples, sampling, progress=progress, fmt=fmt
        )
    }
    with intervene(model, edits, skip):
        ids["intervened"] = continuation_ids(
            model, tokenizer, prompts, samples, sampling, progress=progress, fmt=fmt
        )
    return ids


def _measure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    ids: list[list[list[int]]],
    texts: list[list[str]],
    scorer: Scorer,
    samples: int,
    fmt: PromptFormat,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One condition's continuations (``ids`` and their ``texts``, [prompt][sample]) measured,
    each [prompts, samples]: the score, the summed NLL in nats under ``model`` as it is now
    (the clean model) and the token count."""
    flat = [t for per in texts for t in per]
    scores = torch.tensor(scorer(flat), dtype=torch.float64).view(len(prompts), samples)
    pairs = [
        continuation_nll(model, fmt.prompt_ids(tokenizer, p), s)
        for p, per in zip(prompts, ids)
        for s in per
    ]
    nll = torch.tensor([p[0] for p in pairs], dtype=torch.float64).view(len(prompts), samples)
    tokens = torch.tensor([p[1] for p in pairs], dtype=torch.float64).view(len(prompts), samples)
    return scores, nll, tokens


def _summary(
    scores: dict[str, torch.Tensor],
    nll: dict[str, torch.Tensor],
    tokens: dict[str, torch.Tensor],
    threshold: float,
    resamples: int,
) -> dict:
    """Each statistic (``_statistics``) per condition and its change (intervened - baseline),
    with bootstrap intervals; the change's are paired: each resample draws the same prompts
    for both conditions."""
    # both[c]: [prompts, samples, 3] (score, summed nll, tokens); paired: [prompts, 2, samples, 3]
    both = {c: torch.stack([scores[c], nll[c], tokens[c]], -1) for c in CONDITIONS}
    paired = torch.stack([both["baseline"], both["intervened"]], 1)
    summary: dict = {c: {} for c in (*CONDITIONS, "change")}
    for key, fn in _statistics(threshold).items():
        for c in CONDITIONS:
            summary[c][key] = _with_ci(both[c], fn, resamples)
        diff = lambda p, fn=fn: fn(p[:, 1]) - fn(p[:, 0])  # noqa: E731
        summary["change"][key] = _with_ci(paired, diff, resamples)
    return summary


def _with_ci(values: torch.Tensor, statistic: Callable, resamples: int) -> dict:
    """{"value": ``statistic`` of ``values``, "ci": its bootstrap interval over their rows}."""
    return {
        "value": float(statistic(values)),
        "ci": bootstrap_ci(values, statistic, resamples, seed=1),
    }


def neutral_contexts(
    target: Target, lines: Sequence[str] | None, tokens: int, log: Callable[[str], None] = print
) -> list[torch.Tensor]:
    """Contexts (LongTensors [<= context_tokens]) of neutral text for a fix test's KL cost,
    about ``tokens`` in all: ``lines`` (each a context), else the data's held-out split;
    none when ``tokens`` is 0 or there is no held-out split."""
    if tokens == 0:
        return []
    if lines is not None:
        contexts, total = [], 0
        for line in lines:
            ids = prompt_token_ids(target.tokenizer, line)[: target.cfg.data.context_tokens]
            contexts.append(torch.tensor(ids))
            total += len(ids)
            if total >= tokens:
                break
        return contexts
    d = target.cfg.data
    if d.eval_split is None:
        log("no KL cost: data.eval_split is null and no --neutral file was given")
        return []
    cfg = replace(target.cfg, data=replace(d, split=d.eval_split, token_budget=tokens))
    return [row for batch in contexts_for(cfg, target.tokenizer) for row in batch]


def run_fix_test(
    target: Target,
    edit: Edit,
    prompts: Sequence[str],
    scorer: Scorer,
    *,
    samples: int = 8,
    sampling: Sampling = Sampling(),
    threshold: float = 0.5,
    neutral_file: Path | None = None,
    neutral_tokens: int = 16384,
    html_path: Path | None = None,
    fmt: PromptFormat = PLAIN,
    log: Callable[[str], None] = print,
) -> FixTestResult:
    """``fix_test`` of ``edit`` on ``target``'s model, with the KL cost on about
    ``neutral_tokens`` tokens of neutral text (``neutral_contexts``: the lines of
    ``neutral_file``, else the data's held-out split); with ``html_path``, the result's
    page is written there too."""
    lines = read_prompts(neutral_file, "--neutral") if neutral_file else None
    neutral = neutral_contexts(target, lines, neutral_tokens, log=log)
    result = fix_test(
        target.model,
        target.tokenizer,
        prompts,
        [edit],
        scorer,
        samples,
        sampling,
        threshold,
        neutral,
        fmt=fmt,
    )
    if html_path is not None:
        title = f"Fix test: {', '.join(describe_edit(e) for e in edit.edits)} at {target.hook}"
        write_output(html_path, result.html(title), "--html")
        log(f"wrote {html_path}")
    return result
