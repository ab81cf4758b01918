"""Attribution against finite differences, scorers against their definitions, and the
fix test: the scorer sees exactly the continuations, and the costs match independent
computations."""

import importlib.util
import re

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from sae.activations.capture import special_token_ids
from sae.config import sae_config
from sae.errors import ConfigError
from sae.evaluation.lm_metrics import logprob
from sae.interventions.attribution import attribute
from sae.interventions.edits import Ablate, Edit, Scale, intervene
from sae.interventions.fix_test import CONDITIONS, FixTestResult, bootstrap_ci, fix_test
from sae.interventions.scorers import Scorer, load_scorer, word_list_scorer
from sae.models.demo_model import DEMO_MODEL_DIR
from sae.models.generation import Sampling, continuation_ids, continuations, prompt_token_ids
from sae.training.trainer import make_sae

HOOK = "layers.1"
PROMPTS = ["the file is not", "a value was", "when the lock is held the"]


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    s = make_sae(sae_config("topk", num_latents=32, k=8), 64)
    with torch.no_grad():
        s.b_enc.add_(0.5)
    return s


def metric_with(model, tok, metric, edits):
    total = 0.0
    with (
        torch.no_grad(),
        intervene(model, edits, special_token_ids(tok)),
    ):  # as attribution: BOS untouched
        for p in PROMPTS:
            logits = model(input_ids=torch.tensor([prompt_token_ids(tok, p)])).logits[0, -1]
            total += metric(logits)
    return total


def test_attribution_matches_finite_differences(tiny_llama, sae):
    """z_f * dm/dz_f summed over positions is the derivative of the metric when feature f
    is scaled by (1 + t) everywhere: a central difference through the Scale edit."""
    model, tok = tiny_llama
    metric = logprob(" the", tok)
    result = attribute(model, tok, sae, HOOK, PROMPTS, metric, progress=False)
    assert result.metric == pytest.approx(
        metric_with(model, tok, metric, []), abs=1e-4
    )  # the splice is exact
    eps = 1e-2
    for f in result.ranking("up")[:3] + result.ranking("down")[:2]:
        up = metric_with(model, tok, metric, [Edit(sae, HOOK, [Scale([f], 1 + eps)])])
        down = metric_with(model, tok, metric, [Edit(sae, HOOK, [Scale([f], 1 - eps)])])
        assert result.features[f].item() == pytest.approx(
            (up - down) / (2 * eps), rel=0.05, abs=1e-3
        )
    torch.testing.assert_close(result.per_prompt.sum(0), result.features)


