"""Language-model losses measured the same way everywhere (demo model card, splice metrics)."""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 up to fp32 for losses; fp32 and fp64 kept as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def next_token_ce_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed cross-entropy in nats of predicting ids[:, 1:] from logits[:, :-1] ([B, T, V], [B, T])."""
    return F.cross_entropy(at_least_fp32(logits[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(),
                           reduction="sum").double().item()


@torch.no_grad()
def next_token_loss(model: torch.nn.Module, contexts: torch.Tensor, batch_size: int = 16,
                    progress: bool = False) -> tuple[float, int]:
    """Mean next-token cross-entropy in nats over every predicted position.

    contexts: LongTensor [n, T]; position t predicts token t+1, so each context yields
    T - 1 predictions. Returns (mean loss in nats, number of predicted tokens). The sum is
    accumulated in float64 so the result does not depend on batch size.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(contexts), batch_size), desc="eval", disable=not progress):
        batch = contexts[start:start + batch_size].to(device)
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
