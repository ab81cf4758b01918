"""The shipped demo model: loads like a user model and is as good as its card says."""

import pytest
import torch

from sae.config import ModelConfig
from sae.data import corpus
from sae.evaluation.lm_metrics import next_token_loss
from sae.models import demo_model
from sae.models.loading import decoder_layers, load_model


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelConfig(name_or_path="builtin:demo-llama", device="cpu"))


def test_package_data_is_safetensors_and_json_under_10_mb():
    files = [p for p in demo_model.DEMO_MODEL_DIR.iterdir()]
    assert {p.suffix for p in files} <= {".json", ".safetensors"}, files
    assert sum(p.stat().st_size for p in files) <= 10 * 2**20


def test_loads_through_from_pretrained_as_a_llama(loaded):
    model, tokenizer = loaded
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32  # auto on CPU
    assert len(decoder_layers(model)[1]) == 4
    ids = tokenizer("def f(x): return x")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == "def f(x): return x"


def test_held_out_loss_reproduces_the_card_and_beats_unigram(loaded):
    card = demo_model.card()
    if card["corpus_test_fingerprint"] != corpus.fingerprint("test"):
        pytest.skip(f"held-out text differs from the build's (Python {card['python']})")
    model, tokenizer = loaded
    contexts = demo_model.heldout_contexts(tokenizer)
    loss, n_tokens = next_token_loss(model, contexts)
    assert n_tokens == card["heldout_tokens"]
    assert abs(loss - card["heldout_loss_nats"]) < 0.01
    # "Far below the unigram entropy": at least 1.5 nats (4.5x in perplexity) better.
    assert loss < card["heldout_unigram_entropy_nats"] - 1.5


def test_generation_with_kv_cache_equals_recomputation(loaded):
    # Steering and ablation act during generate(); the cached path must match a full recompute.
    model, tokenizer = loaded
    prompt = tokenizer("The return value of", return_tensors="pt")
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    cached = model.generate(**prompt, use_cache=True, **kw)
    recomputed = model.generate(**prompt, use_cache=False, **kw)
    assert cached.shape[1] == prompt["input_ids"].shape[1] + 12
    assert torch.equal(cached, recomputed)
