"""Activation patching: the identities that pin it down (patching nothing gives the
corrupted metric, patching a layer's whole residual stream gives the clean one, all heads
of a layer together equal its attention output), metrics, the result's table / JSON / SVG,
and the `analyze.py patch` command on the demo model."""

import json
import math
import xml.etree.ElementTree as ET

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from sae import cli
from sae.activations.hooks import ActivationCapture, EditActivation, resolve_hook
from sae.errors import ConfigError
from sae.evaluation.lm_metrics import Metric, answer_token, logit_diff, logprob
from sae.interventions.patching import (
    ActivationPatcher,
    Patch,
    activation_patching,
    normalized_score,
    parse_layers,
)

CLEAN = "If the key is missing, a KeyError is"
CORRUPTED = "If the key is missing, the default is"  # same token count (10 with BOS)


@pytest.fixture(scope="module")
def patcher(tiny_llama):
    model, tok = tiny_llama
    return ActivationPatcher(model, tok, CLEAN, CORRUPTED, logit_diff(" raised", " returned", tok))


def test_metrics_on_logits(tiny_llama):
    _, tok = tiny_llama
    a, w = answer_token(tok, " raised"), answer_token(tok, " returned")
    logits = torch.randn(len(tok))
    assert logit_diff(" raised", " returned", tok)(logits) == pytest.approx(
        float(logits[a] - logits[w])
    )
    assert logprob(a)(logits) == pytest.approx(float(logits.log_softmax(-1)[a]))
    batch = torch.randn(3, len(tok))
    assert torch.allclose(logprob(" raised", tok)(batch), batch.log_softmax(-1)[:, a])
    assert "' raised'" in logit_diff(" raised", " returned", tok).name
    custom = Metric("top logit", lambda x: x.max(-1).values)
    assert custom(logits) == pytest.approx(float(logits.max()))


def test_answer_must_be_one_token(tiny_llama):
    _, tok = tiny_llama
    with pytest.raises(
        ConfigError, match=r"exactly one token, but it is 2 tokens \('Ġraised', 'Ġagain'\)"
    ) as e:
        logprob(" raised again", tok)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="out of range"):
        answer_token(tok, 10**6)
    with pytest.raises(ConfigError, match="is empty"):
        answer_token(tok, "")
    with pytest.raises(ConfigError, match="answer token itself"):
        logit_diff(" raised", " raised", tok)


def test_patch_nothing_gives_corrupted_and_everything_gives_clean(patcher, tiny_llama):
    model, tok = tiny_llama
    assert abs(patcher.clean_metric - patcher.corrupted_metric) > 1e-3
    # The reference metrics, straight from the model.
    metric = patcher.metric
    for text, value in ((CLEAN, patcher.clean_metric), (CORRUPTED, patcher.corrupted_metric)):
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            assert metric(model(input_ids=ids).logits[0, -1]) == value
    assert float(patcher.metrics([[]])[0]) == patcher.corrupted_metric  # one run: bit for bit
    runs = [[], [Patch(i) for i in range(patcher.n_layers)], [Patch(patcher.n_layers - 1)]]
    got = patcher.metrics(runs, batch_size=3)
    assert got[0] == pytest.approx(patcher.corrupted_metric, abs=1e-5)
    assert got[1] == pytest.approx(patcher.clean_metric, abs=1e-5)
    assert got[2] == pytest.approx(patcher.clean_metric, abs=1e-5)


def test_layer_mode_every_layer_restores_clean(patcher):
    # The residual stream after layer L at every position is all that later layers see.
    result = patcher.sweep("layer", batch_size=2)
    assert result.values.shape == (patcher.n_layers, 1) and result.columns == ["all positions"]
    assert torch.allclose(
        result.values, torch.full_like(result.values, patcher.clean_metric), atol=1e-5
    )
    assert torch.allclose(result.normalized, torch.ones_like(result.values), atol=1e-5)


