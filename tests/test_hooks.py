"""Hook points on every family: what they capture, early stop, clean removal, errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sae.activations.hooks import ActivationCapture, resolve_hook, resolve_hooks
from sae.errors import ConfigError
from sae.models.loading import decoder_layers


@pytest.fixture(scope="module")
def model_and_ids(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    ids = torch.randint(
        3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    return model, ids


def test_residual_hooks_match_hf_hidden_states(model_and_ids):
    model, ids = model_and_ids
    with torch.no_grad():
        ref = model(
            input_ids=ids, output_hidden_states=True
        ).hidden_states  # ref[i + 1] = after layer i
    acts = ActivationCapture(
        model, resolve_hooks(model, ["layers.0", "layers.1", "layers.1.resid_pre"])
    ).run(input_ids=ids)
    torch.testing.assert_close(acts["layers.0"], ref[1])
    torch.testing.assert_close(acts["layers.1"], ref[2])
    torch.testing.assert_close(acts["layers.1.resid_pre"], ref[1])


def test_sub_module_outputs_sum_to_the_residual_update(model_and_ids):
    model, ids = model_and_ids
    if model.config.model_type == "gemma2":
        pytest.skip("Gemma 2 normalizes sub-module outputs before adding them to the residual")
    names = ["layers.1.resid_pre", "layers.1.attn", "layers.1.mlp", "layers.1"]
    a = ActivationCapture(model, resolve_hooks(model, names)).run(input_ids=ids)
    # attention modules return tuples; the captured value is the hidden-state tensor
    assert a["layers.1.attn"].shape == a["layers.1"].shape
    torch.testing.assert_close(
        a["layers.1"], a["layers.1.resid_pre"] + a["layers.1.attn"] + a["layers.1.mlp"]
    )


def test_forward_stops_after_the_deepest_hook_and_hooks_are_removed(model_and_ids):
    model, ids = model_and_ids
    _, layers = decoder_layers(model)

    def hook_counts():  # transformers registers hooks of its own; ours must all go away
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    before = hook_counts()
    calls = []
    counters = [
        m.register_forward_hook(lambda *_, n=n: calls.append(n))
        for n, m in [
            ("layer1", layers[1]),
            ("layer2", layers[2]),
            ("head", model.get_output_embeddings()),
        ]
    ]
    try:
        ActivationCapture(model, resolve_hooks(model, ["layers.1.resid_pre", "layers.0"])).run(
            input_ids=ids
        )
        assert calls == []  # layer 1 itself never ran: its input was the deepest point
        ActivationCapture(model, resolve_hooks(model, ["layers.1"])).run(input_ids=ids)
        assert calls == ["layer1"]
    finally:
        for h in counters:
            h.remove()
    assert hook_counts() == before
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size  # model still whole


def test_a_hook_reads_the_same_whatever_else_is_hooked(model_and_ids):
    # Falcon adds the attention output into the MLP output in place, after the MLP ran.
    model, ids = model_and_ids
    alone = ActivationCapture(model, resolve_hooks(model, ["layers.1.mlp"])).run(input_ids=ids)
    with_deeper = ActivationCapture(model, resolve_hooks(model, ["layers.1.mlp", "layers.2"])).run(
        input_ids=ids
    )
    torch.testing.assert_close(with_deeper["layers.1.mlp"], alone["layers.1.mlp"])


def test_model_runs_normally_between_harvest_batches(model_and_ids, tiny_model_dir):
    from transformers import AutoTokenizer

    from sae.activations.harvest import Harvester

    model, ids = model_and_ids
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    harvest = iter(
        Harvester(model, AutoTokenizer.from_pretrained(tiny_model_dir), [ids, ids], ["layers.0"])
    )
    next(harvest)  # a paused harvester (as inside a shuffling buffer)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
    next(harvest)


def test_bad_hook_names_list_what_is_valid(model_and_ids):
    model, _ = model_and_ids
    with pytest.raises(
        ConfigError, match=r"'blocks\.1' is not a hook point; valid: layers\.N, .* N in 0\.\.2"
    ):
        resolve_hook(model, "blocks.1")
    with pytest.raises(
        ConfigError, match=r"layer 7 in 'layers\.7' is out of range; this model has layers 0\.\.2"
    ):
        resolve_hook(model, "layers.7")
    with pytest.raises(
        ConfigError, match=r"'layers\.1\.nope' names no sub-module of layer 1; .*sub-modules .*mlp"
    ):
        resolve_hook(model, "layers.1.nope")
    with pytest.raises(ConfigError, match="not a hook point"):
        resolve_hook(model, "layers.²")
    with pytest.raises(ConfigError, match="not a hook point"):
        resolve_hook(model, "layers.01")
    with pytest.raises(ConfigError, match="listed twice"):
        resolve_hooks(model, ["layers.1", "layers.1"])
    with pytest.raises(ConfigError, match="no hook points"):
        resolve_hooks(model, [])
