"""Splice metrics (docs/design.md §3): how much of the model's behaviour survives when
an SAE's reconstruction replaces the activation at its hook point.

    CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)
    delta LM loss     = CE_sae - CE_clean
    KL                = mean over positions of KL(p_clean || p_spliced)

CE_zero replaces the activation with zeros. Special tokens (BOS, EOS, pad) keep their
original activation in both replacements: the SAE was never trained on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.activations.capture import MaskedCapture
from sae.activations.hooks import EditActivation, HookPoint, resolve_hook
from sae.evaluation.lm_metrics import at_least_fp32, next_token_ce_sum


@torch.no_grad()
def splice_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    hook: str,
    reconstruct,
    contexts: Iterable[torch.Tensor],
    progress: bool = False,
    desc: str = "splice",
    total: int | None = None,
) -> dict:
    """Metrics for ``reconstruct`` ([n, d] -> [n, d], e.g. an SAE) spliced in at ``hook``.

    contexts: LongTensor batches [B, T]. Returns CE clean / spliced / zero-ablated (nats
    per predicted token), CE loss recovered, delta LM loss, KL and the token count.
    progress: a bar ``desc`` counting the tokens of the contexts, up to ``total`` if given
    (``contexts`` may be a stream of unknown length); gone from the screen when done.
    """
    point = resolve_hook(model, hook)
    # The clean forward runs to the end: its logits are the reference.
    capture = MaskedCapture(model, tokenizer, [hook], stop_early=False)
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl, n = 0.0, 0
    with tqdm(
        total=total, desc=desc, unit="tok", unit_scale=True, leave=False, disable=not progress
    ) as bar:
        for batch in capture.batches(contexts):
            ids, clean = batch.ids, batch.output.logits
            sae_logits, zero_logits = _spliced_logits(
                model, point, reconstruct, ids, batch.keep[..., None]
            )
            ce["clean"] += next_token_ce_sum(clean, ids)
            ce["sae"] += next_token_ce_sum(sae_logits, ids)
            ce["zero"] += next_token_ce_sum(zero_logits, ids)
            kl += _kl_sum(clean, sae_logits)
            n += ids[:, 1:].numel()
            bar.update(ids.numel())
        bar.refresh()  # the final count, whatever the refresh interval skipped
    if n == 0:
        raise ValueError("no evaluation contexts")
    return _splice_summary(ce, kl, n)


def _spliced_logits(
    model: PreTrainedModel,
    point: HookPoint,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    keep: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T, V] of ids [B, T] with the activation at ``point`` replaced by its
    reconstruction, and with it zeroed; positions where keep [B, T, 1] is False (special
    tokens) keep their activation in both."""

    def spliced(h):
        out = reconstruct(at_least_fp32(h).reshape(-1, h.shape[-1])).reshape(h.shape).to(h.dtype)
        return torch.where(keep, out, h)

    def zeroed(h):
        return torch.where(keep, torch.zeros_like(h), h)

    with EditActivation(model, point, spliced):
        sae_logits = model(input_ids=ids, use_cache=False).logits
    with EditActivation(model, point, zeroed):
        zero_logits = model(input_ids=ids, use_cache=False).logits
    return sae_logits, zero_logits


def _kl_sum(clean: torch.Tensor, spliced: torch.Tensor) -> float:
    """Sum over the predicting positions (all but the last) of KL(p_clean || p_spliced),
    from logits [B, T, V] each."""
    log_p, log_q = (at_least_fp32(t[:, :-1]).log_softmax(-1) for t in (clean, spliced))
    return (log_p.exp() * (log_p - log_q)).sum().double().item()


def _splice_summary(ce: dict[str, float], kl: float, n: int) -> dict:
    """The metrics from summed CE losses ({"clean", "sae", "zero"}: nats), summed KL and
    ``n`` predicted tokens (at least one)."""
    clean_ce, sae_ce, zero_ce = (ce[k] / n for k in ("clean", "sae", "zero"))
    gap = zero_ce - clean_ce
    return {
        "ce_clean": clean_ce,
        "ce_sae": sae_ce,
        "ce_zero": zero_ce,
        "ce_loss_recovered": (zero_ce - sae_ce) / gap if gap else float("nan"),
        "delta_lm_loss": sae_ce - clean_ce,
        "kl": kl / n,
        "tokens": n,
    }