def test_position_mode(patcher):
    result = patcher.sweep("position", batch_size=7)
    T, L = patcher.n_tokens, patcher.n_layers
    assert result.values.shape == (L, T) and result.rows == [f"layers.{i}" for i in range(L)]
    # The last layer at the final position is all the final logits read.
    assert result.values[-1, -1] == pytest.approx(patcher.clean_metric, abs=1e-5)
    # The prompts share their first 7 tokens: there clean = corrupted, so patching changes nothing.
    assert torch.allclose(
        result.values[:, :7],
        torch.full((L, 7), patcher.corrupted_metric, dtype=torch.float64),
        atol=1e-5,
    )
    # A batch of any size gives the same numbers as one run at a time.
    one = patcher.metrics([[Patch(1, position=8)]], batch_size=1)
    assert one[0] == pytest.approx(float(result.values[1, 8]), abs=1e-5)
    assert result.columns[8] == "8 ' KeyError'/' default'" and result.columns[0] == "0 '<|bos|>'"
    # Partial layer lists.
    sub = patcher.sweep("position", layers="1-2")
    assert sub.rows == ["layers.1", "layers.2"] and torch.allclose(
        sub.values, result.values[1:3], atol=1e-5
    )


def _direct_attention_patch(model, tok, patcher, layer):
    """Metric of the corrupted run with layer's whole attention output replaced by the clean one."""
    point = resolve_hook(model, f"layers.{layer}.attn")
    clean = ActivationCapture(model, [point], stop_early=False).run(
        input_ids=torch.tensor([patcher.clean_ids])
    )[point.name]
    with EditActivation(model, point, lambda h: clean.expand_as(h).to(h.dtype)), torch.no_grad():
        logits = model(input_ids=torch.tensor([patcher.corrupted_ids]), use_cache=False).logits[
            0, -1
        ]
    return patcher.metric(logits)


def test_all_heads_equal_the_attention_output(patcher, tiny_llama):
    model, tok = tiny_llama
    H = patcher.heads
    assert H == model.config.num_attention_heads
    for layer in range(patcher.n_layers):
        together = patcher.metrics([[Patch(layer, head=h) for h in range(H)]])[0]
        assert together == pytest.approx(
            _direct_attention_patch(model, tok, patcher, layer), abs=1e-5
        )
    result = patcher.sweep("head")
    assert result.values.shape == (patcher.n_layers, H) and result.columns[0] == "head 0"
    assert "o_proj" in result.column_title


