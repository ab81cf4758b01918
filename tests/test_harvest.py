"""The harvester: the right rows, masking, early stop, budget, resume, bad input."""

import datasets
import pytest
import torch

from sae.activations.capture import MaskedCapture, check_context_length
from sae.activations.harvest import Harvester
from sae.data.text import context_batches
from sae.errors import ConfigError

TEXTS = [
    f"Document {i}: the quick brown fox jumps over {i} lazy dogs. " * (1 + i % 4) for i in range(40)
]


@pytest.fixture(scope="module")
def dataset():
    return datasets.Dataset.from_dict({"text": TEXTS})


def contexts_of(dataset, tokenizer, **kw):
    kw.setdefault("context_tokens", 16)
    return list(context_batches(dataset, tokenizer, **kw))


def test_rows_are_the_non_special_hidden_states(tiny_llama, dataset):
    model, tok = tiny_llama
    batches = contexts_of(dataset, tok, batch_contexts=4, token_budget=16 * 8)
    rows = torch.cat([b["layers.1"] for b in Harvester(model, tok, batches, ["layers.1"])])
    ids = torch.cat(batches)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    assert (
        special[:, 0].all() and special.sum() > ids.shape[0]
    )  # BOS per context plus EOS separators
    torch.testing.assert_close(rows, ref[~special])


def test_capture_keeps_the_attended_non_special_positions(tiny_llama):
    """MaskedCapture's keep mask against one made from the token ids and the attention mask;
    its logits, when the forward runs to the end, against the model's own."""
    model, tok = tiny_llama
    ids = torch.randint(3, 500, (3, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = tok.bos_token_id
    ids[1, 5] = tok.eos_token_id
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    text = torch.tensor([[t not in tok.all_special_ids for t in row] for row in ids.tolist()])
    (early,) = MaskedCapture(model, tok, ["layers.1"]).batches([ids])
    (full,) = MaskedCapture(model, tok, ["layers.1"], stop_early=False).batches([(ids, mask)])
    assert torch.equal(early.keep, text) and early.output is None
    assert torch.equal(full.keep, text & (mask == 1)) and full.keep.sum() == 3 * 12 - 3 - 1 - 4
    with torch.no_grad():
        torch.testing.assert_close(
            full.output.logits, model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0
        )


def test_counters_and_token_budget(tiny_llama, dataset):
    model, tok = tiny_llama
    batches = contexts_of(
        dataset, tok, batch_contexts=3, token_budget=100
    )  # ceil(100/16) = 7 contexts
    assert [b.shape for b in batches] == [(3, 16), (3, 16), (1, 16)]
    h = Harvester(model, tok, batches, ["layers.0"])
    n_rows = sum(b["layers.0"].shape[0] for b in h)
    assert (h.contexts_done, h.tokens_seen, h.tokens_kept) == (7, 112, n_rows)


def test_skip_contexts_resumes_the_same_stream(tiny_llama, dataset):
    _, tok = tiny_llama
    full = torch.cat(contexts_of(dataset, tok, batch_contexts=4, token_budget=16 * 10))
    rest = torch.cat(
        contexts_of(dataset, tok, batch_contexts=4, token_budget=16 * 10, skip_contexts=3)
    )
    assert torch.equal(rest, full[3:])


def test_norm_filter_drops_outliers_at_every_hook_together(tiny_llama, dataset):
    model, tok = tiny_llama
    batches = contexts_of(dataset, tok, batch_contexts=4, token_budget=16 * 4)
    plain = list(Harvester(model, tok, batches, ["layers.0", "layers.1"]))
    filtered = list(Harvester(model, tok, batches, ["layers.0", "layers.1"], max_norm_ratio=1.05))
    assert filtered[0]["layers.0"].shape[0] == filtered[0]["layers.1"].shape[0]
    assert 0 < filtered[0]["layers.0"].shape[0] < plain[0]["layers.0"].shape[0]
    for name in ("layers.0", "layers.1"):
        median = plain[0][name].norm(dim=-1).median()
        assert (filtered[0][name].norm(dim=-1) <= 1.05 * median + 1e-6).all()


def test_prefetch_gives_the_same_rows(tiny_llama, dataset):
    model, tok = tiny_llama
    make = lambda: context_batches(
        dataset, tok, context_tokens=16, batch_contexts=2, token_budget=16 * 6
    )
    a = [b["layers.0"] for b in Harvester(model, tok, make(), ["layers.0"])]
    b = [b["layers.0"] for b in Harvester(model, tok, make(), ["layers.0"], prefetch=True)]
    assert len(a) == len(b) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))


def test_prefetch_reraises_producer_errors(tiny_llama):
    model, tok = tiny_llama

    def broken():
        yield torch.full((1, 8), 5)
        raise RuntimeError("tokenizer exploded")

    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        list(Harvester(model, tok, broken(), ["layers.0"], prefetch=True))


def test_early_stop_leaves_the_head_unrun(tiny_llama):
    model, tok = tiny_llama
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    try:
        list(Harvester(model, tok, [torch.randint(3, 100, (2, 8))], ["layers.2"]))
    finally:
        handle.remove()
    assert calls == []


def test_bad_input_is_one_line(tiny_llama, dataset):
    model, tok = tiny_llama
    with pytest.raises(ConfigError, match="every one of 16 tokens was masked"):
        list(Harvester(model, tok, [torch.full((2, 8), tok.bos_token_id)], ["layers.0"]))
    empty = datasets.Dataset.from_dict({"text": ["", ""]})
    with pytest.raises(ConfigError, match="no complete context"):
        list(Harvester(model, tok, context_batches(empty, tok, context_tokens=16), ["layers.0"]))
    with pytest.raises(
        ConfigError,
        match=r"data.context_tokens: 4096 is longer than this model allows; use at most 512",
    ):
        check_context_length(model, 4096)
    with pytest.raises(ConfigError, match="out of range"):
        Harvester(model, tok, [], ["layers.9"])


def test_streaming_gives_the_same_contexts(tiny_llama, tmp_path):
    _, tok = tiny_llama
    from sae.data.text import load_text_dataset

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"text": "{t}"}}\n' for t in TEXTS))
    kw = dict(context_tokens=16, batch_contexts=5, token_budget=16 * 12)
    eager = torch.cat(list(context_batches(load_text_dataset(str(path)), tok, **kw)))
    streamed = torch.cat(
        list(context_batches(load_text_dataset(str(path), streaming=True), tok, **kw))
    )
    assert eager.shape == (12, 16) and torch.equal(eager, streamed)
