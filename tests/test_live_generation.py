"""Token-by-token side-by-side generation (the explorer's): the baseline is what plain
generation writes with the same seed, the edited side is what generation under the edit
writes, and the KL at each step is the one a full forward of both models gives."""

import pytest
import torch

from sae.activations.capture import special_token_ids
from sae.interventions.edits import Ablate, Edit, Steer, intervene
from sae.interventions.live_generation import live_continuations
from sae.models.generation import Sampling, continuation_ids, prompt_token_ids

HOOK = "layers.1"
PROMPT = "the file is not found and"


def both_sides(model, tok, edits, sampling):
    steps = list(live_continuations(model, tok, PROMPT, edits, sampling))
    base = [s.baseline for s in steps if s.baseline is not None]
    edited = [s.edited for s in steps if s.edited is not None]
    return steps, base, edited


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(max_new_tokens=12, temperature=1.0, seed=3),
        Sampling(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=5),
        Sampling(max_new_tokens=12, temperature=0),
    ],
    ids=["sample", "temperature-top-p", "greedy"],
)
def test_both_sides_equal_plain_generation_with_the_same_seed(tiny_llama, firing_sae, sampling):
    model, tok = tiny_llama
    edit = Edit(firing_sae, HOOK, [Ablate([1, 2, 3]), Steer(4, 6.0)])
    _, base, edited = both_sides(model, tok, [edit], sampling)
    (plain,) = continuation_ids(model, tok, [PROMPT], sampling=sampling, batch_size=1)[0]
    with intervene(model, [edit], special_token_ids(tok)):
        (changed,) = continuation_ids(model, tok, [PROMPT], sampling=sampling, batch_size=1)[0]
    assert base == plain
    assert edited == changed
    assert base != edited  # the edit matters here, so the test can tell the sides apart


def test_no_edit_gives_two_equal_sides_and_zero_kl(tiny_llama, firing_sae):
    model, tok = tiny_llama
    steps, base, edited = both_sides(model, tok, [Edit(firing_sae, HOOK, [])], Sampling(12, seed=1))
    assert base == edited and len(steps) == 12
    assert all(s.kl == pytest.approx(0.0, abs=1e-6) for s in steps)


def test_kl_is_that_of_full_forwards_on_the_edited_text(tiny_llama, firing_sae):
    model, tok = tiny_llama
    edit = Edit(firing_sae, HOOK, [Steer(4, 8.0)])
    steps, _, edited = both_sides(model, tok, [edit], Sampling(8, temperature=0))
    ids = torch.tensor([prompt_token_ids(tok, PROMPT) + edited])
    with torch.no_grad():
        q = model(ids).logits[0].log_softmax(-1)
        with intervene(model, [edit], special_token_ids(tok)):
            p = model(ids).logits[0].log_softmax(-1)
    start = ids.shape[1] - len(edited) - 1  # the position that predicts the first new token
    expected = (p.exp() * (p - q)).sum(-1)[start : start + len(steps)]
    got = torch.tensor([s.kl for s in steps])
    assert got.min() > 0.01  # a real difference, not zeros compared with zeros
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


def test_stops_at_the_token_budget_and_never_emits_eos(tiny_llama, firing_sae):
    model, tok = tiny_llama
    steps = list(live_continuations(model, tok, PROMPT, [Edit(firing_sae, HOOK, [])], Sampling(5)))
    assert len(steps) <= 5
    assert all(tok.eos_token_id not in (s.baseline, s.edited) for s in steps)