def test_word_list_scorer_counts_whole_words(tmp_path):
    s = word_list_scorer(["raise", "Error"])
    assert s(["Raise it", "raised", "an error; ERROR!", "terror", ""]) == [1, 0, 2, 0, 0]
    (tmp_path / "words.txt").write_text("bad\n\nworse\n")
    assert load_scorer(f"words:{tmp_path / 'words.txt'}")(["bad and worse", "fine"]) == [2, 0]
    assert load_scorer("words:a,b")(["a b c"]) == [2]
    for spec, message in (
        ("nope", "is not a scorer"),
        ("hf:./missing-model-folder", "is not a folder"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_scorer(spec)


def test_profanity_scorer_without_its_package_says_how_to_install():
    if importlib.util.find_spec("profanity_check") is not None:
        pytest.skip("alt-profanity-check is installed")
    with pytest.raises(ConfigError, match="pip install alt-profanity-check"):
        load_scorer("profanity")


def test_classifier_scorer_returns_the_label_probability(tmp_path):
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
        id2label={0: "ok", 1: "toxic"},
        label2id={"ok": 0, "toxic": 1},
    )
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    scorer = load_scorer(f"hf:{tmp_path / 'clf'}@toxic")
    texts = ["a short text", "another, somewhat longer, text here"]
    got = scorer(texts)
    for text, p in zip(texts, got):
        with torch.no_grad():
            logits = model(**tok(text, return_tensors="pt")).logits[0]
        assert p == pytest.approx(float(logits.softmax(-1)[1]), rel=1e-4)
    with pytest.raises(ConfigError, match="has no label 'nice'; its labels: ok, toxic"):
        load_scorer(f"hf:{tmp_path / 'clf'}@nice")


def test_bootstrap_interval():
    assert bootstrap_ci(torch.full((10,), 3.0), lambda v: v.mean()) == (3.0, 3.0)
    v = torch.arange(100, dtype=torch.float64)
    lo, hi = bootstrap_ci(v, lambda x: x.mean())
    assert lo < 49.5 < hi and hi - lo < 25


def test_fix_test_scores_exactly_the_continuations(tiny_llama, sae):
    model, tok = tiny_llama
    seen = []
    recorder = Scorer(
        "recorder", lambda texts: (seen.append(list(texts)), [len(t) for t in texts])[1]
    )
    sampling = Sampling(max_new_tokens=6, temperature=1.0, seed=5)
    edit = Edit(sae, HOOK, [Ablate([0, 1, 2, 3])])
    result = fix_test(
        model,
        tok,
        PROMPTS,
        [edit],
        recorder,
        samples=2,
        sampling=sampling,
        threshold=10,
        resamples=200,
        progress=False,
    )
    base = continuations(model, tok, PROMPTS, 2, sampling)
    with intervene(model, [edit]):
        changed = continuations(model, tok, PROMPTS, 2, sampling)
    assert seen == [[t for per in base for t in per], [t for per in changed for t in per]]
    assert result.texts == {"baseline": base, "intervened": changed}
    lengths = torch.tensor([[len(t) for t in per] for per in base], dtype=torch.float64)
    s = result.summary
    assert s["baseline"]["mean_score"]["value"] == pytest.approx(float(lengths.mean()))
    assert s["baseline"]["over_threshold"]["value"] == pytest.approx(
        float((lengths > 10).double().mean())
    )
    # Perplexity under the clean model, from full forward passes of prompt + continuation.
    nll, n = 0.0, 0
    for p, per in zip(PROMPTS, continuation_ids(model, tok, PROMPTS, 2, sampling)):
        for cont in per:
            ids = prompt_token_ids(tok, p) + cont
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            P = len(prompt_token_ids(tok, p))
            nll -= sum(float(logp[P - 1 + i, t]) for i, t in enumerate(cont))
            n += len(cont)
    assert s["baseline"]["perplexity"]["value"] == pytest.approx(
        float(torch.tensor(nll / n).exp()), rel=1e-4
    )
    change = s["change"]["mean_score"]
    assert change["value"] == pytest.approx(
        s["intervened"]["mean_score"]["value"] - s["baseline"]["mean_score"]["value"]
    )
    assert change["ci"][0] <= change["value"] <= change["ci"][1]


def test_kl_of_a_no_op_edit_is_zero(tiny_llama, sae):
    model, tok = tiny_llama
    neutral = [torch.tensor(prompt_token_ids(tok, "some neutral text about files and values"))]
    result = fix_test(
        model,
        tok,
        PROMPTS[:1],
        [Edit(sae, HOOK, [Scale([3], 1.0)])],
        load_scorer("words:the"),
        samples=1,
        sampling=Sampling(max_new_tokens=3, temperature=0),
        neutral=neutral,
        resamples=50,
        progress=False,
    )
    assert abs(result.summary["kl"]["value"]) < 1e-6
    assert result.texts["baseline"] == result.texts["intervened"]
    page = result.html("t<b>")
    assert "<" not in page.split("<title>")[1].split("</title>")[0]
    # The words: scorer's matches are marked in the samples, exactly as many as it counted.
    assert result.marks is not None
    for c, cells in zip(CONDITIONS, zip(*sample_cells(page))):
        assert [cell.count("<mark>") for cell in cells] == result.scores[c][:, 0].tolist()


def sample_cells(page: str) -> list[tuple[str, str]]:
    """(baseline, intervened) sample cells of each row of the page's sample table, without the score line."""
    rows = re.findall(
        r"<tr><td>.*?</td><td>(.*?)<div class=score>.*?</td><td>(.*?)<div class=score>", page, re.S
    )
    assert rows, "no sample rows"
    return rows


def stat(value, lo, hi):
    return {"value": value, "ci": (lo, hi)}


def page_result(texts: list[str], scorer: Scorer) -> FixTestResult:
    """A result over given continuations (one sample per prompt, the same texts in both conditions)."""
    n = len(texts)
    scores = torch.tensor(scorer(texts), dtype=torch.float64).view(n, 1)
    per = {
        "mean_score": stat(1.5, 0.5, 2.75),
        "over_threshold": stat(0.25, 0.0, 0.5),
        "perplexity": stat(37.0, 30.0, 44.0),
    }
    summary = {
        "baseline": per,
        "intervened": {**per, "mean_score": stat(0.6, 0.1, 1.2)},
        "change": {k: stat(0.0, -1.0, 1.0) for k in per},
    }
    return FixTestResult(
        prompts=[f"prompt {i}" for i in range(n)],
        texts={c: [[t] for t in texts] for c in CONDITIONS},
        scores={c: scores for c in CONDITIONS},
        nll={},
        tokens={},
        kl=None,
        scorer=scorer.name,
        threshold=0.5,
        summary=summary,
        marks=scorer.pattern,
    )


def test_fix_page_marks_the_scored_words_and_escapes_samples():
    scorer = load_scorer("words:raise,error,a&b")
    texts = [
        "we raise an Error here",
        "<script>window.x=1</script> raise",
        "terror, raised",
        "<b>raise</b> a&b",
        "nothing",
    ]
    page = page_result(texts, scorer).html()
    cells = [b for b, _ in sample_cells(page)]
    assert [cell.count("<mark>") for cell in cells] == scorer(texts) == [2, 1, 0, 2, 0]
    assert "we <mark>raise</mark> an <mark>Error</mark> here" in cells[0]
    assert cells[1] == "&lt;script&gt;window.x=1&lt;/script&gt; <mark>raise</mark>"
    assert cells[2] == "terror, raised"  # whole words only, as the scorer counts
    assert cells[3] == "&lt;b&gt;<mark>raise</mark>&lt;/b&gt; <mark>a&amp;b</mark>"
    assert "<script" not in page and page.count("<b>") == 0
    plain = page_result(texts, Scorer("length", lambda ts: [len(t) for t in ts])).html()
    assert "<mark>" not in plain and Scorer("length", lambda ts: [0] * len(ts)).pattern is None


def test_fix_page_bar_charts_have_a_value_axis():
    """Each bar read against its chart's axis labels gives the value it stands for."""
    result = page_result(["a"], load_scorer("words:a"))
    charts = re.findall(r"<svg.*?</svg>", result.html(), re.S)
    assert len(charts) == 3
    for chart, key in zip(charts, ("mean_score", "over_threshold", "perplexity")):
        ticks = [
            (float(y) - 4, float(v))
            for y, v in re.findall(
                r'<text x="[\d.]+" y="([\d.]+)" font-size="10" '
                r'text-anchor="end">([\d.e+-]+)</text>',
                chart,
            )
        ]
        assert len(ticks) >= 2 and ticks[0][1] == 0
        (y0, v0), (y1, v1) = ticks[0], ticks[-1]
        assert v1 >= max(
            result.summary[c][key]["ci"][1] for c in CONDITIONS
        )  # the axis covers every bar and CI
        bars = re.findall(r'<rect x="[\d.]+" y="([\d.]+)" width="[\d.]+" height="[\d.]+"', chart)
        for c, bar_y in zip(CONDITIONS, bars):
            read = v0 + (float(bar_y) - y0) * (v1 - v0) / (y1 - y0)
            assert read == pytest.approx(result.summary[c][key]["value"], abs=0.01 * v1)
            assert f">{result.summary[c][key]['value']:.3g}</text>" in chart  # and says its value
