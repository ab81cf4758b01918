"""The tiny-model fixtures: every family saves, loads by path and runs."""

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sae.config import ModelConfig
from sae.models.loading import decoder_layers, load_model


def test_loads_by_path_with_the_saved_weights(tiny_model_dir):
    model, tokenizer = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"))
    saved = load_file(tiny_model_dir / "model.safetensors")
    state = model.state_dict()
    for name, tensor in saved.items():
        if name in state:
            assert torch.equal(state[name], tensor), name
        else:  # a tied weight saved under its alias (GPT-NeoX's embed_out)
            assert any(torch.equal(t, tensor) for t in state.values()), name
    assert tokenizer.pad_token is not None


def test_decoder_layers_resolve_and_forward_runs(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name, layers = decoder_layers(model)
    assert len(layers) == 3
    assert name in ("model.layers", "transformer.h", "gpt_neox.layers")
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 10, model.config.vocab_size) and torch.isfinite(logits).all()
