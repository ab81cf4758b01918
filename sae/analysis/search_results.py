"""Search results as JSON-able listings: the features of a contrast search on each side,
or those firing on a text, each listed feature with its top tokens (what it fires on
most, from the SAE's cached statistics) so a listing of ids says what they mean.

    listing = contrast_listing(target, read_prompts("raised.txt"), read_prompts("not_raised.txt"), top=5)
    [row["feature"] for row in listing["higher_in_target"]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sae.analysis.feature_search import contrast_search, features_in_text
from sae.analysis.target import TOP_TOKENS_SCAN, Target, listed_top_tokens, with_top_tokens
from sae.data.prompt_format import PLAIN, PromptFormat


def contrast_listing(
    target: Target,
    prompts_a: Sequence[str],
    prompts_b: Sequence[str],
    *,
    reduce: str = "max",
    rank: str = "effect",
    top: int = 20,
    fmt: PromptFormat = PLAIN,
    top_tokens: int | None = TOP_TOKENS_SCAN,
    log: Callable[[str], None] = print,
) -> dict:
    """``contrast_search`` of target prompts (A) against baseline prompts (B), as
    {"target_prompts", "baseline_prompts", "target_tokens", "baseline_tokens", "reduce",
    "rank", "higher_in_target", "higher_in_baseline"}: the last two list the ``top``
    features most characteristic of each set by ``rank``, each as ``ContrastResult.row``
    plus its "top_tokens" (``listed_top_tokens``; none when ``top_tokens`` is None)."""
    result = contrast_search(target, prompts_a, prompts_b, reduce, fmt=fmt)
    ranked = {
        "target": result.ranking(rank, "a")[:top],
        "baseline": result.ranking(rank, "b")[:top],
    }
    tokens = listed_top_tokens(target, ranked["target"] + ranked["baseline"], top_tokens, log)
    return {
        "target_prompts": result.n_a,
        "baseline_prompts": result.n_b,
        "target_tokens": result.tokens_a,
        "baseline_tokens": result.tokens_b,
        "reduce": reduce,
        "rank": rank,
        **{
            f"higher_in_{side}": [with_top_tokens(result.row(f), tokens) for f in ranked[side]]
            for side in ranked
        },
    }


def text_listing(
    target: Target,
    text: str,
    focus: str | None = None,
    top: int = 10,
    fmt: PromptFormat = PLAIN,
    top_tokens: int | None = TOP_TOKENS_SCAN,
    log: Callable[[str], None] = print,
) -> dict:
    """``features_in_text`` as {"text", "tokens" (the text's tokens), "focus" (indices of
    the tokens ranked over), "ranking": [{"feature", "activation", "top_tokens"}] (no
    "top_tokens" when ``top_tokens`` is None), "per_token": [[{"feature", "activation"}]
    per token, strongest first]}."""
    hits = features_in_text(target, text, focus, top, fmt)
    tokens = listed_top_tokens(target, [f for f, _ in hits.ranking], top_tokens, log)
    return {
        "text": text,
        "tokens": hits.tokens,
        "focus": hits.focus,
        "ranking": [
            with_top_tokens({"feature": f, "activation": v}, tokens) for f, v in hits.ranking
        ],
        "per_token": [[{"feature": f, "activation": v} for f, v in row] for row in hits.per_token],
    }
