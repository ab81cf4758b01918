"""Attribution: which SAE features drive a metric, by activation x gradient.

    result = attribute(model, tokenizer, sae, "layers.2", prompts, logprob(" raised", tokenizer))
    result.ranking()[:10]     # features that raise the metric most

The SAE is spliced in as h = decode(z) + e, with the error term e = h - decode(z)
computed from the same activation, so the forward pass is the model's own (up to float
rounding). The first-order effect of removing feature f at a position, on metric m, is
-z_f * dm/dz_f; its attribution is z_f * dm/dz_f, summed over positions and prompts (a
positive attribution means the feature pushes the metric up, and ablating it should
lower the metric). The error term gets the same treatment, e . dm/de, so the share of
the metric that the SAE does not explain is visible.

Special-token positions (the context's start token, a chat template's turn markers) keep
the model's own activation and get no attribution: the SAE never saw them in training
(``harvest.exclude_special_tokens``), and the first position's activation is typically
huge (an attention sink), so features read there are noise that would swamp the ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae.activations.capture import special_token_ids
from sae.activations.hooks import attach, resolve_hook
from sae.analysis.target import TOP_TOKENS_SCAN, Target, listed_top_tokens, with_top_tokens
from sae.architectures import SparseAutoencoder
from sae.data.prompt_format import PLAIN, PromptFormat, check_fits
from sae.errors import ConfigError
from sae.evaluation.lm_metrics import Metric, answer_metric, at_least_fp32


@dataclass
class Attribution:
    """features [M]: summed z * dm/dz; error: summed e . dm/de; metric: the summed metric;
    per_prompt [P, M]; prompts: how many."""

    features: torch.Tensor
    error: float
    metric: float
    per_prompt: torch.Tensor
    prompts: int

    def ranking(self, direction: str = "up") -> list[int]:
        """Feature ids, those pushing the metric up (``"up"``) or down (``"down"``) most first."""
        if direction not in ("up", "down"):
            raise ConfigError(f"direction: {direction!r} is not valid; use up or down")
        return self.features.argsort(descending=direction == "up").tolist()


def attribute(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sae: SparseAutoencoder,
    hook: str,
    prompts: Sequence[str],
    metric: Metric,
    progress: bool = True,
    fmt: PromptFormat = PLAIN,
) -> Attribution:
    """Activation x gradient attribution of ``metric`` to every feature (module docstring).
    ``fmt``: plain prompts, or chat prompts (the metric is then on the reply's first token)."""
    if not prompts:
        raise ConfigError("attribution: no prompts given")
    point = resolve_hook(model, hook)
    device = next(model.parameters()).device
    M = sae.cfg.num_latents
    per_prompt = torch.zeros(len(prompts), M, dtype=torch.float64)
    error_total, metric_total = 0.0, 0.0
    leaves: dict[str, torch.Tensor] = {}
    special = special_token_ids(tokenizer).to(device)

    def splice(h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1]).to(sae.W_dec.dtype)
        with torch.no_grad():
            z = sae.encode(x)
            err = x - sae.decode(z)
        z.requires_grad_(True)
        err.requires_grad_(True)
        leaves["z"], leaves["err"] = z, err
        spliced = torch.where(
            leaves["special"], x, sae.decode(z) + err
        )  # special rows: no path to z, err
        return spliced.to(h.dtype).view(h.shape)

    for i, p in enumerate(tqdm(prompts, desc="attribution", disable=not progress)):
        row = fmt.prompt_ids(tokenizer, p)
        check_fits(row, model, p)
        ids = torch.tensor([row], device=device)
        leaves["special"] = torch.isin(ids, special).reshape(-1, 1)  # [T, 1]
        handle = attach(point, splice)
        try:
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits[:, -1]
                m = metric.fn(at_least_fp32(logits))[
                    0
                ]  # the tensor, not metric()'s float: it is differentiated
                gz, ge = torch.autograd.grad(m, [leaves["z"], leaves["err"]])
        finally:
            handle.remove()
        per_prompt[i] = (leaves["z"].detach() * gz).sum(0).double().cpu()
        error_total += float((leaves["err"].detach() * ge).sum())
        metric_total += float(m.detach())
    return Attribution(
        features=per_prompt.sum(0),
        error=error_total,
        metric=metric_total,
        per_prompt=per_prompt,
        prompts=len(prompts),
    )


def attribution_listing(
    target: Target,
    prompts: Sequence[str],
    answer: str | None,
    wrong: str | None = None,
    top: int = 20,
    fmt: PromptFormat = PLAIN,
    top_tokens: int | None = TOP_TOKENS_SCAN,
    log: Callable[[str], None] = print,
) -> dict:
    """``attribute`` the metric of ``answer`` (and ``wrong``; ``answer_metric``) at the end
    of each prompt to ``target``'s features, as {"prompts", "metric_mean", "error_term",
    "features_total", "pushes_up", "pushes_down"}: the last two list the ``top`` features
    pushing the metric each way, as {"feature", "attribution", "top_tokens"} (no
    "top_tokens" when ``top_tokens`` is None; ``listed_top_tokens``)."""
    if answer is None:
        raise ConfigError(
            "--answer: required; the token whose probability the features are ranked by"
        )
    result = attribute(
        target.model,
        target.tokenizer,
        target.sae,
        target.hook,
        prompts,
        answer_metric(target.tokenizer, answer, wrong),
        fmt=fmt,
    )
    ranked = {d: result.ranking(d)[:top] for d in ("up", "down")}
    tokens = listed_top_tokens(target, ranked["up"] + ranked["down"], top_tokens, log)
    return {
        "prompts": result.prompts,
        "metric_mean": result.metric / result.prompts,
        "error_term": result.error,
        "features_total": float(result.features.sum()),
        **{
            f"pushes_{d}": [
                with_top_tokens({"feature": f, "attribution": float(result.features[f])}, tokens)
                for f in ranked[d]
            ]
            for d in ranked
        },
    }
