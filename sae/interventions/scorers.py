"""Scorers: text in, one number per text out (higher = more of the unwanted behaviour).

    scorer = load_scorer("words:raise,raised,exception")   # count of listed words
    scorer = load_scorer("hf:s-nlp/roberta_toxicity_classifier@toxic")  # a classifier's P(label)
    scorer = load_scorer("profanity")                      # alt-profanity-check, if installed
    scorer(["some text", "more text"])  -> [0.0, 1.0]

Specs: ``words:W1,W2,...`` or ``words:PATH`` (a file of words, one per line) counts
whole-word, case-insensitive occurrences; ``hf:PATH_OR_HUB_ID[@LABEL]`` runs any Hugging
Face text-classification model and returns the probability of LABEL (default: its last
label, e.g. "toxic" for a two-label toxicity model); ``profanity`` uses the optional
``alt-profanity-check`` package (``pip install 'sae[profanity]'``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sae.errors import ConfigError
from sae.hub import looks_like_local_path

SPEC_HELP = "use words:W1,W2 | words:FILE | hf:PATH_OR_HUB_ID[@LABEL] | profanity"


@dataclass
class Scorer:
    """A named scoring function over a batch of texts. ``pattern``: what a word scorer
    counts the matches of (the fix-test page marks them), None for other scorers."""

    name: str
    score: Callable[[list[str]], list[float]]
    pattern: re.Pattern | None = None

    def __call__(self, texts: Sequence[str]) -> list[float]:
        return [float(s) for s in self.score(list(texts))] if texts else []


def word_list_scorer(words: Sequence[str], name: str | None = None) -> Scorer:
    """Count of whole-word, case-insensitive occurrences of any of ``words``."""
    words = [w.strip() for w in words if w.strip()]
    if not words:
        raise ConfigError("scorer: the word list is empty")
    pattern = re.compile(
        r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE
    )
    return Scorer(
        name or f"words({', '.join(words[:4])}{', ...' if len(words) > 4 else ''})",
        lambda texts: [len(pattern.findall(t)) for t in texts],
        pattern,
    )


def classifier_scorer(
    model: str, label: str | None = None, device: str | None = None, batch_size: int = 32
) -> Scorer:
    """P(label) from a Hugging Face text-classification model (local folder or hub id)."""
    from transformers import pipeline

    if looks_like_local_path(model) and not Path(model).expanduser().is_dir():
        raise ConfigError(
            f"scorer: {model!r} is not a folder; give a local model folder or a hub id like "
            "s-nlp/roberta_toxicity_classifier"
        )
    try:
        clf = pipeline("text-classification", model=model, device=device, top_k=None)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"scorer: cannot load text-classification model {model!r}: {first}; download it "
            "while online (huggingface-cli download ...) or give a local folder"
        ) from None
    labels = list(clf.model.config.id2label.values())
    label = label or labels[-1]
    if label not in labels:
        raise ConfigError(
            f"scorer: {model!r} has no label {label!r}; its labels: {', '.join(labels)}"
        )

    def score(texts: list[str]) -> list[float]:
        out = clf(texts, batch_size=batch_size, truncation=True)
        return [next(r["score"] for r in row if r["label"] == label) for row in out]

    return Scorer(f"P({label}) by {model}", score)


def profanity_scorer() -> Scorer:
    """Probability of offensive language from the offline ``alt-profanity-check`` package."""
    try:
        from profanity_check import predict_prob
    except ImportError:
        raise ConfigError(
            "scorer: 'profanity' needs the alt-profanity-check package; pip install "
            "alt-profanity-check (or pip install 'sae[profanity]')"
        ) from None
    return Scorer("P(profane) by alt-profanity-check", lambda texts: list(predict_prob(texts)))


def load_scorer(spec: str, device: str | None = None) -> Scorer:
    """The scorer a spec names (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "words" and arg:
        path = Path(arg).expanduser()
        if path.is_file():
            return word_list_scorer(
                path.read_text(encoding="utf-8").splitlines(), f"words in {path.name}"
            )
        return word_list_scorer(arg.split(","))
    if kind == "hf" and arg:
        model, _, label = arg.partition("@")
        return classifier_scorer(model, label or None, device)
    if spec == "profanity":
        return profanity_scorer()
    raise ConfigError(f"scorer: {spec!r} is not a scorer; {SPEC_HELP}")