def test_every_family(tiny_model_dir):
    """Patching nothing gives corrupted, a layer's whole residual stream gives clean, all
    heads of a layer give its attention output (one batch of runs per family)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    patcher = ActivationPatcher(model, tok, CLEAN, CORRUPTED, logprob(" raised", tok))
    last, H = patcher.n_layers - 1, patcher.heads
    got = patcher.metrics(
        [
            [],
            [Patch(0)],
            [Patch(last)],
            [Patch(0, head=h) for h in range(H)],
            [Patch(last, head=h) for h in range(H)],
        ]
    )
    assert got[0] == pytest.approx(patcher.corrupted_metric, abs=1e-9)
    assert got[1] == pytest.approx(patcher.clean_metric, abs=1e-9)
    assert got[2] == pytest.approx(patcher.clean_metric, abs=1e-9)
    assert got[3] == pytest.approx(_direct_attention_patch(model, tok, patcher, 0), abs=1e-9)
    assert got[4] == pytest.approx(_direct_attention_patch(model, tok, patcher, last), abs=1e-9)


def test_bad_input_is_one_line(tiny_llama, patcher):
    model, tok = tiny_llama
    metric = logprob(" raised", tok)
    with pytest.raises(
        ConfigError, match=r"tokenize to 10 and 11 tokens .*needs equal lengths \(reword one\)"
    ) as e:
        ActivationPatcher(model, tok, CLEAN, "If the key is missing, a default value is", metric)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not a patching mode"):
        activation_patching(model, tok, CLEAN, CORRUPTED, metric, mode="neuron")
    with pytest.raises(ConfigError, match="layer 7 is out of range"):
        patcher.sweep("layer", layers="7")
    with pytest.raises(ConfigError, match="position 10 is outside"):
        patcher.metrics([[Patch(0, position=10)]])
    with pytest.raises(ConfigError, match="head 4 is out of range"):
        patcher.metrics([[Patch(0, head=4)]])


def test_head_mode_needs_an_output_projection(tiny_llama, monkeypatch):
    import sae.interventions.patching

    model, tok = tiny_llama
    monkeypatch.setattr(
        sae.interventions.patching, "attention_output_projection", lambda layer: None
    )
    patcher = ActivationPatcher(model, tok, CLEAN, CORRUPTED, logprob(" raised", tok))
    assert patcher.sweep("layer").values.shape == (3, 1)
    with pytest.raises(
        ConfigError, match="found no attention output projection .*use --mode layer or position"
    ):
        patcher.sweep("head")


def test_parse_layers():
    assert parse_layers(None, 4) == [0, 1, 2, 3]
    assert (
        parse_layers("0-1,3", 4) == [0, 1, 3]
        and parse_layers("2", 4) == [2]
        and parse_layers([3, 1], 4) == [1, 3]
    )
    for bad, msg in (
        ("a", "not a layer list"),
        ("3-1", "backwards"),
        ("4", "out of range"),
        ("", "not a layer"),
    ):
        with pytest.raises(ConfigError, match=msg):
            parse_layers(bad, 4)


def test_normalized_score_is_nan_safe():
    assert normalized_score(3.0, 5.0, 1.0) == 0.5
    assert math.isnan(normalized_score(3.0, 1.0, 1.0))
    assert torch.isnan(normalized_score(torch.ones(2), 1.0, 1.0)).all()


def test_table_json_and_svg(tiny_llama):
    model, tok = tiny_llama
    clean, corrupted = "x = '<b>&' if a", "x = '<b>&' if b"
    result = activation_patching(
        model, tok, clean, corrupted, logprob(" raised", tok), mode="position"
    )
    text = result.table_text()
    assert text.splitlines()[1].startswith("layers.0") and "columns: 0 '<|bos|>'" in text
    svg = result.heatmap_svg()
    root = ET.fromstring(svg)  # well-formed XML
    assert root.tag.endswith("svg") and "http" not in svg.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    assert "&lt;" in svg and "&amp;" in svg and "<b>" not in svg
    labels = "".join(root.itertext())
    assert "<" in labels and "&" in labels and "layers.2" in labels and "normalised score" in labels
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert len(data["values"]) == 3 and len(data["values"][0]) == len(data["columns"]) == len(
        data["clean_tokens"]
    )

    # Clean = corrupted: the normalised score is undefined; JSON says null, the SVG shows the change.
    same = activation_patching(model, tok, clean, clean, logprob(" raised", tok), mode="layer")
    data = json.loads(json.dumps(same.to_dict(), allow_nan=False))
    assert data["normalized"][0] == [None]
    svg = same.heatmap_svg()
    ET.fromstring(svg)
    assert "patched - corrupted metric" in svg


# ---- the command -----------------------------------------------------------------------------

DEMO = ["--clean", CLEAN, "--corrupted", CORRUPTED, "--answer", " raised"]


def run(*args):
    return CliRunner().invoke(cli.analyze, ["patch", *map(str, args)])


def one_line_error(result, pattern):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], result.output
    assert "Traceback" not in result.output


def test_cli_json_and_svg_on_the_demo_model(tmp_path):
    svg = tmp_path / "out" / "patch.svg"
    result = run(*DEMO, "--wrong", " returned", "--svg", svg, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    # The documented example: the demo model prefers ' raised' after the clean prompt only.
    assert data["clean_metric"] > 2 and data["corrupted_metric"] < -0.5
    assert data["mode"] == "position" and len(data["rows"]) == 4 and len(data["columns"]) == 10
    assert data["normalized"][-1][-1] == pytest.approx(1.0, abs=1e-4)
    assert data["svg"] == str(svg)
    ET.parse(svg)

    text = run(*DEMO, "--mode", "layer", "--layers", "1,3")
    assert text.exit_code == 0, text.output
    assert (
        "log prob ' raised'" in text.stdout
        and "layers.1" in text.stdout
        and "layers.0" not in text.stdout
    )


def test_cli_bad_input(tmp_path):
    one_line_error(
        run(
            "--clean",
            CLEAN,
            "--corrupted",
            "If the key is missing, a default value is",
            "--answer",
            " raised",
        ),
        "tokenize to 10 and 11 tokens",
    )
    one_line_error(
        run(*DEMO[:-1], " raised again"), "--answer: ' raised again' must be exactly one token"
    )
    one_line_error(run(*DEMO, "--metric", "logit-diff"), "give --wrong TOKEN")
    (tmp_path / "file").write_text("")
    one_line_error(run(*DEMO, "--svg", tmp_path / "file" / "x.svg"), "--svg: cannot write")
    one_line_error(run(*DEMO, "--svg", tmp_path), "--svg: cannot write")
