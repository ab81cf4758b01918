"""Feature edits while the model runs: each edit's formula holds exactly at every position,
generated ones included (KV cache on); no edit changes nothing; hooks never outlive the
context."""

from dataclasses import fields

import pytest
import torch

from sae.activations.hooks import attach, resolve_hook
from sae.architectures import ARCHITECTURES
from sae.config import sae_config
from sae.errors import ConfigError
from sae.interventions.edits import (
    Ablate,
    Clamp,
    Edit,
    Reconstruct,
    Scale,
    Steer,
    intervene,
    parse_feature_edits,
)
from sae.models.generation import Sampling, continuation_ids, continuations
from sae.training.trainer import make_sae

HOOK = "layers.1"


@pytest.fixture(scope="module")
def sae(firing_sae):
    return firing_sae


def prompt_ids(tok):
    return torch.tensor(
        [
            [
                tok.bos_token_id,
                *tok("the file is not found and", add_special_tokens=False)["input_ids"],
            ]
        ]
    )


def recorded_generation(model, tok, edits, new_tokens=5):
    """Generate greedily with ``edits``; return [(h_before_edit, h_after_edit)] of every
    forward at HOOK (the prompt pass, then one per cached decoding step)."""
    point = resolve_hook(model, HOOK)
    before, after = [], []
    h1 = attach(point, lambda h: before.append(h.detach().clone()))
    try:
        with intervene(model, edits):
            h2 = attach(point, lambda h: after.append(h.detach().clone()))
            try:
                model.generate(
                    input_ids=prompt_ids(tok),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    min_new_tokens=new_tokens,
                )
            finally:
                h2.remove()
    finally:
        h1.remove()
    assert len(before) == new_tokens and before[1].shape[1] == 1  # the cache is in use
    return list(zip(before, after))


@pytest.mark.parametrize(
    "edit, expected",
    [
        (Ablate([3, 7]), lambda h, z, W: h - z[..., [3, 7]] @ W[[3, 7]]),
        (Clamp([5], 10.0), lambda h, z, W: h + (10.0 - z[..., [5]]) @ W[[5]]),
        (Scale([5], 3.0), lambda h, z, W: h + 2.0 * z[..., [5]] @ W[[5]]),
        (Steer(9, -4.0), lambda h, z, W: h - 4.0 * W[9]),
        (Reconstruct(), lambda h, z, W: z @ W),
    ],
    ids=["ablate", "clamp", "scale", "steer", "reconstruct"],
)
def test_edit_formula_at_every_position_generated_included(tiny_llama, sae, edit, expected):
    model, tok = tiny_llama
    pairs = recorded_generation(model, tok, [Edit(sae, HOOK, [edit])])
    for h, out in pairs:
        with torch.no_grad():
            z = sae.encode(h.reshape(-1, 64)).view(*h.shape[:-1], -1)
            want = expected(h, z, sae.W_dec) + (sae.b_dec if isinstance(edit, Reconstruct) else 0)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_is_edited_through_its_own_code(tiny_llama, arch):
    """Ablation and clamping subtract the code that the architecture's own encode gives
    (gated's magnitude path, BatchTopK's and Matryoshka's inference threshold, JumpReLU's
    thresholds), at every position generated ones included."""
    model, tok = tiny_llama
    torch.manual_seed(0)
    extra = {"k": 8} if "k" in {f.name for f in fields(ARCHITECTURES[arch].Config)} else {}
    s = make_sae(sae_config(arch, num_latents=32, **extra), 64)
    with torch.no_grad():
        s.b_enc.add_(0.5)  # fire often, so the edited features are active somewhere
        if hasattr(s, "b_mag"):
            s.b_mag.add_(0.5)
    edits = [Ablate([3, 7]), Clamp([5], 10.0)]
    pairs = recorded_generation(model, tok, [Edit(s, HOOK, edits)])
    fired = 0
    for h, out in pairs:
        with torch.no_grad():
            z = s.encode(h.reshape(-1, 64)).view(*h.shape[:-1], -1)
        fired += int((z[..., [3, 5, 7]] > 0).sum())
        want = h - z[..., [3, 5, 7]] @ s.W_dec[[3, 5, 7]] + 10.0 * s.W_dec[5]
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert fired > 0


