"""Which features a fix test edits: the edits given, plus edits of the features a ranking
puts first (``--ablate-top K``, ``--steer-top K:A``), ranked by a contrast search between
two prompt files or by attribution of a next-token metric over the test's prompts.

    top = TopEdits.from_options(ablate_top=5, steer_top=None, contrast=None, answer=" raised", has_edits=False)
    picks = pick_edits(target, [], top, prompts, answer=" raised")
    picks.edit      # Edit(sae, hook, [Ablate(the 5 features pushing log p(" raised") up most)])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sae.analysis.feature_search import contrast_search, read_prompts
from sae.analysis.target import TOP_TOKENS_SCAN, Target, listed_top_tokens, with_top_tokens
from sae.data.prompt_format import PLAIN, PromptFormat
from sae.errors import ConfigError
from sae.evaluation.lm_metrics import Metric, answer_metric
from sae.interventions.attribution import attribute
from sae.interventions.edits import (
    Ablate,
    Edit,
    FeatureEdit,
    Steer,
    describe_edit,
    edited_features,
    parse_feature_edits,
)


@dataclass(frozen=True)
class TopEdits:
    """Edits of the features first in a ranking: ablate the first ``ablate``; steer each
    of the first ``steer[0]`` by ``steer[1]`` times its decoder direction."""

    ablate: int | None = None
    steer: tuple[int, float] | None = None

    @property
    def count(self) -> int:
        """How many features of the ranking the edits take (0: no edits of top features)."""
        return max(self.ablate or 0, self.steer[0] if self.steer is not None else 0)

    @classmethod
    def from_options(
        cls,
        ablate_top: int | None,
        steer_top: str | None,
        contrast: tuple[Path, Path] | None,
        answer: str | None,
        has_edits: bool,
    ) -> TopEdits:
        """--ablate-top K / --steer-top K:A, checked against the options that rank the
        features (--contrast, --answer) and against the explicit edits (``has_edits``):
        a fix test needs some edit, and a ranking only serves top edits."""
        picks = "--ablate-top / --steer-top"
        if (
            (ablate_top is not None or steer_top is not None)
            and contrast is None
            and answer is None
        ):
            raise ConfigError(
                f"{picks}: say how to pick the features: --contrast TARGET BASELINE or --answer TOKEN"
            )
        if (
            ablate_top is None
            and steer_top is None
            and (contrast is not None or answer is not None)
        ):
            raise ConfigError(f"--contrast / --answer pick features for {picks}; give one of them")
        if not has_edits and ablate_top is None and steer_top is None:
            raise ConfigError(
                "fix-test: no intervention; give --ablate/--clamp/--scale/--steer, --ablate-top K "
                "or --steer-top K:A"
            )
        steer = None
        if steer_top is not None:
            ((k, amount),) = [(e.feature, e.alpha) for e in parse_feature_edits(steer=[steer_top])]
            if k < 1:
                raise ConfigError(
                    f"--steer-top: {steer_top!r} steers no feature; K must be at least 1"
                )
            steer = (k, amount)
        return cls(ablate=ablate_top, steer=steer)


def rank_features(
    target: Target,
    texts: Sequence[str],
    contrast: tuple[Path, Path] | None,
    metric: Callable[[], Metric],
    fmt: PromptFormat = PLAIN,
) -> tuple[list[int], str]:
    """Features ranked for a fix test that edits the top ones, and how they were ranked:
    by contrast search over two prompt files (``contrast``: target, baseline; in chat format
    they hold assistant replies, as for ``search --chat``), else by attribution of
    ``metric()`` (built only then) over ``texts``."""
    if contrast is not None:
        return contrast_search(
            target,
            read_prompts(contrast[0], "--contrast TARGET"),
            read_prompts(contrast[1], "--contrast BASELINE"),
            fmt=fmt,
        ).ranking("effect"), "contrast"
    ranked = attribute(
        target.model, target.tokenizer, target.sae, target.hook, texts, metric(), fmt=fmt
    )
    return ranked.ranking("up"), "attribution"


@dataclass
class PickedEdits:
    """A fix test's edits, checked against the SAE: ``picked``, the ranking's first features
    that top edits took (None without top edits) and ``how`` they were ranked; ``tokens``,
    every edited feature's top tokens (None when off; ``listed_top_tokens``)."""

    edit: Edit
    picked: list[int] | None
    how: str | None
    tokens: dict[int, list[str]] | None

    def to_dict(self) -> dict:
        """{"edits": [``describe_edit``], "features": [{"feature", "top_tokens"}] of each
        edited feature, when top tokens are on}."""
        features = (
            {}
            if self.tokens is None
            else {
                "features": [
                    with_top_tokens({"feature": f}, self.tokens)
                    for f in edited_features(self.edit.edits)
                ]
            }
        )
        return {"edits": [describe_edit(e) for e in self.edit.edits], **features}


def pick_edits(
    target: Target,
    edits: Sequence[FeatureEdit],
    top: TopEdits,
    prompts: Sequence[str],
    *,
    contrast: tuple[Path, Path] | None = None,
    answer: str | None = None,
    wrong: str | None = None,
    fmt: PromptFormat = PLAIN,
    top_tokens: int | None = TOP_TOKENS_SCAN,
    log: Callable[[str], None] = print,
) -> PickedEdits:
    """``edits`` plus the ``top`` edits of the features ranked first by ``rank_features``
    (a contrast search of the ``contrast`` files, else attribution of ``answer``'s metric,
    ``answer_metric``, over ``prompts``), at ``target``'s hook."""
    edits, picked, how = list(edits), None, None
    if top.count:
        ranking, how = rank_features(
            target, prompts, contrast, lambda: answer_metric(target.tokenizer, answer, wrong), fmt
        )
        how = how if contrast is not None else f"attribution to {answer!r}"
        if top.ablate is not None:
            edits.append(Ablate(ranking[: top.ablate]))
        if top.steer is not None:
            k, amount = top.steer
            edits += [Steer(f, amount) for f in ranking[:k]]
        picked = ranking[: top.count]
    edit = Edit(target.sae, target.hook, edits)
    edit.check()  # before top tokens, which index the features
    return PickedEdits(
        edit, picked, how, listed_top_tokens(target, edited_features(edits), top_tokens, log)
    )
