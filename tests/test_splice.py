"""Splice metrics and activation editing."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sae.activations.hooks import EditActivation, resolve_hook
from sae.evaluation.splice import splice_metrics


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    return (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval(),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )


def contexts(tok, n=3):
    ids = torch.randint(3, 200, (n, 2, 10), generator=torch.Generator().manual_seed(0))
    ids[:, :, 0] = tok.bos_token_id
    return list(ids)


@pytest.mark.parametrize("hook", ["layers.1", "layers.1.resid_pre", "layers.1.attn"])
def test_identity_splice_changes_nothing_and_zero_splice_recovers_nothing(model_tok, hook):
    model, tok = model_tok
    perfect = splice_metrics(model, tok, hook, lambda x: x, contexts(tok))
    assert perfect["ce_sae"] == pytest.approx(perfect["ce_clean"], abs=1e-9)
    assert perfect["kl"] == pytest.approx(0, abs=1e-9) and perfect[
        "delta_lm_loss"
    ] == pytest.approx(0, abs=1e-9)
    assert perfect["ce_loss_recovered"] == pytest.approx(1.0)
    useless = splice_metrics(model, tok, hook, torch.zeros_like, contexts(tok))
    assert useless["ce_sae"] == pytest.approx(useless["ce_zero"], abs=1e-9)
    assert useless["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9) and useless["kl"] > 0
    assert useless["tokens"] == 3 * 2 * 9


def test_edit_changes_downstream_only_while_active_and_keeps_output_types(model_tok):
    model, _ = model_tok
    ids = torch.randint(3, 200, (1, 8))
    point = resolve_hook(model, "layers.0.attn")  # attention modules return tuples
    clean = model(input_ids=ids).logits
    with EditActivation(model, point, lambda h: 2 * h):
        edited = model(input_ids=ids).logits
    assert not torch.allclose(edited, clean)
    torch.testing.assert_close(model(input_ids=ids).logits, clean)  # removed on exit
