"""Resumable data streams: one row stream per config, and a buffer that resumes bit for bit.

Every case takes the batches of an uninterrupted buffer, then runs a second buffer for j
batches, saves its state (safetensors + JSON, as a checkpoint would), stops it, and checks
that a fresh buffer built with ``resume=state`` serves exactly the remaining batches.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.activations.cache import MANIFEST
from sae.activations.stream import StreamPosition, activation_batches, activation_source
from sae.config import load_config
from sae.errors import ConfigError

# ~1000 rows per epoch: 16 contexts of 64 tokens in harvest batches of 2 contexts (~125 rows),
# shards of 2 harvest batches; a 128-row buffer serves shares of 2 batches of 32, so every
# second batch ends a share and the next one starts with a refill.
ARGS = [
    "train.batch_tokens=32",
    "harvest.buffer_tokens=128",
    "data.token_budget=1024",
    "data.context_tokens=64",
    "harvest.batch_contexts=2",
    "harvest.cache_shard_tokens=200",
    "hooks=[layers.0,layers.2]",
    "harvest.max_norm_ratio=1.5",
    "train.seed=5",
]


def config(*extra):
    return load_config(None, ARGS + list(extra))


def stream_rows(cfg, model, tok, start=0):
    """The source's rows from ``start`` on, concatenated: {hook: [n, d]}."""
    items = list(activation_source(cfg, model, tok, start))
    return {h: torch.cat([a[h] for a in items]) for h in cfg.hooks}


def round_trip(state, folder):
    """The state written as a checkpoint would write it, and read back: no pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state["tensors"], str(folder / "buffer.safetensors"))
    (folder / "buffer.json").write_text(json.dumps(state["meta"]))
    return {
        "tensors": load_file(str(folder / "buffer.safetensors")),
        "meta": json.loads((folder / "buffer.json").read_text()),
    }


def run_until(cfg, model, tok, j, folder):
    """Serve j batches, save the state, stop the run (generators closed, as on Ctrl-C)."""
    buffer = activation_batches(cfg, model, tok)
    batches = iter(buffer)
    served = [next(batches) for _ in range(j)]
    state = round_trip(buffer.state_dict(), folder)
    batches.close()
    return served, state


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert list(a) == list(b) and all(torch.equal(a[h], b[h]) for h in a)


def partial_cache(cfg, model, tok, items=3):
    """Harvest into cfg's cache_dir and stop after ``items`` harvest batches: an interrupted harvest."""
    for i, _ in enumerate(activation_source(cfg, model, tok)):
        if i == items:
            break
    m = json.loads((Path(cfg.harvest.cache_dir) / MANIFEST).read_text())
    assert not m["complete"] and m["shards"]
    return m


def test_cold_warm_partial_and_no_cache_give_one_row_stream(tiny_llama, tmp_path):
    model, tok = tiny_llama
    plain = stream_rows(config(), model, tok)
    cold = stream_rows(config(f"harvest.cache_dir={tmp_path / 'c'}"), model, tok)
    warm = stream_rows(
        config(f"harvest.cache_dir={tmp_path / 'c'}"), model, tok
    )  # complete now: no model run
    partial_cfg = config(f"harvest.cache_dir={tmp_path / 'p'}")
    partial_cache(partial_cfg, model, tok)
    partial = stream_rows(partial_cfg, model, tok)
    for h in plain:
        assert plain[h].shape[0] > 500
        assert (
            torch.equal(cold[h], plain[h])
            and torch.equal(warm[h], plain[h])
            and torch.equal(partial[h], plain[h])
        )
    # Later epochs: the same stream whether epoch 1 was harvested now or read back.
    two = [f"harvest.cache_dir={tmp_path / 'e'}", "harvest.cache_epochs=2"]
    cold2, warm2 = stream_rows(config(*two), model, tok), stream_rows(config(*two), model, tok)
    n = plain["layers.0"].shape[0]
    for h in plain:
        assert torch.equal(cold2[h], warm2[h]) and torch.equal(cold2[h][:n], plain[h])
        assert not torch.equal(cold2[h][n:], plain[h])  # epoch 2: another shard order
        assert torch.equal(cold2[h][n:].sort(0).values, plain[h].sort(0).values)
    # And so the buffers serve the same batches.
    assert_same_batches(
        list(activation_batches(config(f"harvest.cache_dir={tmp_path / 'c'}"), model, tok)),
        list(activation_batches(config(), model, tok)),
    )


