"""Logit effects against the model's own final norm and unembedding; nearest features by brute force."""

import torch

from sae.analysis.logit_effects import final_norm, logit_effects, nearest_features
from sae.config import ModelConfig
from sae.models.loading import load_model


def test_logit_effects_rank_tokens_as_the_model_does(tiny_model_dir):
    """For a direction v alone in the residual stream, the model's logits are
    lm_head(norm(v)) - lm_head(norm(0)) up to a positive scale: the same ranking."""
    model, _ = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"))
    torch.manual_seed(0)
    W = torch.randn(6, model.config.hidden_size)
    effects, rule = logit_effects(model, W, n=5, progress=False)
    norm, head = final_norm(model), model.get_output_embeddings()
    assert norm is not None, rule
    with torch.no_grad():
        reference = head(norm(W)) - head(norm(torch.zeros_like(W)))
    assert torch.equal(effects["top_ids"], reference.topk(5, dim=1).indices)
    assert torch.equal(effects["bottom_ids"], reference.topk(5, dim=1, largest=False).indices)
    # Same up to one positive factor per direction.
    ratio = reference.gather(1, effects["top_ids"]) / effects["top_values"]
    assert (ratio > 0).all()
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-3, atol=1e-4)


def test_nearest_features_by_brute_force():
    torch.manual_seed(0)
    W = torch.randn(50, 8)
    near = nearest_features(W, n=3, progress=False)
    unit = W / W.norm(dim=1, keepdim=True)
    cos = unit @ unit.t()
    cos.fill_diagonal_(-2)
    best = cos.topk(3, dim=1)
    assert torch.equal(near["ids"], best.indices)
    torch.testing.assert_close(near["cosine"], best.values)
    assert not (near["ids"] == torch.arange(50)[:, None]).any()
