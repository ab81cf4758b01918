"""Special-token positions (the context's start token, chat turn markers) are left alone by
interventions and attribution, as they were left out of training: checked against the
activations of an unedited forward and the edit formula computed by hand."""

import torch

from sae.activations.capture import special_token_ids
from sae.activations.hooks import ActivationCapture, resolve_hook
from sae.config import sae_config
from sae.evaluation.lm_metrics import logprob
from sae.interventions.attribution import attribute
from sae.interventions.edits import Ablate, Edit, Steer, intervene
from sae.models.generation import prompt_token_ids
from sae.training.trainer import make_sae

HOOK = "layers.1"


def _sae(d: int):
    torch.manual_seed(0)
    s = make_sae(sae_config("topk", num_latents=32, k=8), d)
    with torch.no_grad():
        s.b_enc.add_(0.5)  # every feature fires somewhere, the start token included
    return s


def _acts(model, ids, edits=(), skip=None) -> torch.Tensor:
    """The activation at HOOK as the next layer sees it: [T, d]."""
    capture = ActivationCapture(model, [resolve_hook(model, HOOK)])
    with torch.no_grad(), intervene(model, list(edits), skip):
        return capture.run(input_ids=ids)[HOOK].reshape(ids.shape[1], -1)


def test_edits_leave_special_positions_alone(tiny_llama):
    model, tok = tiny_llama
    sae = _sae(model.config.hidden_size)
    ids = torch.tensor([prompt_token_ids(tok, "the file is not found")])
    special = torch.isin(ids[0], special_token_ids(tok))
    assert special[0] and not special[1:].any()  # the start token, then text
    clean = _acts(model, ids)
    with torch.no_grad():
        fs = (
            sae.encode(clean[0:1])[0].nonzero().flatten()[:2].tolist()
        )  # features firing at the start token
    assert len(fs) == 2
    edited = _acts(model, ids, [Edit(sae, HOOK, [Ablate(fs)])], special_token_ids(tok))
    torch.testing.assert_close(edited[0], clean[0], rtol=0, atol=0)
    # Position 1 is the first edited one; it sees the unedited start token, so its input is
    # the clean one and the edit is exactly the formula.
    with torch.no_grad():
        z = sae.encode(clean[1:2])
        expected = clean[1] - z[0, fs[0]] * sae.W_dec[fs[0]] - z[0, fs[1]] * sae.W_dec[fs[1]]
    torch.testing.assert_close(edited[1], expected, rtol=1e-5, atol=1e-5)
    everywhere = _acts(model, ids, [Edit(sae, HOOK, [Ablate(fs)])])
    assert not torch.allclose(
        everywhere[0], clean[0]
    )  # without skip_tokens the start token is edited


def test_steering_during_generation_skips_special_tokens_in_every_step(tiny_llama):
    """With the KV cache each decoding step's forward holds one new token; the skip mask
    follows each forward's own input_ids."""
    model, tok = tiny_llama
    sae = _sae(model.config.hidden_size)
    seen = []
    with intervene(model, [Edit(sae, HOOK, [Steer(2, 5.0)])], special_token_ids(tok)):
        handle = resolve_hook(model, "layers.2").module.register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].detach().clone()) if args else None
        )
        try:
            ids = torch.tensor([prompt_token_ids(tok, "a value was")])
            model.generate(
                input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id
            )
        finally:
            handle.remove()
    clean = _acts(model, ids)
    torch.testing.assert_close(seen[0][0, 0], clean[0])  # the prompt's start token: untouched
    assert [s.shape[1] for s in seen] == [ids.shape[1], 1, 1]  # prompt, then one token per step


def test_attribution_ignores_the_start_token(tiny_llama):
    """The start token's activation is the model's own during attribution: a feature that
    fires only there gets no attribution."""
    model, tok = tiny_llama
    sae = _sae(model.config.hidden_size)
    prompts = ["the file is not", "a value was"]
    ids = torch.tensor([prompt_token_ids(tok, prompts[0])])
    start = _acts(model, ids)[0]
    with torch.no_grad():  # feature 0: 10 x the start token's direction, a threshold only it passes
        sae.W_enc[0] = 10 * start / start.norm()
        sae.b_enc[0] = -10 * (start.norm() - 0.1)
    metric = logprob(" the", tok)
    result = attribute(model, tok, sae, HOOK, prompts, metric, progress=False)
    with torch.no_grad():
        z = sae.encode(_acts(model, ids))
    assert z[0, 0] > 0 and (z[1:, 0] == 0).all()  # the feature fires at the start token only
    assert result.features[0].item() == 0.0
