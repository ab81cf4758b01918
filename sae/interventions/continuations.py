"""Continuations of prompts with and without an edit of SAE features, side by side: both
drawn with the same seed, so they differ only through the edit (which acts on prompt
and generated tokens alike, special tokens excepted).

    rows = compare_continuations(target, ["If the key is missing, a KeyError"], [Ablate([93])],
                                 sampling=Sampling(temperature=0))
    rows[0]["baseline"][0], rows[0]["intervened"][0]
"""

from __future__ import annotations

from collections.abc import Sequence

from sae.activations.capture import special_token_ids
from sae.analysis.target import Target
from sae.data.prompt_format import PLAIN, PromptFormat
from sae.interventions.edits import Edit, FeatureEdit, intervene
from sae.models.generation import Sampling, continuations


def compare_continuations(
    target: Target,
    prompts: Sequence[str],
    edits: Sequence[FeatureEdit],
    samples: int = 1,
    sampling: Sampling = Sampling(),
    fmt: PromptFormat = PLAIN,
    progress: bool = True,
) -> list[dict]:
    """Per prompt, {"prompt", "baseline": [samples texts], "intervened": [samples texts]}:
    continuations by ``target``'s model as it is and with ``edits`` at the SAE's hook
    (checked against the SAE before anything runs)."""
    edit = Edit(target.sae, target.hook, list(edits))
    edit.check()
    base = continuations(
        target.model, target.tokenizer, prompts, samples, sampling, progress=progress, fmt=fmt
    )
    with intervene(target.model, [edit], special_token_ids(target.tokenizer)):
        changed = continuations(
            target.model, target.tokenizer, prompts, samples, sampling, progress=progress, fmt=fmt
        )
    return [
        {"prompt": p, "baseline": b, "intervened": c} for p, b, c in zip(prompts, base, changed)
    ]