def test_a_source_starts_at_any_row(tiny_llama, tmp_path):
    model, tok = tiny_llama
    cfg = config(f"harvest.cache_dir={tmp_path}", "harvest.cache_epochs=3")
    full = stream_rows(cfg, model, tok)
    n = full["layers.2"].shape[0] // 3
    shards = json.loads((tmp_path / MANIFEST).read_text())["shards"]
    first = shards[0]["tokens"]
    assert len(shards) >= 3 and all("contexts_done" in s for s in shards)
    for start in (1, first - 1, first, first + 1, n - 1, n, n + first + 3, 3 * n - 1):
        rest = stream_rows(cfg, model, tok, start)
        assert all(torch.equal(rest[h], full[h][start:]) for h in full), start
    assert list(activation_source(cfg, model, tok, 3 * n)) == []
    # Without a cache, from a row alone (harvest from context 0) or from a restart point.
    plain = config()
    for start in (
        7,
        StreamPosition(
            rows=first + 50, contexts=shards[0]["contexts_done"], rows_before_contexts=first
        ),
    ):
        rows = start if isinstance(start, int) else start.rows
        rest = stream_rows(plain, model, tok, start)
        assert all(torch.equal(rest[h], full[h][rows:n]) for h in full)


MODES = {
    # name: (extra config, how the cache folder starts out)
    "no cache": ([], None),
    "cold cache, 2 epochs": (["harvest.cache_epochs=2"], "empty"),
    "complete cache, 3 epochs": (["harvest.cache_epochs=3"], "complete"),
    "interrupted harvest, 2 epochs": (["harvest.cache_epochs=2"], "partial"),
}


@pytest.mark.parametrize("mode", MODES)
def test_resumed_buffer_serves_the_uninterrupted_batches(tiny_llama, tmp_path, mode):
    model, tok = tiny_llama
    extra, cache = MODES[mode]
    template = tmp_path / "template"
    if cache == "complete":
        list(activation_source(config(*extra, f"harvest.cache_dir={template}"), model, tok))
    elif cache == "partial":
        partial_cache(config(*extra, f"harvest.cache_dir={template}"), model, tok)

    def cfg_for(name):
        """Each run gets its own copy of the cache as it starts out (runs write to it)."""
        if cache is None:
            return config(*extra)
        if cache != "empty":
            shutil.copytree(template, tmp_path / name)
        return config(*extra, f"harvest.cache_dir={tmp_path / name}")

    full = list(activation_batches(cfg_for("full"), model, tok))
    per_epoch = len(full) // (2 if "2 epochs" in mode else 3 if "3 epochs" in mode else 1)
    assert per_epoch >= 20
    # 0: before the first batch; 2: a share ends (the next batch refills); 3: mid-share;
    # 5: (cold cache) the buffer holds rows the killed run had not yet flushed to a shard;
    # later: in epoch 2, and after the last batch.
    js = sorted(j for j in {0, 2, 3, 5, per_epoch + 5, len(full)} if j <= len(full))
    beyond_cache = []
    for j in js:
        cfg = cfg_for(f"run{j}")
        served, state = run_until(cfg, model, tok, j, tmp_path / f"state{j}")
        assert (
            state["meta"]["tokens_served"] == 32 * j and state["meta"]["position"]["rows"] >= 32 * j
        )
        if cache is not None:
            beyond_cache.append(
                state["meta"]["position"]["rows"]
                > json.loads((tmp_path / f"run{j}" / MANIFEST).read_text())["tokens"]
            )
        rest = list(activation_batches(cfg, model, tok, resume=state))
        assert_same_batches(served + rest, full)
    if cache == "empty":  # resumed both inside the shards written and past them
        assert any(beyond_cache) and not all(beyond_cache)


def test_a_no_cache_run_resumes_a_cold_cache_runs_state(tiny_llama, tmp_path):
    model, tok = tiny_llama
    cached = config(f"harvest.cache_dir={tmp_path / 'c'}")
    full = list(activation_batches(cached, model, tok))
    served, state = run_until(cached, model, tok, 7, tmp_path / "state")
    assert state["meta"]["position"]["contexts"] > 0  # a harvest restart point, not context 0
    assert_same_batches(served + list(activation_batches(config(), model, tok, resume=state)), full)


def test_a_state_of_another_stream_or_size_is_refused(tiny_llama, tmp_path):
    model, tok = tiny_llama
    _, state = run_until(config(), model, tok, 3, tmp_path / "state")
    new_cache = tmp_path / "untouched"
    with pytest.raises(
        ConfigError, match=r"^resume: .*another data stream \(seed: saved state has 5, this run 6\)"
    ):
        activation_batches(
            config("train.seed=6", f"harvest.cache_dir={new_cache}"), model, tok, resume=state
        )
    assert not new_cache.exists()  # refused before a cache folder was made
    text = tmp_path / "other.txt"
    text.write_text("Some other text, long enough to fill a context or two. " * 200)
    with pytest.raises(
        ConfigError, match=r"^resume: .*another data stream \(dataset\.dataset: saved state has"
    ):
        activation_batches(config(f"data.dataset={text}"), model, tok, resume=state)
    with pytest.raises(
        ConfigError,
        match=r"^resume: the saved buffer has other sizes \(capacity_tokens: saved state has 128",
    ):
        activation_batches(config("harvest.buffer_tokens=256"), model, tok, resume=state)
    with pytest.raises(ConfigError, match=r"^resume: the saved buffer state is not a format-1"):
        activation_batches(config(), model, tok, resume={"tensors": {}, "meta": {"format": 99}})
