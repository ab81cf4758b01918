"""Bad models and bad data stop every command in one line, before any work.

Each case goes through the real CLI (``sae.cli.train``) where that is cheap: exit status 2,
exactly one ``error:`` line naming the config key and what is wrong, no traceback, and no
run folder left behind.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import make_tiny_model, tiny_config
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    LlamaForCausalLM,
    LlamaModel,
    T5Config,
    T5ForConditionalGeneration,
)

from sae import cli
from sae.config import ModelConfig
from sae.data.text import load_text_dataset
from sae.errors import ConfigError
from sae.models.demo_model import DEMO_MODEL_DIR
from sae.models.loading import is_causal, load_model

REPO = Path(__file__).resolve().parent.parent
WIDTH = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """Folders of tiny random models that are not usable causal LMs, by name."""
    root = tmp_path_factory.mktemp("bad-models")
    vocab = len(tokenizer)
    torch.manual_seed(0)
    bert = BertConfig(vocab_size=vocab, max_position_embeddings=64, **WIDTH)
    t5 = T5Config(vocab_size=vocab, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16)
    distil = DistilBertConfig(vocab_size=vocab, dim=64, hidden_dim=128, n_layers=2, n_heads=4)
    return {
        "bert-encoder": save(
            BertModel(bert), tokenizer, root / "bert-encoder"
        ),  # no LM head at all
        "bert-mlm": save(
            BertForMaskedLM(bert), tokenizer, root / "bert-mlm"
        ),  # every weight there: only causality
        "t5": save(T5ForConditionalGeneration(t5), tokenizer, root / "t5"),
        "distilbert": save(DistilBertModel(distil), tokenizer, root / "distilbert"),
        # A base model saved without its (untied) LM head: AutoModelForCausalLM makes up a random one.
        "llama-headless": save(
            LlamaModel(tiny_config("llama", vocab)), tokenizer, root / "llama-headless"
        ),
        "small-vocab": save(
            LlamaForCausalLM(tiny_config("llama", 256)), tokenizer, root / "small-vocab"
        ),
    }


def train_fails(tmp_path, *overrides):
    """Run ``train`` (as ``python train.py`` does) and return its one error line, after
    checking exit status 2, no traceback and no run folder."""
    out = tmp_path / "runs"
    args = [
        f"output.root={out}",
        "output.tensorboard=false",
        "harvest.cache_dir=null",
        "data.eval_split=null",
        *overrides,
    ]
    result = CliRunner().invoke(cli.train, [a for o in args for a in ("--set", o)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())
    return errors[0]


NOT_CAUSAL = "use a decoder-only LM such as Llama, Mistral, Qwen or GPT-2"


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "bert-encoder",
            ["loads as BertLMHeadModel, which is not a causal language model", NOT_CAUSAL],
        ),
        (
            "bert-mlm",
            ["loads as BertLMHeadModel, which is not a causal language model", NOT_CAUSAL],
        ),
        ("t5", ["encoder-decoder 't5' model (T5Config)", NOT_CAUSAL]),
        (
            "distilbert",
            [
                "'distilbert' model (DistilBertConfig), which AutoModelForCausalLM cannot load",
                NOT_CAUSAL,
            ],
        ),
        (
            "llama-headless",
            [
                "loads as LlamaForCausalLM, but 1 of its weights are not in the checkpoint",
                "lm_head.weight",
            ],
        ),
        ("small-vocab", ["tokenizer has 4,096 tokens", "embedding matrix only 256 rows"]),
    ],
)
def test_a_model_that_is_no_usable_causal_lm_is_refused(tmp_path, models, name, expected):
    line = train_fails(tmp_path, f"model.name_or_path={models[name]}")
    assert line.startswith(f"error: model.name_or_path: '{models[name]}'")
    for part in expected:
        assert part in line, line


def test_analyze_refuses_the_same_models(models):
    """load_model serves every command: analyze stops in the same one line."""
    result = CliRunner().invoke(
        cli.analyze, ["layers", "--set", f"model.name_or_path={models['bert-mlm']}"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and "loads as BertLMHeadModel, which is not a causal language model" in errors[0]
    )
    assert "hook points" not in result.output


def test_folders_that_are_no_model_folder_say_what_is_missing(tmp_path, tiny_llama_dir):
    folders = {name: tmp_path / name for name in ("empty", "config-only", "no-tokenizer")}
    for folder in folders.values():
        folder.mkdir()
    (folders["config-only"] / "config.json").write_text(
        (tiny_llama_dir / "config.json").read_text()
    )
    for name in ("config.json", "model.safetensors"):
        (folders["no-tokenizer"] / name).write_bytes((tiny_llama_dir / name).read_bytes())
    expected = {
        "empty": "the folder is empty",
        "config-only": "the folder has a config.json but no model weights",
        "no-tokenizer": "the folder has no tokenizer files",
    }
    for name, folder in folders.items():
        line = train_fails(tmp_path, f"model.name_or_path={folder}")
        assert line.startswith(
            f"error: model.name_or_path: cannot load '{folder}': {expected[name]}"
        ), line
        assert "config.json" in line and "tokenizer.json" in line, (
            line
        )  # says what a model folder holds
    line = train_fails(tmp_path, f"model.name_or_path={tmp_path / 'missing'}")
    assert (
        line
        == f"error: model.name_or_path: '{tmp_path / 'missing'}' is not a folder (nor a hub id like org/name)"
    )


def test_the_real_command_prints_only_the_error_not_the_load_report(tmp_path, models):
    """transformers' load report (a table of MISSING and UNEXPECTED weights) and its warnings
    would bury the line; they are held back for a refused model."""
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--set",
            f"model.name_or_path={models['bert-encoder']}",
            "--set",
            f"output.root={tmp_path / 'runs'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and "Loading weights" not in line
    ]
    assert len(lines) == 1 and lines[0].startswith("error: model.name_or_path:"), result.stderr
    assert "MISSING" not in result.stderr and "Traceback" not in result.stderr


def test_tied_and_padded_models_load_in_both_dtypes(tmp_path, tokenizer):
    """A tied lm_head, absent from the checkpoint, is not a missing weight; more embedding
    rows than tokens is padding, as in most released models."""
    for name, extra_rows in [("tied", 0), ("padded", 64)]:
        config = tiny_config("llama", len(tokenizer) + extra_rows)
        config.tie_word_embeddings = name == "tied"
        path = save(LlamaForCausalLM(config), tokenizer, tmp_path / name)
        for dtype in ("float32", "bfloat16"):
            model, _ = load_model(ModelConfig(name_or_path=str(path), device="cpu", dtype=dtype))
            assert next(model.parameters()).dtype == getattr(torch, dtype)
            assert model.get_input_embeddings().num_embeddings == len(tokenizer) + extra_rows
            assert (model.lm_head.weight is model.model.embed_tokens.weight) == (name == "tied")


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    return make_tiny_model("gpt2", tmp_path_factory.mktemp("gpt2"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_causality_probe_tells_decoders_from_encoders(
    tiny_llama_dir, tiny_gpt2_dir, models, dtype
):
    """Decoders of two families and the shipped demo pass in full and half precision; a BERT
    whose every weight loaded (so only causality is wrong) fails."""
    for path, causal in [
        (tiny_llama_dir, True),
        (tiny_gpt2_dir, True),
        (DEMO_MODEL_DIR, True),
        (models["bert-mlm"], False),
    ]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        assert is_causal(model, model.config.vocab_size) is causal, (path, dtype)


def test_the_demo_model_loads_in_bfloat16():
    model, tokenizer = load_model(
        ModelConfig(name_or_path="builtin:demo-llama", device="cpu", dtype="bfloat16")
    )
    assert type(model).__name__ == "LlamaForCausalLM" and len(tokenizer) <= model.config.vocab_size


def jsonl(path: Path, texts, bad_line: int | None = None) -> Path:
    lines = [json.dumps({"text": t}) for t in texts]
    if bad_line is not None:
        lines[bad_line - 1] = '{"text": "a quote that never ends}'
    path.write_text("\n".join(lines) + "\n")
    return path


PROSE = [f"Document {i} says something about sparse autoencoders and language." for i in range(60)]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path, streaming):
    data = jsonl(tmp_path / "corpus.jsonl", PROSE, bad_line=23)
    line = train_fails(
        tmp_path,
        f"data.dataset={data}",
        f"data.streaming={str(streaming).lower()}",
        "data.token_budget=4096",
    )
    assert line.startswith(
        f"error: data.dataset: cannot read '{data}': line 23 is not valid JSON"
    ), line


def test_malformed_json_in_a_folder_or_a_whole_json_file_is_located(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    jsonl(folder / "a.jsonl", PROSE)
    jsonl(folder / "b.jsonl", PROSE, bad_line=7)
    bad_line = r"^data.dataset: cannot read '.*folder': line 7 of b.jsonl is not valid JSON"
    with pytest.raises(ConfigError, match=bad_line):
        load_text_dataset(str(folder))
    whole = tmp_path / "whole.json"
    whole.write_text(
        '[\n  {"text": "one"},\n  {"text": "two"}\n  {"text": "three"}\n]\n'
    )  # a comma missing
    with pytest.raises(
        ConfigError, match=r"^data.dataset: cannot read '.*whole.json': line 4 is not valid JSON"
    ):
        load_text_dataset(str(whole))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_data_of_only_whitespace_says_it_holds_no_text(tmp_path, suffix):
    blanks = ["   ", "\t", " \t ", ""] * 100
    data = tmp_path / f"blank{suffix}"
    if suffix == ".txt":
        data.write_text("\n".join(blanks) + "\n")
    else:
        jsonl(data, blanks)
    line = train_fails(tmp_path, f"data.dataset={data}", "data.token_budget=4096")
    assert line.startswith(
        f"error: data.dataset: {data} (split 'train', column 'text') holds no text"
    ), line
    assert "token_budget" not in line
