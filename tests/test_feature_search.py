"""Contrast search and by-text search: statistics against brute force, batching
invariance, and on the demo model a contrast that finds its concept."""

import json

import pytest
import torch

from sae.analysis.feature_search import (
    auroc,
    contrast,
    contrast_search,
    features_in_text,
    prompt_scores,
    read_prompts,
    token_latents,
)
from sae.analysis.target import open_target
from sae.config import sae_config
from sae.errors import ConfigError
from sae.models.generation import prompt_token_ids
from sae.training.trainer import make_sae

PROMPTS = "configs/prompts"


def test_auroc_matches_pairwise_counting_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (13, 7), generator=g).float()
    b = torch.randint(0, 4, (9, 7), generator=g).float()
    pairs = (a[:, None, :] > b[None, :, :]).double() + 0.5 * (
        a[:, None, :] == b[None, :, :]
    ).double()
    torch.testing.assert_close(auroc(a, b), pairs.mean((0, 1)))


def test_contrast_statistics():
    a = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0], [0.0, 1.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 2.0], [0.0, 2.0, 2.0]])
    r = contrast(a, b)
    torch.testing.assert_close(r.mean_a, torch.tensor([4 / 3, 1 / 3, 2.0]))
    torch.testing.assert_close(r.fire_a, torch.tensor([2 / 3, 1 / 3, 1.0]))
    torch.testing.assert_close(r.fire_b, torch.tensor([0.0, 0.5, 1.0]))
    pooled = ((2 * a[:, 0].var() + 1 * b[:, 0].var()) / 3).sqrt()
    assert r.effect[0].item() == pytest.approx((4 / 3 / pooled).item(), rel=1e-5)
    assert r.auroc[2].item() == 0.5 and r.effect[2].item() == 0.0
    assert r.ranking("effect")[0] == 0 and r.ranking("effect", higher_in="b")[0] == 1
    with pytest.raises(ConfigError, match="'size' is not valid"):
        r.ranking("size")


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  second  \n")
    assert read_prompts(tmp_path / "p.txt") == ["first prompt", "second"]
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"text": "a b"}) + "\n" + json.dumps({"text": "<b>c</b>"}) + "\n"
    )
    assert read_prompts(tmp_path / "p.jsonl") == ["a b", "<b>c</b>"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt", "--target")
    with pytest.raises(ConfigError, match="--baseline: .* is not a file"):
        read_prompts(tmp_path / "missing.txt", "--baseline")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match='line 1 .* "text" field'):
        read_prompts(tmp_path / "bad.jsonl")


@pytest.fixture(scope="module")
def tiny_target(tiny_llama, tmp_path_factory):
    model, tok = tiny_llama
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sae") / "layers.1"
    make_sae(sae_config("topk", num_latents=48, k=6), 64).save(
        folder, metadata={"hook_name": "layers.1", "model_name": "tiny"}
    )
    return open_target(folder, model=model, tokenizer=tok)


def test_batched_prompts_score_as_if_alone(tiny_target):
    """Right padding in a batch changes nothing: each prompt's latents equal a batch of one."""
    prompts = ["a short one", "a much longer prompt with many more tokens in it", "mid length text"]
    together = token_latents(tiny_target, prompts, batch_size=3)
    for p, z in zip(prompts, together):
        alone = token_latents(tiny_target, [p], batch_size=1)[0]
        assert z.shape[0] == len(prompt_token_ids(tiny_target.tokenizer, p))
        torch.testing.assert_close(z, alone, rtol=1e-4, atol=1e-5)
        assert (z[0] == 0).all()  # BOS never counts
    scores = prompt_scores(tiny_target, prompts, "mean")
    torch.testing.assert_close(scores[1], together[1][1:].mean(0).cpu())


