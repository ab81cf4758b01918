"""Tiny random causal LMs of several families, saved locally, for tests.

Each is written with ``save_pretrained`` (safetensors + config.json) next to a copy of the
demo tokenizer, so tests load it by path exactly as a user's model is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    FalconConfig,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from sae.models.demo_model import DEMO_MODEL_DIR

FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "gpt2", "gpt_neox", "falcon")


def tiny_config(
    family: str, vocab_size: int, n_layers: int = 3, width: int = 64
) -> PretrainedConfig:
    """A config of ``family`` with ``n_layers`` decoder layers of ``width`` (4 heads of width/4)."""
    heads, ffn = 4, 2 * width
    common = dict(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=ffn,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        max_position_embeddings=512,
    )
    if family == "llama":
        return LlamaConfig(**common, num_key_value_heads=2)
    if family == "mistral":
        return MistralConfig(**common, num_key_value_heads=2, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=2)
    if family == "gemma2":
        return Gemma2Config(
            **common,
            num_key_value_heads=2,
            head_dim=width // heads,
            sliding_window=64,
            query_pre_attn_scalar=width // heads,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=width, n_layer=n_layers, n_head=heads, n_positions=512
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(**common)
    if (
        family == "falcon"
    ):  # parallel attention: adds the attention output into the MLP output in place
        return FalconConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            parallel_attn=True,
            new_decoder_architecture=False,
            max_position_embeddings=512,
        )
    raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")


def make_tiny_model(
    family: str, path: Path, n_layers: int = 3, width: int = 64, seed: int = 0
) -> Path:
    """Write a randomly initialised model of ``family`` and the demo tokenizer to ``path``.

    The embedding rows match the tokenizer as it loads from ``path``: a family's own
    tokenizer class (picked by its model type) may add special tokens, e.g. Qwen2's
    ``<|endoftext|>``, and ids past the embeddings are refused at load."""
    config = tiny_config(family, 1, n_layers, width)
    config.save_pretrained(path)
    AutoTokenizer.from_pretrained(DEMO_MODEL_DIR).save_pretrained(path)
    config.vocab_size = len(AutoTokenizer.from_pretrained(path))
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return Path(path)


def identity_sae(d: int):
    """A ReLU SAE with 2d latents, W_enc = W_dec = [I; -I], zero biases: relu(x) - relu(-x) = x
    exactly, in float arithmetic too (every sum has one nonzero term). Splicing it in must
    leave a model's outputs unchanged."""
    import torch

    from sae.architectures import ReLUConfig, ReLUSAE

    sae = ReLUSAE(ReLUConfig(num_latents=2 * d), d)
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
    return sae
