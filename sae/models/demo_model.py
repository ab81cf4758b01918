"""The demo model shipped with the package: where it lives and how it is scored.

``sae/models/demo_model/`` is an ordinary Hugging Face model folder (a 4-layer Llama trained on
``builtin:python-docs`` by ``scripts/build_demo_model.py``), loaded with
``from_pretrained`` like any user model. ``card.json`` in it records the held-out loss the
build measured, next to the unigram entropy of the same held-out tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

NAME = "builtin:demo-llama"
DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"
CARD_FILE = "card.json"
EVAL_CONTEXT_LEN = 256


def card() -> dict:
    """What the build recorded: held-out loss, unigram entropy, tokens, versions."""
    return json.loads((DEMO_MODEL_DIR / CARD_FILE).read_text())


def heldout_contexts(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The held-out split of the corpus, packed: LongTensor [n, EVAL_CONTEXT_LEN]."""
    from sae.data import corpus  # here: loading any model reads this module's paths, not the data
    from sae.data.text import pack

    texts = list(corpus.load("test")["text"])
    docs = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return pack(docs, EVAL_CONTEXT_LEN, tokenizer.bos_token_id, tokenizer.eos_token_id)
