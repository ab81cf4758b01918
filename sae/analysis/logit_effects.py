"""What a feature writes: the output tokens its decoder direction promotes and suppresses,
and its nearest features by decoder cosine similarity (docs/design.md §6).

The logit effect of feature f is (W_dec[f] ⊙ g) @ W_Uᵀ: its decoder row pushed through
the model's final norm, linearised, and the unembedding W_U [V, d]. For an RMSNorm the
linearisation is the elementwise weight g (whatever the family's parametrisation: Gemma's
1 + w is found the same way, by probing the module); for a LayerNorm it is the weight
after removing the direction's mean, which LayerNorm subtracts. Both drop the positive
1/rms scale of the actual residual stream, which changes no ranking. This is the direct
path only: what the direction does through later layers is not counted.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

# Where families keep their final norm, on the base model (model.model, model.transformer, ...).
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")
# Rows of W_dec per matmul against the unembedding: bounds the [rows, vocab] buffer.
ROWS_PER_CHUNK = 1024
# Vocabulary rows of a bf16/fp16/fp64 unembedding upcast (or cast) to float32 at a time:
# bounds the float32 copy to [VOCAB_PER_CHUNK, d] instead of the whole (often tied) matrix.
VOCAB_PER_CHUNK = 8192


def final_norm(model: PreTrainedModel) -> nn.Module | None:
    base = model.base_model
    return next(
        (
            getattr(base, n)
            for n in FINAL_NORM_NAMES
            if isinstance(getattr(base, n, None), nn.Module)
        ),
        None,
    )


@torch.no_grad()
def norm_linearisation(
    model: PreTrainedModel,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """(fold, description): fold maps directions [n, d] to what the final norm passes on,
    up to a positive scale per token; description says which rule was used."""
    norm = final_norm(model)
    if norm is None:
        return (lambda v: v), "no final norm found: the unembedding alone"
    p = next(norm.parameters(), None)
    d = model.config.hidden_size
    kw = dict(device=p.device if p is not None else "cpu", dtype=torch.float32)
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(0)).to(**kw)
    ones = torch.ones(1, d, **kw)
    # A float32 copy of the (tiny) norm module: the model itself stays untouched.
    probe = copy.deepcopy(norm).float()
    with torch.autocast(kw["device"].type, enabled=False):
        g, out = probe(ones).float()[0], probe(x).float()
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    if torch.allclose(out, x / rms * g, rtol=1e-3, atol=1e-3 * g.abs().max().item()):
        return (
            lambda v: v * g.to(v)
        ), f"final norm {type(norm).__name__}: RMS-type, its gain folded in"
    w = getattr(norm, "weight", None)
    w = torch.ones(d, **kw) if w is None else w.detach().float()
    return (
        (lambda v: (v - v.mean(-1, keepdim=True)) * w.to(v)),
        f"final norm {type(norm).__name__}: LayerNorm-type, direction centred and its weight folded in",
    )


@torch.no_grad()
def direction_logits(v: torch.Tensor, W_U: torch.Tensor) -> torch.Tensor:
    """Float32 logits [n, V] of directions v [n, d] (float32, on W_U's device) against the
    unembedding W_U [V, d], whatever W_U's dtype.

    A float32 W_U is used in place. Any other dtype is cast to float32 VOCAB_PER_CHUNK rows
    at a time: computing in bf16 would round both v and the logits to 8 bits of mantissa,
    which reorders near-tied top tokens, while upcasting W_U whole would copy the (tied,
    vocab x d) embedding matrix, and a float64 model would need a float64 [n, V] buffer.
    """
    if W_U.dtype == torch.float32:
        return v @ W_U.t()
    out = torch.empty(v.shape[0], W_U.shape[0], device=v.device, dtype=torch.float32)
    for start in range(0, W_U.shape[0], VOCAB_PER_CHUNK):
        out[:, start : start + VOCAB_PER_CHUNK] = (
            v @ W_U[start : start + VOCAB_PER_CHUNK].float().t()
        )
    return out


@torch.no_grad()
def logit_effects(
    model: PreTrainedModel, W_dec: torch.Tensor, n: int = 10, progress: bool = True
) -> tuple[dict[str, torch.Tensor], str]:
    """Top promoted and suppressed output tokens of each feature.

    W_dec: [M, d] decoder rows. Returns ({"top_ids", "top_values", "bottom_ids",
    "bottom_values"}: [M, n] on the CPU, top largest first, bottom most negative first,
    values float32 whatever the model's dtype; the rule used for the final norm).
    """
    W_U = model.get_output_embeddings().weight  # [V, d]
    fold, rule = norm_linearisation(model)
    n = min(n, W_U.shape[0])
    out = {k: [] for k in ("top_ids", "top_values", "bottom_ids", "bottom_values")}
    for start in tqdm(
        range(0, W_dec.shape[0], ROWS_PER_CHUNK), desc="logit effects", disable=not progress
    ):
        v = fold(W_dec[start : start + ROWS_PER_CHUNK].to(W_U.device, torch.float32))
        logits = direction_logits(v, W_U)
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        out["top_ids"].append(top.indices.cpu())
        out["top_values"].append(top.values.cpu())
        out["bottom_ids"].append(bottom.indices.cpu())
        out["bottom_values"].append(bottom.values.cpu())
    return {k: torch.cat(v) for k, v in out.items()}, rule


@torch.no_grad()
def nearest_features(
    W_dec: torch.Tensor, n: int = 8, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Each feature's n nearest other features by cosine similarity of decoder rows.

    W_dec: [M, d]. Returns {"ids", "cosine"}: [M, n] on the CPU, most similar first.
    """
    M = W_dec.shape[0]
    n = min(n, M - 1)
    unit = nn.functional.normalize(W_dec.float(), dim=1)
    ids, cos = [], []
    for start in tqdm(range(0, M, ROWS_PER_CHUNK), desc="nearest features", disable=not progress):
        sims = unit[start : start + ROWS_PER_CHUNK] @ unit.t()  # [rows, M]
        rows = torch.arange(sims.shape[0], device=sims.device)
        sims[rows, rows + start] = -torch.inf  # not its own neighbour
        best = sims.topk(n, dim=1)
        ids.append(best.indices.cpu())
        cos.append(best.values.cpu())
    return {"ids": torch.cat(ids), "cosine": torch.cat(cos)}
