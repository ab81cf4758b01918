"""The analysis tools on a tiny random model shaped like SmolLM2-135M-Instruct: a
LlamaForCausalLM with grouped-query attention (9 query heads over 3 KV heads), tied input
and output embeddings and the 49,152-token vocabulary. Every check compares against a
reference computed here by hand, with plain torch hooks rather than ``sae.activations.hooks``."""

import copy

import pytest
import torch
from tiny_models import identity_sae
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sae.activations.hooks import resolve_hook, resolve_hooks
from sae.analysis.logit_effects import logit_effects
from sae.errors import ConfigError
from sae.evaluation.lm_metrics import Metric, logit_diff
from sae.evaluation.splice import splice_metrics
from sae.interventions.patching import ActivationPatcher, Patch, parse_layers
from sae.models.demo_model import DEMO_MODEL_DIR

HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB, WIDTH = 9, 3, 8, 4, 49152, 72
CLEAN = "If the key is missing, a KeyError is"
CORRUPTED = "If the key is missing, the default is"  # same token count (10 with BOS)
# Answer ids beyond the demo tokenizer's 4096: the metric must read the model's 49k logits.
ANSWER, WRONG = 40000, VOCAB - 1


def smol_config(n_layers: int = LAYERS) -> LlamaConfig:
    """SmolLM2-135M's shape family, shrunk: GQA 9/3, head_dim 8, tied embeddings, 49k vocab."""
    return LlamaConfig(
        hidden_size=WIDTH,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        intermediate_size=96,
        num_hidden_layers=n_layers,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
        max_position_embeddings=256,
    )


@pytest.fixture(scope="module")
def smol():
    """(model, tokenizer): the tiny random GQA/tied Llama (seed 0, fp32, eval) and the demo
    tokenizer (its ids all fall inside the model's vocabulary). The final norm's gain is
    randomised so that logit effects depend on it."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(smol_config()).eval()
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.rand(WIDTH) * 1.5 + 0.25)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def o_proj(model, layer: int):
    return model.model.layers[layer].self_attn.o_proj


@torch.no_grad()
def run_recording(
    model, ids: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o_proj input [B, T, HEADS, HEAD_DIM], o_proj output [B, T, d], last-position logits
    [B, V]) of ``layer`` in one plain forward."""
    seen = {}
    handle = o_proj(model, layer).register_forward_hook(
        lambda _m, args, out: seen.update(x=args[0].detach().clone(), y=out.detach().clone())
    )
    try:
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
    finally:
        handle.remove()
    B, T, _ = seen["x"].shape
    return seen["x"].view(B, T, HEADS, HEAD_DIM), seen["y"], logits


@pytest.fixture(scope="module")
def patcher(smol):
    model, tok = smol
    return ActivationPatcher(model, tok, CLEAN, CORRUPTED, logit_diff(ANSWER, WRONG))


def ids_of(patcher, which: str) -> torch.Tensor:
    return torch.tensor([patcher.clean_ids if which == "clean" else patcher.corrupted_ids])


# ---- 1. activation patching: head mode and position mode ------------------------------------


@torch.no_grad()
def test_head_sweep_has_one_cell_per_query_head_matching_a_hand_patch(smol, patcher):
    model, _ = smol
    result = patcher.sweep("head")
    assert result.columns == [f"head {h}" for h in range(HEADS)]  # 9 query heads, not 3 KV heads
    assert result.values.shape == (LAYERS, HEADS)
    corrupted = ids_of(patcher, "corrupted")
    for layer in range(LAYERS):
        clean_heads = run_recording(model, ids_of(patcher, "clean"), layer)[0]
        for h in range(HEADS):

            def swap(_m, args, h=h, clean_heads=clean_heads):
                x = args[0].clone()
                x.view(*x.shape[:2], HEADS, HEAD_DIM)[:, :, h] = clean_heads[:, :, h]
                return (x,)

            handle = o_proj(model, layer).register_forward_pre_hook(swap)
            try:
                logits = model(input_ids=corrupted, use_cache=False).logits[:, -1]
            finally:
                handle.remove()
            reference = float(logits[0, ANSWER] - logits[0, WRONG])
            assert result.values[layer, h].item() == pytest.approx(reference, abs=1e-5), (layer, h)