def test_text_search_focus_covers_the_substring(tiny_target):
    hits = features_in_text(tiny_target, "the file was not found", focus="not found", top=5)
    assert "".join(hits.tokens[i] for i in hits.focus).strip() == "not found"
    z = token_latents(tiny_target, ["the file was not found"])[0]
    best = z[hits.focus].max(0).values
    assert [f for f, _ in hits.ranking] == best.topk(5).indices[best.topk(5).values > 0].tolist()
    with pytest.raises(ConfigError, match="'missing' does not occur"):
        features_in_text(tiny_target, "the file", focus="missing")


def test_open_target_refuses_an_sae_of_another_width(tiny_llama, tmp_path):
    model, tok = tiny_llama
    make_sae(sae_config("topk", num_latents=32, k=4), 48).save(
        tmp_path / "s", metadata={"hook_name": "layers.1"}
    )
    with pytest.raises(ConfigError, match="takes inputs of width 48, but layers.1 .* has width 64"):
        open_target(tmp_path / "s", model=model, tokenizer=tok)
    make_sae(sae_config("topk", num_latents=32, k=4), 64).save(tmp_path / "nohook")
    with pytest.raises(ConfigError, match="names no hook point .* pass --hook"):
        open_target(tmp_path / "nohook", model=model, tokenizer=tok)


CONCEPT = (" raised", " raises", " exception", "Error")


def test_contrast_on_the_demo_finds_the_concept_feature(demo_sae_run):
    """The two shipped prompt sets differ only in whether an exception is raised: a top
    contrast feature fires, on most target prompts, on a token of that concept."""
    target = open_target(demo_sae_run)
    a, b = (
        read_prompts(f"{PROMPTS}/demo_raised.txt"),
        read_prompts(f"{PROMPTS}/demo_not_raised.txt"),
    )
    result = contrast_search(target, a, b, progress=False)
    latents = token_latents(target, a)

    def concept_share(f):
        hits = 0
        for p, z in zip(a, latents):
            i = int(z[:, f].argmax())
            hits += z[i, f] > 0 and target.tokenizer.decode(
                [prompt_token_ids(target.tokenizer, p)[i]]
            ).endswith(CONCEPT)
        return hits / len(a)

    top3 = result.ranking("effect")[:3]
    shares = {f: concept_share(f) for f in top3}
    assert max(shares.values()) >= 0.8, shares
    assert result.auroc[top3[0]] > 0.8


def test_prompt_set_from_a_dataset_with_nested_fields_and_a_filter(tmp_path):
    rows = [
        {"prompt": {"text": f"prompt {i}", "toxicity": i / 10}, "challenging": i % 2 == 0}
        for i in range(10)
    ]
    rows.append({"prompt": {"text": "no score", "toxicity": None}, "challenging": True})
    (tmp_path / "rtp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / "toxic.yaml"
    spec.write_text(
        f"dataset: {tmp_path / 'rtp.jsonl'}\nfield: prompt.text\nwhere: prompt.toxicity >= 0.5\nlimit: 3\n"
    )
    assert read_prompts(spec) == ["prompt 5", "prompt 6", "prompt 7"]
    spec.write_text(
        f"dataset: {tmp_path / 'rtp.jsonl'}\nfield: prompt.text\nwhere: challenging == true\n"
    )
    assert read_prompts(spec) == [
        "prompt 0",
        "prompt 2",
        "prompt 4",
        "prompt 6",
        "prompt 8",
        "no score",
    ]
    spec.write_text(
        f"dataset: {tmp_path / 'rtp.jsonl'}\nfield: prompt.text\nwhere: prompt.toxicity ~ 1\n"
    )
    with pytest.raises(ConfigError, match="is not FIELD OP NUMBER"):
        read_prompts(spec)
    spec.write_text(f"dataset: {tmp_path / 'rtp.jsonl'}\nfeild: prompt.text\n")
    with pytest.raises(ConfigError, match="unknown: feild"):
        read_prompts(spec)
    spec.write_text(
        f"dataset: {tmp_path / 'rtp.jsonl'}\nfield: prompt.text\nwhere: prompt.toxicity > 5\n"
    )
    with pytest.raises(ConfigError, match="no row of"):
        read_prompts(spec)
