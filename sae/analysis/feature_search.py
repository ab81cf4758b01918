"""Finding features: which ones separate two prompt sets (contrast search), and which fire
on a given text (by-token search).

    result = contrast_search(target, toxic_prompts, neutral_prompts)
    for f in result.ranking("effect")[:10]: ...

    hits = features_in_text(target, "The file was not found", focus="file")

A prompt is scored per feature by its largest activation over the prompt's tokens
(``reduce="max"``, so a feature that fires on one word counts) or the mean over them.
Per feature and set: mean score, firing rate (share of prompts where it fires at all);
across sets: the difference of means, the effect size (difference over the pooled
standard deviation, Cohen's d) and the AUROC of the score as a classifier of target vs
baseline (ties count half). Prompts are tokenized like the training contexts: BOS, then
the text without special tokens; special tokens never count. With a chat ``PromptFormat``
each prompt is the assistant's reply, and only the reply's tokens count.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sae.activations.capture import MaskedCapture
from sae.analysis.target import Target
from sae.config import read_yaml
from sae.data.prompt_format import PLAIN, PromptFormat, check_fits
from sae.data.text import load_text_dataset
from sae.errors import ConfigError
from sae.models.generation import pad_id, padded

REDUCTIONS = ("max", "mean")
RANKINGS = ("effect", "auroc", "diff")
MAX_PROMPT_TOKENS = 1024


def read_prompts(path: str | Path, what: str = "prompts") -> list[str]:
    """Prompts from a file: ``.jsonl`` (one object per line with a "text" field), ``.yaml``
    (a prompt set drawn from a dataset, see ``prompts_from_dataset``) or any other text
    file (one prompt per line). Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{what}: {str(path)!r} is not a file; give a text file with one prompt per line"
        )
    if path.suffix in (".yaml", ".yml"):
        return prompts_from_dataset(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: cannot read {str(path)!r} as UTF-8 text ({e})") from None
    return prompts_from_text(text, str(path), what)


def prompts_from_text(text: str, name: str, what: str = "prompts") -> list[str]:
    """The prompts of a file's text, by its name's suffix: ``.jsonl`` (one object per line
    with a "text" field) or one prompt per line. Blank lines are skipped. ``read_prompts``
    and the explorer's upload both read files with it."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if name.endswith(".jsonl"):
        prompts = []
        for i, line in enumerate(lines, 1):
            try:
                value = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(
                    f'{what}: line {i} of {name!r} is not a JSON object with a "text" field'
                ) from None
            if not isinstance(value, str):
                raise ConfigError(f'{what}: line {i} of {name!r}: "text" is not a string')
            prompts.append(value)
        lines = [p for p in prompts if p.strip()]
    if not lines:
        raise ConfigError(f"{what}: {name!r} holds no prompts; write one prompt per line")
    return lines


# A prompt set file: which rows of which dataset, and which (possibly nested) field.
PROMPT_SET_KEYS = {
    "dataset": None,
    "subset": None,
    "split": "train",
    "field": "text",
    "where": None,
    "limit": 1000,
}
_WHERE = re.compile(r"\s*([\w.]+)\s*(<=|>=|==|!=|<|>)\s*(-?[\d.]+(?:[eE][+-]?\d+)?|true|false)\s*")

# A prompt set's where condition: (dotted path of the field, comparison, number or bool).
_Condition = tuple[list[str], Callable[[object, object], bool], float | bool]
_COMPARE = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


def prompts_from_dataset(path: Path, what: str = "prompts") -> list[str]:
    """Prompts drawn from a dataset, as a YAML prompt set describes them::

        dataset: allenai/real-toxicity-prompts   # hub id, local file or folder, or builtin:...
        split: train
        field: prompt.text                        # dotted path into nested records
        where: prompt.toxicity > 0.5              # optional: FIELD OP NUMBER (or true / false)
        limit: 500                                # the first N rows that pass, in dataset order

    The dataset is streamed, so only the rows read are downloaded.
    """
    s = _read_prompt_set(path, what)
    field = str(s["field"]).split(".")
    condition = None if s["where"] is None else _parse_where(s["where"], path, what)
    limit = int(s["limit"])
    data = load_text_dataset(
        str(s["dataset"]),
        str(s["split"]),
        field[0],
        s["subset"],
        streaming=True,
        require_text=False,
    )
    prompts = _first_prompts(data.dataset, s, field, condition, limit, what)
    if not prompts:
        raise ConfigError(
            f"{what}: no row of {s['dataset']} [{s['split']}] passes where {s['where']!r}"
        )
    return prompts


def _read_prompt_set(path: Path, what: str) -> dict:
    """A prompt set file's keys, the defaults (``PROMPT_SET_KEYS``) filled in; one without
    a dataset, or with keys it may not have, is refused."""
    spec = read_yaml(path)
    unknown = sorted(set(spec) - set(PROMPT_SET_KEYS))
    if unknown or not spec.get("dataset"):
        raise ConfigError(
            f"{what}: {str(path)!r} needs a dataset key and may have "
            f"{', '.join(PROMPT_SET_KEYS)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
        )
    return {**PROMPT_SET_KEYS, **spec}


def _parse_where(where, path: Path, what: str) -> _Condition:
    """A prompt set's ``where: FIELD OP NUMBER`` (or true / false): (the field's dotted path,
    the comparison, the number or bool)."""
    m = _WHERE.fullmatch(str(where))
    if m is None:
        raise ConfigError(
            f"{what}: where {where!r} in {str(path)!r} is not FIELD OP NUMBER, "
            "e.g. prompt.toxicity > 0.5"
        )
    key, op, raw = m.group(1).split("."), m.group(2), m.group(3)
    value = {"true": True, "false": False}.get(raw, None)
    value = float(raw) if value is None else value
    return key, _COMPARE[op], value


def _first_prompts(
    rows: Iterable[dict],
    s: dict,
    field: list[str],
    condition: _Condition | None,
    limit: int,
    what: str,
) -> list[str]:
    """The stripped, non-blank texts at ``field`` of the first rows that pass ``condition``,
    at most ``limit``; a row whose field is not text is refused (``s``: the prompt set)."""
    prompts = []
    for row in rows:
        if condition is not None:
            got = _lookup(row, condition[0])
            if got is None or not condition[1](got, condition[2]):
                continue
        text = _lookup(row, field)
        if not isinstance(text, str):
            raise ConfigError(
                f"{what}: field {s['field']!r} of {s['dataset']} is {type(text).__name__}, not text"
            )
        if text.strip():
            prompts.append(text.strip())
        if len(prompts) >= limit:
            break
    return prompts


def _lookup(row: dict, keys: list[str]):
    for k in keys:
        row = row.get(k) if isinstance(row, dict) else None
    return row


def encode_replies(
    target: Target, prompts: Sequence[str], fmt: PromptFormat = PLAIN
) -> list[tuple[list[int], int]]:
    """(token ids, first position that counts) per prompt, as ``fmt.reply_ids``. A prompt
    longer than the model reads is refused; one longer than MAX_PROMPT_TOKENS (which bounds
    the [T, M] latents' memory) is cut at the end."""
    encoded = []
    for p in prompts:
        row, start = fmt.reply_ids(target.tokenizer, p)
        check_fits(row, target.model, p)
        encoded.append((row[:MAX_PROMPT_TOKENS], start))
    return encoded


def token_latents(
    target: Target,
    prompts: Sequence[str],
    batch_size: int = 16,
    progress: bool = False,
    fmt: PromptFormat = PLAIN,
) -> list[torch.Tensor]:
    """Latents of every prompt token: one [T_i, M] float32 tensor (on the model's device)
    per prompt, rows of special tokens (and, in chat format, of everything before the
    reply) zeroed (``encode_replies`` says which prompts are refused or cut)."""
    return _latents(target, encode_replies(target, prompts, fmt), batch_size, progress)


@torch.no_grad()
def _latents(
    target: Target, encoded: list[tuple[list[int], int]], batch_size: int, progress: bool
) -> list[torch.Tensor]:
    """``token_latents`` of prompts already encoded."""
    tok = target.tokenizer
    capture = MaskedCapture(target.model, tok, [target.hook])
    chunks = [encoded[first : first + batch_size] for first in range(0, len(encoded), batch_size)]
    batches = (
        padded([ids for ids, _ in chunk], pad_id(tok), target.device, left=False)
        for chunk in chunks
    )
    out = []
    for chunk, batch in zip(
        tqdm(chunks, desc="prompts", disable=not progress), capture.batches(batches)
    ):
        z = target.encode(batch.acts[target.hook]).float()
        z = torch.where(batch.keep[..., None], z, 0.0)
        for row, (ids, start) in enumerate(chunk):
            z[row, :start] = 0.0
            out.append(z[row, : len(ids)])
    return out


def prompt_scores(
    target: Target,
    prompts: Sequence[str],
    reduce: str = "max",
    batch_size: int = 16,
    progress: bool = False,
    fmt: PromptFormat = PLAIN,
) -> torch.Tensor:
    """Per-prompt feature scores [P, M] (float32, CPU): max or mean latent over each prompt's
    tokens that count (``token_latents``)."""
    return _scores(target, encode_replies(target, prompts, fmt), reduce, batch_size, progress)


def _scores(
    target: Target,
    encoded: list[tuple[list[int], int]],
    reduce: str,
    batch_size: int,
    progress: bool,
) -> torch.Tensor:
    """``prompt_scores`` of prompts already encoded."""
    if reduce not in REDUCTIONS:
        raise ConfigError(f"reduce: {reduce!r} is not valid; use one of {', '.join(REDUCTIONS)}")
    scores = []
    for (ids, start), z in zip(encoded, _latents(target, encoded, batch_size, progress)):
        scores.append(z.max(0).values if reduce == "max" else z.sum(0) / max(1, len(ids) - start))
    return torch.stack(scores).cpu()


def auroc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """P(score of a random a-row > a random b-row) + P(tie) / 2, per column.

    a: [n_a, M], b: [n_b, M]. Returns [M] float64. Counts, for each a-score, the b-scores
    below it and equal to it by binary search in the sorted b-scores (O(M n log n))."""
    bs = b.t().contiguous().double().sort(dim=1).values  # [M, n_b]
    at = a.t().contiguous().double()  # [M, n_a]
    below = torch.searchsorted(bs, at, right=False)  # b < a
    not_above = torch.searchsorted(bs, at, right=True)  # b <= a
    wins = below.double() + 0.5 * (not_above - below).double()
    return wins.sum(1) / (a.shape[0] * b.shape[0])


@dataclass
class ContrastResult:
    """Per-feature contrast statistics, each [M] (CPU): target (A) vs baseline (B)."""

    mean_a: torch.Tensor
    mean_b: torch.Tensor
    fire_a: torch.Tensor
    fire_b: torch.Tensor
    diff: torch.Tensor
    effect: torch.Tensor
    auroc: torch.Tensor
    n_a: int
    n_b: int
    tokens_a: int
    tokens_b: int
    reduce: str

    def ranking(self, by: str = "effect", higher_in: str = "a") -> list[int]:
        """Feature ids from the most to the least characteristic of set ``higher_in``."""
        if by not in RANKINGS:
            raise ConfigError(f"rank: {by!r} is not valid; use one of {', '.join(RANKINGS)}")
        score = getattr(self, by).double()
        if by == "auroc":
            score = score - 0.5
        score = score if higher_in == "a" else -score
        # Ties (e.g. AUROC 1.0) are broken by the difference of means.
        return sorted(
            range(len(score)), key=lambda f: (-score[f].item(), -abs(self.diff[f].item()))
        )

    def row(self, f: int) -> dict:
        return {
            "feature": f,
            "mean_target": self.mean_a[f].item(),
            "mean_baseline": self.mean_b[f].item(),
            "fire_target": self.fire_a[f].item(),
            "fire_baseline": self.fire_b[f].item(),
            "diff": self.diff[f].item(),
            "effect": self.effect[f].item(),
            "auroc": self.auroc[f].item(),
        }


def contrast(
    a: torch.Tensor, b: torch.Tensor, reduce: str = "max", tokens: tuple[int, int] = (0, 0)
) -> ContrastResult:
    """Contrast statistics from per-prompt scores a [n_a, M] and b [n_b, M]."""
    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    var_a = a.var(0, correction=1) if a.shape[0] > 1 else torch.zeros_like(mean_a)
    var_b = b.var(0, correction=1) if b.shape[0] > 1 else torch.zeros_like(mean_b)
    dof = max(a.shape[0] + b.shape[0] - 2, 1)
    pooled = (((a.shape[0] - 1) * var_a + (b.shape[0] - 1) * var_b) / dof).sqrt()
    diff = mean_a - mean_b
    # A feature with no spread in either set: its difference decides, on a tiny scale.
    scale = torch.maximum(
        pooled, torch.full_like(pooled, 1e-6) + 1e-3 * (mean_a.abs() + mean_b.abs())
    )
    return ContrastResult(
        mean_a=mean_a.float(),
        mean_b=mean_b.float(),
        fire_a=(a > 0).double().mean(0).float(),
        fire_b=(b > 0).double().mean(0).float(),
        diff=diff.float(),
        effect=(diff / scale).float(),
        auroc=auroc(a, b).float(),
        n_a=a.shape[0],
        n_b=b.shape[0],
        tokens_a=tokens[0],
        tokens_b=tokens[1],
        reduce=reduce,
    )


def contrast_search(
    target: Target,
    prompts_a: Sequence[str],
    prompts_b: Sequence[str],
    reduce: str = "max",
    batch_size: int = 16,
    progress: bool = True,
    fmt: PromptFormat = PLAIN,
) -> ContrastResult:
    """Contrast statistics of every feature between target prompts (A) and baseline prompts (B)."""
    for what, prompts in (("target prompts", prompts_a), ("baseline prompts", prompts_b)):
        if not prompts:
            raise ConfigError(f"{what}: none given")
    encoded = [encode_replies(target, ps, fmt) for ps in (prompts_a, prompts_b)]
    a, b = (_scores(target, e, reduce, batch_size, progress) for e in encoded)
    tokens = tuple(
        sum(len(ids) - start for ids, start in e) for e in encoded
    )  # BOS or the chat header not
    return contrast(a, b, reduce, tokens)


@dataclass
class TextFeatures:
    """Which features fire on a text: its tokens, per token the strongest features, and
    features ranked by their largest activation over the focus tokens."""

    tokens: list[str]
    focus: list[int]  # indices into tokens the ranking covers
    per_token: list[list[tuple[int, float]]]
    ranking: list[tuple[int, float]]  # (feature, max activation over the focus tokens)


def focus_positions(target: Target, text: str, focus: str | None, first: int = 1) -> list[int]:
    """Token positions whose characters overlap the first occurrence of ``focus`` in
    ``text``; all text tokens when focus is None. The text's first token sits at ``first``
    (after BOS, or after the chat header)."""
    try:
        enc = target.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=focus is not None
        )
    except NotImplementedError:  # slow (Python) tokenizers have no character offsets
        raise ConfigError(
            "--focus: needs a fast tokenizer (with character offsets); this model's "
            "tokenizer is a slow one; leave out --focus to rank over the whole text"
        ) from None
    n = len(enc["input_ids"])
    if focus is None:
        return list(range(first, first + n))
    start = text.find(focus)
    if not focus or start < 0:
        raise ConfigError(f"--focus: {focus!r} does not occur in the text {text!r}")
    end = start + len(focus)
    hits = [i + first for i, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > start]
    if not hits:
        raise ConfigError(f"--focus: no token of the text covers {focus!r}")
    return hits