@pytest.mark.parametrize("layer", range(LAYERS))
def test_all_heads_together_give_the_clean_attention_output(smol, patcher, layer):
    model, _ = smol
    clean_x, clean_y, _ = run_recording(model, ids_of(patcher, "clean"), layer)
    corrupted_x, corrupted_y, _ = run_recording(model, ids_of(patcher, "corrupted"), layer)
    assert not torch.allclose(clean_y, corrupted_y)
    seen = {}
    handle = o_proj(model, layer).register_forward_hook(  # sees the input after the patch
        lambda _m, args, out: seen.update(x=args[0].detach().clone(), y=out.detach().clone())
    )
    try:
        patcher.metrics([[Patch(layer, head=h) for h in range(HEADS)]])
    finally:
        handle.remove()
    torch.testing.assert_close(seen["x"].view_as(clean_x), clean_x, rtol=0, atol=0)
    torch.testing.assert_close(seen["y"], clean_y, rtol=1e-6, atol=1e-6)


def test_one_head_changes_only_its_slice_of_the_o_proj_input(smol, patcher):
    model, _ = smol
    layer = 1
    clean_x = run_recording(model, ids_of(patcher, "clean"), layer)[0]
    corrupted_x = run_recording(model, ids_of(patcher, "corrupted"), layer)[0]
    seen = {}
    handle = o_proj(model, layer).register_forward_hook(
        lambda _m, args, out: seen.update(x=args[0].detach().clone())
    )
    try:  # one batch: row h patches head h alone
        patcher.metrics([[Patch(layer, head=h)] for h in range(HEADS)], batch_size=HEADS)
    finally:
        handle.remove()
    patched = seen["x"].view(HEADS, -1, HEADS, HEAD_DIM)
    for h in range(HEADS):
        expected = corrupted_x[0].clone()
        expected[:, h] = clean_x[0, :, h]
        torch.testing.assert_close(patched[h], expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(patched[h, :, h], corrupted_x[0, :, h])  # the slice did change


def test_patching_the_last_layer_everywhere_reproduces_the_clean_logits(smol, patcher):
    model, tok = smol
    seen = []

    def capture(logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits.detach().clone())
        return logits[:, ANSWER] - logits[:, WRONG]

    capturing = ActivationPatcher(
        model, tok, CLEAN, CORRUPTED, Metric("capture", capture, (ANSWER, WRONG))
    )
    T, last = capturing.n_tokens, LAYERS - 1
    clean_logits = run_recording(model, ids_of(patcher, "clean"), 0)[2]
    corrupted_logits = run_recording(model, ids_of(patcher, "corrupted"), 0)[2]
    capturing.metrics([[Patch(last, position=t) for t in range(T)]])
    torch.testing.assert_close(seen[-1], clean_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(clean_logits, corrupted_logits, rtol=1e-5, atol=1e-5)
    # One position at a time: only the metric position's own residual stream matters there.
    result = patcher.sweep("position", layers=[last])
    assert result.values.shape == (1, T)
    assert result.values[0, -1].item() == pytest.approx(patcher.clean_metric, abs=1e-5)
    torch.testing.assert_close(
        result.values[0, :-1],
        torch.full((T - 1,), patcher.corrupted_metric, dtype=torch.float64),
        rtol=0,
        atol=1e-5,
    )


# ---- 2. logit effects with tied embeddings and a 49k vocabulary -----------------------------


class BigTensors(TorchDispatchMode):
    """Records every op output of at least ``numel`` elements that does not share the
    storage of ``keep`` (a copy of the unembedding), and every float64 one of at least
    ``numel64`` elements."""

    def __init__(self, keep: torch.Tensor, numel: int, numel64: int):
        super().__init__()
        self.keep, self.numel, self.numel64 = keep.untyped_storage().data_ptr(), numel, numel64
        self.copies, self.float64 = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if t.numel() >= self.numel and t.untyped_storage().data_ptr() != self.keep:
                    self.copies.append((str(func), tuple(t.shape), t.dtype))
                if t.dtype == torch.float64 and t.numel() >= self.numel64:
                    self.float64.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_effects_match_the_tied_unembedding_without_copying_it(smol, dtype):
    model = smol[0] if dtype == torch.float32 else copy.deepcopy(smol[0]).to(dtype)
    E = model.model.embed_tokens.weight
    assert model.lm_head.weight is E and E.shape == (VOCAB, WIDTH)
    W = torch.randn(6, WIDTH, generator=torch.Generator().manual_seed(1))
    with BigTensors(E, numel=E.numel(), numel64=VOCAB) as watch:
        effects, rule = logit_effects(model, W, n=10, progress=False)
    assert watch.copies == [] and watch.float64 == []
    assert "RMS" in rule
    assert (
        model.lm_head.weight is model.model.embed_tokens.weight and E.dtype == dtype
    )  # still tied
    # The documented rule: (W_dec ⊙ g) @ W_Uᵀ with g the final RMSNorm's gain, W_U the tied embedding.
    reference = (W.double() * model.model.norm.weight.double()) @ E.double().t()
    assert torch.equal(effects["top_ids"], reference.topk(10, dim=1).indices)
    assert torch.equal(effects["bottom_ids"], reference.topk(10, dim=1, largest=False).indices)
    # Same values up to the norm's eps, which scales every logit alike.
    torch.testing.assert_close(
        effects["top_values"].double(), reference.topk(10, dim=1).values, rtol=1e-5, atol=1e-6
    )
    assert effects["top_values"].dtype == torch.float32


# ---- 3. hook validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["layers.4", "layers.4.mlp", "layers.4.resid_pre", "layers.4.self_attn.o_proj"]
)
def test_a_hook_past_the_last_layer_names_itself_and_the_valid_range(smol, name):
    with pytest.raises(ConfigError) as e:
        resolve_hook(smol[0], name)
    message = str(e.value)
    assert repr(name) in message and "0..3" in message and "\n" not in message
    with pytest.raises(ConfigError, match="0..3"):
        resolve_hooks(smol[0], ["layers.1", name])
    assert resolve_hook(smol[0], "layers.3").layer == 3


def test_layer_30_of_a_30_layer_model_is_out_of_range():
    with torch.device("meta"):  # only the module tree is needed: no weights allocated
        model = LlamaForCausalLM(smol_config(n_layers=30))
    with pytest.raises(
        ConfigError, match=r"'layers\.30' is out of range; this model has layers 0\.\.29$"
    ):
        resolve_hook(model, "layers.30")
    assert resolve_hook(model, "layers.29.mlp").layer == 29


def test_patching_rejects_layers_past_the_last(patcher):
    with pytest.raises(ConfigError, match=r"layer 4 is out of range; this model has layers 0\.\.3"):
        parse_layers("2-4", LAYERS)
    with pytest.raises(ConfigError, match=r"layer 4 is out of range"):
        patcher.metrics([[Patch(4)]])
    with pytest.raises(ConfigError, match=r"head 9 is out of range; this model has heads 0\.\.8"):
        patcher.metrics([[Patch(0, head=9)]])


# ---- 4. an identity SAE spliced into a middle layer -----------------------------------------


def test_identity_sae_splice_gives_the_models_own_loss(smol):
    model, tok = smol
    sae = identity_sae(WIDTH)
    x = torch.randn(50, WIDTH)
    assert torch.equal(sae(x), x)
    ids = torch.randint(3, VOCAB, (3, 2, 24), generator=torch.Generator().manual_seed(2))
    ids[:, :, 0] = tok.bos_token_id
    with torch.no_grad():  # the model's own loss: HF's mean next-token CE over every prediction
        own = sum(model(input_ids=b, labels=b, use_cache=False).loss.item() for b in ids) / len(ids)
    m = splice_metrics(model, tok, "layers.2", lambda h: sae(h.float()), list(ids))
    assert m["ce_clean"] == pytest.approx(own, rel=1e-6)
    assert m["ce_sae"] == pytest.approx(m["ce_clean"], abs=1e-9)
    assert m["delta_lm_loss"] == pytest.approx(0, abs=1e-9) and m["kl"] == pytest.approx(
        0, abs=1e-9
    )
    assert m["ce_zero"] != pytest.approx(m["ce_clean"], abs=1e-6)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-9)
    assert m["tokens"] == 3 * 2 * 23
