"""Held-out loss and unigram entropy against direct computations."""

import math

import torch
from transformers import AutoModelForCausalLM

from sae.evaluation.lm_metrics import next_token_loss, unigram_entropy


def test_unigram_entropy_of_known_distributions():
    assert abs(unigram_entropy(torch.arange(8)) - math.log(8)) < 1e-12
    assert unigram_entropy(torch.full((5, 3), 7)) == 0.0
    # p = (1/2, 1/4, 1/4): H = 1.5 bits
    assert abs(unigram_entropy(torch.tensor([0, 0, 1, 2])) - 1.5 * math.log(2)) < 1e-12


def test_next_token_loss_matches_per_position_log_probs(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    contexts = torch.randint(0, model.config.vocab_size, (5, 12), generator=g)
    with torch.no_grad():
        logp = model(input_ids=contexts).logits.log_softmax(-1)
    expected = -sum(logp[i, t, contexts[i, t + 1]].item() for i in range(5) for t in range(11)) / 55
    for batch_size in (1, 2, 5):
        loss, n = next_token_loss(model, contexts, batch_size=batch_size)
        assert n == 55
        assert abs(loss - expected) < 1e-9