def test_several_saes_and_hooks_at_once(tiny_llama, sae):
    model, tok = tiny_llama
    torch.manual_seed(1)
    other = make_sae(sae_config("topk", num_latents=16, k=4), 64)
    seen = {}
    points = {h: resolve_hook(model, h) for h in ("layers.0", "layers.2")}
    handles = [
        attach(p, lambda h, n=n: seen.setdefault(n + ":in", h.clone())) for n, p in points.items()
    ]
    with intervene(
        model,
        [Edit(sae, "layers.0", [Steer(1, 2.0)]), Edit(other, "layers.2", [Ablate([0, 1, 2])])],
    ):
        handles += [
            attach(p, lambda h, n=n: seen.setdefault(n + ":out", h.clone()))
            for n, p in points.items()
        ]
        with torch.no_grad():
            model(input_ids=prompt_ids(tok))
    for h in handles:
        h.remove()
    torch.testing.assert_close(seen["layers.0:out"], seen["layers.0:in"] + 2.0 * sae.W_dec[1])
    z = other.encode(seen["layers.2:in"].reshape(-1, 64)).view(1, -1, 16)
    torch.testing.assert_close(
        seen["layers.2:out"], seen["layers.2:in"] - z[..., :3] @ other.W_dec[:3]
    )


def test_no_edit_is_bit_identical(tiny_llama, sae):
    model, tok = tiny_llama
    ids = prompt_ids(tok)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with intervene(model, [Edit(sae, HOOK, [])]):
            edited = model(input_ids=ids).logits
    assert torch.equal(plain, edited)
    s = Sampling(max_new_tokens=6, temperature=1.0, seed=3)
    base = continuation_ids(
        model, tok, ["the file", "a much longer prompt here"], samples=2, sampling=s
    )
    with intervene(model, [Edit(sae, HOOK, [])]):
        again = continuation_ids(
            model, tok, ["the file", "a much longer prompt here"], samples=2, sampling=s
        )
    assert base == again


def test_hooks_are_removed_after_an_exception(tiny_llama, sae):
    model, _ = tiny_llama
    module = resolve_hook(model, HOOK).module
    n = len(module._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(model, [Edit(sae, HOOK, [Ablate([1])])]):
            assert len(module._forward_hooks) == n + 1
            raise RuntimeError("boom")
    assert len(module._forward_hooks) == n


def test_out_of_range_and_bad_text_are_one_line(tiny_llama, sae):
    model, _ = tiny_llama
    with pytest.raises(
        ConfigError, match="feature 32 is out of range; the SAE at layers.1 has features 0..31"
    ):
        with intervene(model, [Edit(sae, HOOK, [Ablate([1, 32])])]):
            pass
    assert parse_feature_edits("12, 3", ["7:10"], ["2:0.5"], ["9:+8", "4:-1.5e1"]) == [
        Ablate([12, 3]),
        Clamp(7, 10.0),
        Scale(2, 0.5),
        Steer(9, 8.0),
        Steer(4, -15.0),
    ]
    with pytest.raises(ConfigError, match="--steer: '9=8' is not FEATURE:NUMBER"):
        parse_feature_edits(steer=["9=8"])
    with pytest.raises(ConfigError, match="--ablate: 'a,b'"):
        parse_feature_edits("a,b")


def test_batched_left_padded_generation_matches_one_at_a_time(tiny_llama):
    model, tok = tiny_llama
    greedy = Sampling(max_new_tokens=5, temperature=0)
    prompts = ["short", "a considerably longer prompt with more tokens"]
    together = continuations(model, tok, prompts, sampling=greedy, batch_size=2)
    alone = [continuations(model, tok, [p], sampling=greedy, batch_size=1)[0] for p in prompts]
    assert together == alone
