"""Baseline and edited continuations of one prompt, produced token by token side by side,
with the KL divergence the edit makes at every edited position (docs/design.md §6).

    edit = Edit(sae, "layers.2", [Ablate([93])])
    for step in live_continuations(model, tokenizer, "The file", [edit], Sampling(seed=0)):
        step.baseline, step.edited, step.kl       # the new token ids (None once a side ended)

It exists for the explorer (``analyze.py serve``), which shows the two texts as they are
written and stops when asked: the caller simply stops iterating. Each side decodes with its
own KV cache and its own random generator seeded with ``sampling.seed``, so the two sides
draw the same random numbers and differ only through the edit; with one prompt and the
model's default generation settings, the baseline is token for token what
``sae.models.generation.continuation_ids`` (``analyze.py generate``) writes with that seed.
A third cache runs the unedited model on the edited text, so ``kl`` is
KL(p_edited || p_unedited) of the next token at each edited position, in nats.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from sae.activations.capture import special_token_ids
from sae.data.prompt_format import PLAIN, PromptFormat, check_fits
from sae.interventions.edits import Edit, intervene
from sae.models.generation import Sampling


@dataclass(frozen=True)
class LiveStep:
    """One decoding step: the token each side wrote (None when that side had already
    ended at EOS) and KL(p_edited || p_unedited) at the edited side's position (nats)."""

    baseline: int | None
    edited: int | None
    kl: float | None


def warpers(sampling: Sampling) -> LogitsProcessorList:
    """What ``model.generate`` applies to the logits for these settings (temperature, then
    top-p; top-k is off, as ``continuation_ids`` asks)."""
    out = LogitsProcessorList()
    if sampling.temperature not in (0, 1.0):
        out.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_p < 1.0:
        out.append(TopPLogitsWarper(sampling.top_p))
    return out


class _Side:
    """One decoding stream: a model state (KV cache) that reads the tokens it is given."""

    def __init__(self, model, ids: torch.Tensor):
        self.model, self.ids = model, ids  # ids: [1, T] what it has read
        # The cache fills in place. transformers 5.x renamed the argument from
        # past_key_values to cache (the old name warns until 5.40).
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cache = DynamicCache()
        self.logits = self._read(ids)

    def _read(self, new: torch.Tensor) -> torch.Tensor:
        """Read new tokens [1, n]; the next-token logits [1, V] in float32."""
        out = self.model(input_ids=new, use_cache=True, **{self.cache_arg: self.cache})
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)

    def read(self, token: int) -> None:
        new = torch.tensor([[token]], device=self.ids.device)
        self.ids = torch.cat([self.ids, new], dim=1)
        self.logits = self._read(new)


def _pick(side: _Side, sampling: Sampling, warp, gen: torch.Generator) -> int:
    scores = warp(side.ids, side.logits)
    if sampling.temperature == 0:
        return int(scores.argmax(-1))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, num_samples=1, generator=gen))


def _kl(edited_logits: torch.Tensor, plain_logits: torch.Tensor) -> float:
    """KL(p || q) of the raw next-token distributions of logits [1, V], in nats."""
    logp, logq = edited_logits.log_softmax(-1), plain_logits.log_softmax(-1)
    return float((logp.exp() * (logp - logq)).sum())


@torch.no_grad()
def live_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    edits: Sequence[Edit],
    sampling: Sampling = Sampling(),
    fmt: PromptFormat = PLAIN,
) -> Iterator[LiveStep]:
    """Up to ``sampling.max_new_tokens`` steps; each side stops at EOS, the whole at both.
    ``edits`` (SAEs at hook points, each with its feature edits) are checked, and the prompt
    against the model's context, before the model runs."""
    for e in edits:
        e.check()
    prompt_ids = fmt.prompt_ids(tokenizer, prompt)
    check_fits(prompt_ids, model, prompt, sampling.max_new_tokens, "new tokens (--max-new-tokens)")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    skip = special_token_ids(tokenizer)
    base, plain = _Side(model, ids), _Side(model, ids)
    with intervene(model, edits, skip):
        edited = _Side(model, ids)
    gens = [torch.Generator(device=device).manual_seed(sampling.seed) for _ in range(2)]
    warp, eos = warpers(sampling), tokenizer.eos_token_id
    done = [False, False]
    for _ in range(sampling.max_new_tokens):
        picks: list[int | None] = [None, None]
        kl = None
        for i, side in enumerate((base, edited)):
            if not done[i]:
                picks[i] = _pick(side, sampling, warp, gens[i])
        if not done[1]:
            kl = _kl(edited.logits, plain.logits)
        done = [d or p == eos for d, p in zip(done, picks)]
        yield LiveStep(*(None if p == eos else p for p in picks), kl)
        if all(done):
            return
        if picks[0] is not None and picks[0] != eos:
            base.read(picks[0])
        if picks[1] is not None and picks[1] != eos:
            plain.read(picks[1])
            with intervene(model, edits, skip):
                edited.read(picks[1])
