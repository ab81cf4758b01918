"""Sampling continuations, with and without an intervention, reproducibly.

    texts = continuations(model, tokenizer, ["The file"], samples=4, seed=0)
    with intervene(model, edits):
        edited = continuations(model, tokenizer, ["The file"], samples=4, seed=0)

Prompts are tokenized like the training contexts (BOS, then the text without special
tokens), or in the model's chat format (``sae.data.prompt_format``), and batched with left
padding, so every prompt's last token is where generation starts. The generator is
re-seeded per call: two calls with the same seed draw the same random numbers, so a
baseline and an intervened run differ only through the edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.data.prompt_format import PLAIN, PromptFormat, check_fits
from sae.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How continuations are drawn. temperature 0 means greedy decoding."""

    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens: {self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise ConfigError(f"--temperature: {self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p: {self.top_p} must be in (0, 1]")


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """BOS + the text's tokens (no special tokens), as the training contexts were built."""
    return PLAIN.prompt_ids(tokenizer, text)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def padded(
    rows: Sequence[Sequence[int]], pad: int, device, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], attention mask [B, T]) with every row padded to the longest, on the left
    (for generation: every prompt ends where decoding starts) or on the right (a causal
    model never looks at trailing pads, so positions stay as if unpadded)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def continuation_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    samples: int = 1,
    sampling: Sampling = Sampling(),
    batch_size: int = 8,
    progress: bool = False,
    fmt: PromptFormat = PLAIN,
) -> list[list[list[int]]]:
    """Token ids of ``samples`` continuations per prompt: [prompt][sample] -> ids (ending at
    EOS or ``max_new_tokens``; EOS not included). ``fmt``: plain or chat prompts."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=pad, eos_token_id=eos)
    if sampling.temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0
        )
    # One generator stream for the whole call: the same seed, prompts and batch size give
    # the same draws, whatever the model does to the logits.
    torch.manual_seed(sampling.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(sampling.seed)
    encoded = [fmt.prompt_ids(tokenizer, p) for p in prompts]
    for p, ids in zip(prompts, encoded):
        check_fits(ids, model, p, sampling.max_new_tokens, "new tokens (--max-new-tokens)")
    rows = [ids for ids in encoded for _ in range(samples)]
    out: list[list[int]] = []
    for start in tqdm(range(0, len(rows), batch_size), desc="generating", disable=not progress):
        ids, mask = padded(rows[start : start + batch_size], pad, device, left=True)
        gen = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[
            :, ids.shape[1] :
        ].tolist()
        for seq in gen:
            out.append(seq[: seq.index(eos)] if eos in seq else seq)
    return [out[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    samples: int = 1,
    sampling: Sampling = Sampling(),
    batch_size: int = 8,
    progress: bool = False,
    fmt: PromptFormat = PLAIN,
) -> list[list[str]]:
    """Decoded continuations: [prompt][sample] -> text."""
    ids = continuation_ids(model, tokenizer, prompts, samples, sampling, batch_size, progress, fmt)
    return [
        [tokenizer.decode(seq, skip_special_tokens=True) for seq in per_prompt]
        for per_prompt in ids
    ]
