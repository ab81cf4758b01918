"""The masked capture: batches of token contexts in, each batch's hook activations out
with the positions that count.

    capture = MaskedCapture(model, tokenizer, ["layers.2"])
    for batch in capture.batches(contexts):
        batch.acts["layers.2"]     # [B, T, d], every position
        batch.keep                 # bool [B, T]: the positions that count
        batch.kept()["layers.2"]   # [n_kept, d]

Every reader of activations (the training harvest, feature statistics, feature search, the
splice metrics) runs the model this way, so they agree on which positions count: never
special tokens (BOS, EOS, pad, chat markers; docs/design.md §1), never positions an
attention mask leaves out, and, with ``max_norm_ratio``, never norm outliers (attention
sinks). What each reader does with the kept positions is its own business.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.activations.hooks import ActivationCapture, resolve_hooks
from sae.errors import ConfigError

# A batch of contexts: token ids [B, T], or (token ids, attention mask), both [B, T].
ContextBatch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def max_context_tokens(model: PreTrainedModel) -> int | None:
    """The longest context the model's position scheme allows (None if unbounded)."""
    return getattr(model.config, "max_position_embeddings", None)


def check_context_length(model: PreTrainedModel, context_tokens: int) -> None:
    limit = max_context_tokens(model)
    if limit is not None and context_tokens > limit:
        raise ConfigError(
            f"data.context_tokens: {context_tokens} is longer than this model allows; "
            f"use at most {limit}"
        )


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """LongTensor of the tokenizer's special ids (BOS, EOS, pad, ...): never harvested or spliced."""
    return torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)


@dataclass
class CapturedBatch:
    """One batch of contexts after the forward pass, everything on the model's device.

    ids: LongTensor [B, T]; acts: {hook name: [B, T, d]} in the model's dtype, at every
    position; keep: bool [B, T], the positions that count; output: the model's output
    (``.logits`` [B, T, V], ...) when the forward ran to the end, else None.
    """

    ids: torch.Tensor
    acts: dict[str, torch.Tensor]
    keep: torch.Tensor
    output: Any = None

    def kept(self) -> dict[str, torch.Tensor]:
        """{hook name: [n_kept, d]}: the kept positions' rows, context by context, in order."""
        return {name: a[self.keep] for name, a in self.acts.items()}


class MaskedCapture:
    """Runs ``model`` on batches of contexts and captures ``hooks`` (names checked now).

    exclude_special_tokens: special tokens never count. max_norm_ratio: neither does a
    token whose activation norm is not finite or exceeds this multiple of the batch median,
    at any hook. stop_early: the forward stops after the deepest hook (``batch.output`` is
    then None); False runs the whole model, for a caller that needs its logits.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        hooks: list[str],
        *,
        exclude_special_tokens: bool = True,
        max_norm_ratio: float | None = None,
        stop_early: bool = True,
    ):
        self.model, self.max_norm_ratio = model, max_norm_ratio
        self.capture = ActivationCapture(model, resolve_hooks(model, hooks), stop_early=stop_early)
        self.excluded = (
            special_token_ids(tokenizer)
            if exclude_special_tokens
            else torch.empty(0, dtype=torch.long)
        )
        self.device = next(model.parameters()).device

    def keep_mask(
        self,
        ids: torch.Tensor,
        acts: dict[str, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bool [B, T]: tokens to keep: not special, attended (where ``attention_mask`` [B, T]
        is given), and, with ``max_norm_ratio``, finite and not a norm outlier at any hook
        (acts: {hook: [B, T, d]}). Each hook's median is taken over the tokens kept so far,
        independently of the other hooks (so hook order does not matter); a token dropped
        at one hook is dropped at all, so the hooks' rows stay aligned."""
        keep = ~torch.isin(ids, self.excluded.to(ids.device))
        if attention_mask is not None:
            keep &= attention_mask.bool()
        if self.max_norm_ratio is not None and keep.any():
            candidates = keep.clone()
            for a in acts.values():
                norms = a.float().norm(dim=-1)
                median = norms[candidates].nanmedian()
                keep &= torch.isfinite(norms) & (norms <= self.max_norm_ratio * median)
        return keep

    def batches(self, contexts: Iterable[ContextBatch]) -> Iterator[CapturedBatch]:
        """One CapturedBatch per item of ``contexts`` (ids [B, T], or (ids, attention mask)),
        also for a batch that keeps no position: a caller may count or score every one."""
        for item in contexts:
            ids, mask = item if isinstance(item, tuple) else (item, None)
            ids = ids.to(self.device, non_blocking=True)
            mask = None if mask is None else mask.to(self.device)
            check_context_length(self.model, ids.shape[1])
            inputs = (
                {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
            )
            acts, output = self.capture.run_with_output(**inputs)
            for name, a in acts.items():
                if a.shape[:2] != ids.shape:
                    raise ConfigError(
                        f"hooks: {name!r} gives activations of shape {tuple(a.shape)}, not "
                        f"[batch, tokens, width] = {tuple(ids.shape)} + [width]; hook another module"
                    )
            yield CapturedBatch(ids, acts, self.keep_mask(ids, acts, mask), output)
