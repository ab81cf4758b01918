"""Language-model losses measured the same way everywhere (demo model card, splice metrics),
and metrics of the next-token logits (activation patching, attribution)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae.errors import ConfigError


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 up to fp32 for losses; fp32 and fp64 kept as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def next_token_ce_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed cross-entropy in nats of predicting ids[:, 1:] from logits[:, :-1] ([B, T, V], [B, T])."""
    return (
        F.cross_entropy(
            at_least_fp32(logits[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
        )
        .double()
        .item()
    )


@torch.no_grad()
def next_token_loss(
    model: torch.nn.Module, contexts: torch.Tensor, batch_size: int = 16, progress: bool = False
) -> tuple[float, int]:
    """Mean next-token cross-entropy in nats over every predicted position.

    contexts: LongTensor [n, T]; position t predicts token t+1, so each context yields
    T - 1 predictions. Returns (mean loss in nats, number of predicted tokens). The sum is
    accumulated in float64 so the result does not depend on batch size.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(contexts), batch_size), desc="eval", disable=not progress):
        batch = contexts[start : start + batch_size].to(device)
        total += next_token_ce_sum(model(input_ids=batch).logits, batch)
        count += batch[:, 1:].numel()
    return total / count, count


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy in nats of the empirical token distribution of ``tokens`` (any shape).

    This is the loss of the best possible context-free model fitted to the very text it is
    scored on: a lower bound for any unigram model, hence a fair bar for an LM to beat.
    """
    counts = Counter(tokens.flatten().tolist())
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


# ---- metrics of the logits at one position (patching, attribution) -------------------------


@dataclass(frozen=True)
class Metric:
    """A score of the logits at one position: ``fn`` maps logits [N, V] (float32, or
    float64 for a float64 model) to [N].

    ``metric(logits)`` takes [V] (-> float) or [N, V] (-> tensor [N]). Any callable of
    that shape plugs in (a classifier's score of the logits, say); ``tokens`` lists the
    token ids it reads, checked against the vocabulary before any run.
    """

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    tokens: tuple[int, ...] = ()

    def __call__(self, logits: torch.Tensor):
        logits = at_least_fp32(logits)
        if logits.dim() == 1:
            return float(self.fn(logits[None])[0])
        return self.fn(logits)


def answer_token(tokenizer, token: str | int, what: str = "answer") -> int:
    """The id of ``token``: an id as is, a string tokenized without special tokens, which
    must give exactly one token (ConfigError naming the pieces otherwise)."""
    if isinstance(token, bool) or not isinstance(token, (int, str)):
        raise ConfigError(f"{what}: {token!r} is neither a token string nor a token id")
    if isinstance(token, int):
        if not 0 <= token < len(tokenizer):
            raise ConfigError(
                f"{what}: token id {token} is out of range; the vocabulary has ids "
                f"0..{len(tokenizer) - 1}"
            )
        return token
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = ", ".join(repr(p) for p in tokenizer.convert_ids_to_tokens(ids))
        hint = "it is empty" if not ids else f"it is {len(ids)} tokens ({pieces})"
        raise ConfigError(
            f"{what}: {token!r} must be exactly one token, but {hint}; "
            "give a single token (mind the leading space, e.g. ' raised')"
        )
    return ids[0]


def _token(tokenizer, token: str | int, what: str) -> int:
    if tokenizer is None:
        if isinstance(token, str):
            raise TypeError(f"{what}: a token string ({token!r}) needs the tokenizer")
        return int(token)
    return answer_token(tokenizer, token, what)


def _label(tokenizer, token: str | int, token_id: int) -> str:
    return (
        repr(token)
        if isinstance(token, str) or tokenizer is None
        else repr(tokenizer.decode([token_id]))
    )


def logit_diff(answer: str | int, wrong: str | int, tokenizer=None) -> Metric:
    """logit[answer] - logit[wrong]. Tokens are ids or one-token strings (with ``tokenizer``)."""
    a, w = _token(tokenizer, answer, "answer"), _token(tokenizer, wrong, "wrong")
    if a == w:
        raise ConfigError(f"wrong: {wrong!r} is the answer token itself; give another token")
    return Metric(
        f"logit diff {_label(tokenizer, answer, a)} - {_label(tokenizer, wrong, w)}",
        lambda logits: logits[:, a] - logits[:, w],
        (a, w),
    )


def logprob(answer: str | int, tokenizer=None) -> Metric:
    """log_softmax(logits)[answer]."""
    a = _token(tokenizer, answer, "answer")
    return Metric(
        f"log prob {_label(tokenizer, answer, a)}",
        lambda logits: logits.log_softmax(-1)[:, a],
        (a,),
    )


def answer_metric(tokenizer, answer: str, wrong: str | None = None) -> Metric:
    """The metric of ``--answer`` (and ``--wrong``), one-token strings: log p(answer), or
    logit(answer) - logit(wrong) when ``wrong`` is given."""
    a = answer_token(tokenizer, answer, "--answer")
    if wrong is None:
        return logprob(a, tokenizer)
    return logit_diff(a, answer_token(tokenizer, wrong, "--wrong"), tokenizer)
