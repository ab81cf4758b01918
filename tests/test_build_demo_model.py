"""End to end: the demo-model build script, shrunk to seconds of training."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sae.evaluation.lm_metrics import next_token_loss
from sae.models.demo_model import CARD_FILE, heldout_contexts

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_build_script_writes_a_loadable_model_and_a_true_card(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "scripts/build_demo_model.py",
        "--vocab-size",
        "320",
        "--hidden",
        "64",
        "--layers",
        "1",
        "--batch",
        "4",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "demo"
    ]  # no half-built folder left behind
    card = json.loads((out / CARD_FILE).read_text())
    assert card["steps"] == 4
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 320 and model.config.num_hidden_layers == 1
    loss, n = next_token_loss(model, heldout_contexts(tokenizer))
    assert n == card["heldout_tokens"] and abs(loss - card["heldout_loss_nats"]) < 1e-3