def features_in_text(
    target: Target, text: str, focus: str | None = None, top: int = 10, fmt: PromptFormat = PLAIN
) -> TextFeatures:
    """The features that fire on ``text`` (or the tokens covering ``focus`` in it), strongest first."""
    if not text.strip():
        raise ConfigError("--text: empty; give the text to search")
    ids, first = fmt.reply_ids(target.tokenizer, text)
    z = token_latents(target, [text], fmt=fmt)[
        0
    ].cpu()  # [T, M]; shorter than ids if the text was cut
    positions = [p for p in focus_positions(target, text, focus, first) if p < z.shape[0]]
    ids = ids[: z.shape[0]]
    tok = target.tokenizer
    tokens = [tok.decode([i]) for i in ids]
    per_token = []
    for row in z:
        vals, feats = row.topk(min(top, row.shape[0]))
        per_token.append([(int(f), float(v)) for f, v in zip(feats, vals) if v > 0])
    best = z[positions].max(0).values
    vals, feats = best.topk(min(top, best.shape[0]))
    return TextFeatures(
        tokens=tokens,
        focus=positions,
        per_token=per_token,
        ranking=[(int(f), float(v)) for f, v in zip(feats, vals) if v > 0],
    )


def given_prompts(texts: Sequence[str], path: str | Path | None) -> list[str]:
    """Prompts given one by one (``--prompt``, repeatable) or in a file (``--prompts``,
    ``read_prompts``): exactly one of the two."""
    if bool(texts) == (path is not None):
        raise ConfigError(
            "give prompts with --prompt TEXT (repeatable) or --prompts FILE, not both"
        )
    return list(texts) if texts else read_prompts(path, "--prompts")
