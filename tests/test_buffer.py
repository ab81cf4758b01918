"""The shuffling buffer: every row served once, hooks aligned, mixed, memory bounded."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.activations.buffer import ShuffleBuffer


def source(n_batches=20, rows=50, d=6, start_row=0):
    """Rows numbered 0.. in column 0; hook 'b' is hook 'a' times -2 (to check alignment).
    ``start_row`` drops the rows before it (a source restarted mid-item)."""
    for i in range(n_batches):
        a = torch.arange(i * rows, (i + 1) * rows, dtype=torch.float32)[:, None].repeat(1, d)
        a = a[max(0, start_row - i * rows) :]
        if len(a):
            yield {"a": a, "b": -2 * a}


def test_each_row_served_exactly_once_and_hooks_stay_aligned():
    batches = list(ShuffleBuffer(source(), capacity_tokens=300, batch_tokens=40, seed=1))
    assert all(b["a"].shape == (40, 6) for b in batches)
    served = torch.cat([b["a"][:, 0] for b in batches])
    assert len(served) == 1000 // 40 * 40  # only the last incomplete batch is dropped
    assert len(set(served.tolist())) == len(served) and set(served.tolist()) <= set(range(1000))
    for b in batches:
        torch.testing.assert_close(b["b"], -2 * b["a"])


def test_batches_mix_many_source_batches():
    first = next(iter(ShuffleBuffer(source(), capacity_tokens=500, batch_tokens=50, seed=0)))
    origins = (first["a"][:, 0] // 50).long().unique()
    assert len(origins) >= 6  # rows from at least 6 of the 10 source batches held
    served = torch.cat([b["a"][:, 0] for b in ShuffleBuffer(source(), 500, 50, seed=0)])
    assert not torch.equal(served, served.sort().values)


def test_same_seed_same_order_other_seed_other_order():
    run = lambda seed: torch.cat(
        [b["a"][:, 0] for b in ShuffleBuffer(source(), 200, 25, seed=seed)]
    )
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_source_smaller_than_capacity_is_served_whole():
    served = torch.cat([b["a"][:, 0] for b in ShuffleBuffer(source(n_batches=2), 1000, 10)])
    assert sorted(served.tolist()) == list(range(100))


def test_storage_is_exactly_the_configured_size():
    buf = ShuffleBuffer(source(), capacity_tokens=300, batch_tokens=40)
    next(iter(buf))
    assert buf.nbytes() == 2 * 300 * 6 * 4


def test_a_buffer_is_iterated_once():
    buf = ShuffleBuffer(source(n_batches=2), 100, 10)
    list(buf)
    with pytest.raises(RuntimeError, match="iterated once"):
        list(buf)


def test_buffer_too_large_for_memory_is_one_line():
    from sae.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"harvest.buffer_tokens: cannot allocate .* GiB\) on cpu"
    ):
        list(ShuffleBuffer(source(), capacity_tokens=10**13, batch_tokens=10))


def test_bad_sizes_refused():
    with pytest.raises(ValueError):
        ShuffleBuffer(source(), capacity_tokens=10, batch_tokens=20)


def round_trip(state, folder):
    """Through safetensors + JSON, as a checkpoint stores it."""
    save_file(state["tensors"], str(folder / "s.safetensors"))
    (folder / "s.json").write_text(json.dumps(state["meta"]))
    return {
        "tensors": load_file(str(folder / "s.safetensors")),
        "meta": json.loads((folder / "s.json").read_text()),
    }


@pytest.mark.parametrize("refill_fraction", [0.5, 0.3, 1.0])
def test_resumed_buffer_serves_the_same_batches_bit_for_bit(tmp_path, refill_fraction):
    kw = dict(capacity_tokens=300, batch_tokens=40, refill_fraction=refill_fraction, seed=7)
    full = list(ShuffleBuffer(source(), **kw))
    for j in range(len(full) + 1):  # every cut, refill boundaries and the end included
        buf = ShuffleBuffer(source(), **kw)
        batches = iter(buf)
        for _ in range(j):
            next(batches)
        state = round_trip(buf.state_dict(), tmp_path)
        rows = state["meta"]["position"]["rows"]
        resumed = ShuffleBuffer(source(start_row=rows), **kw, resume=state)
        rest = list(resumed)
        assert len(rest) == len(full) - j and resumed.tokens_served == len(full) * 40
        for got, want in zip(rest, full[j:]):
            assert torch.equal(got["a"], want["a"]) and torch.equal(got["b"], want["b"])


def test_state_holds_only_what_is_needed(tmp_path):
    buf = ShuffleBuffer(source(), capacity_tokens=300, batch_tokens=40, seed=1)
    batches = iter(buf)
    next(batches)  # 300 placed, a share of 3 batches drawn, 1 served
    t, meta = buf.state_dict()["tensors"], buf.state_dict()["meta"]
    assert (
        t["occupied"].sum() == 260 and t["rows.a"].shape == (260, 6) and t["order"].shape == (80,)
    )
    assert t["occupied"][t["order"]].all() and t["generator"].dtype == torch.uint8
    assert (
        meta["position"] == {"rows": 300}
        and meta["tokens_served"] == 40
        and meta["hooks"] == ["a", "b"]
    )
    json.dumps(meta)
    assert sorted(round_trip(buf.state_dict(), tmp_path)["tensors"]) == sorted(t)


def test_resume_checks_sizes_fingerprint_source_and_damage(tmp_path):
    from sae.errors import ConfigError

    buf = ShuffleBuffer(source(), 300, 40, fingerprint={"seed": 1})
    next(iter(buf))
    state = round_trip(buf.state_dict(), tmp_path)
    with pytest.raises(
        ConfigError, match=r"another data stream \(seed: saved state has 1, this run 2\)"
    ):
        ShuffleBuffer(source(start_row=300), 300, 40, fingerprint={"seed": 2}, resume=state)
    with pytest.raises(
        ConfigError, match=r"other sizes \(batch_tokens: saved state has 40, this run 30\)"
    ):
        ShuffleBuffer(source(start_row=300), 300, 30, fingerprint={"seed": 1}, resume=state)
    damaged = {
        "tensors": {**state["tensors"], "occupied": state["tensors"]["occupied"][:10]},
        "meta": state["meta"],
    }
    with pytest.raises(ConfigError, match=r"resume: the saved buffer state is damaged \(occupied"):
        ShuffleBuffer(source(start_row=300), 300, 40, fingerprint={"seed": 1}, resume=damaged)

    class Source:  # a source that says where it starts is checked against the state
        start_row = 0

        def __iter__(self):
            return source()

    with pytest.raises(ValueError, match="starts at row 0, the state at row 300"):
        ShuffleBuffer(Source(), 300, 40, fingerprint={"seed": 1}, resume=state)


PEAK_SCRIPT = r"""
import json, resource, sys, torch
from sae.activations.buffer import ShuffleBuffer
torch.set_num_threads(1)
def peak_kib():  # VmHWM: the process's peak resident memory
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
def src():
    for _ in range(60):
        yield {"x": torch.randn(4096, 512)}   # 8 MiB per source batch
torch.randn(4096, 512)  # warm up the allocator before measuring
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM
base = peak_kib()
buf = ShuffleBuffer(src(), capacity_tokens=65536, batch_tokens=4096)  # 128 MiB of storage
for batch in buf:
    pass
print(json.dumps({"peak_growth_kib": peak_kib() - base, "storage_kib": buf.nbytes() // 1024}))
"""


@pytest.mark.slow
def test_peak_host_memory_stays_within_size_plus_margin():
    # Large allocations go to mmap so that freed memory leaves the process: we measure what
    # the buffer holds, not how long glibc keeps freed heap pages (see BENCHMARKS.md).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    if result.returncode != 0 and "clear_refs" in result.stderr:
        pytest.skip("cannot reset the peak-memory counter here")
    assert result.returncode == 0, result.stderr
    m = json.loads(result.stdout)
    # storage + one pending source batch + one served batch + the batch being generated: ~32 MiB
    assert m["peak_growth_kib"] <= m["storage_kib"] + 48 * 1024, m


def bar_renders(err, desc):
    """(n, total) of each state of the tqdm bar ``desc`` drawn to ``err`` (counts below 1000,
    which tqdm writes as plain integers)."""
    import re

    return [
        tuple(map(int, m.groups())) for m in re.finditer(rf"{desc}:[^\r\n]*?\| *(\d+)/(\d+) ", err)
    ]


def test_the_fill_before_the_first_batch_shows_a_bar_up_to_the_capacity_then_clears_it(capsys):
    batches = iter(
        ShuffleBuffer(source(), capacity_tokens=300, batch_tokens=40, seed=1, progress=True)
    )
    next(batches)
    err = capsys.readouterr().err
    counts = bar_renders(err, "filling shuffle buffer")
    assert counts and counts[-1] == (300, 300)  # the final count drawn: the buffer is full
    assert all(total == 300 for _, total in counts) and [n for n, _ in counts] == sorted(
        n for n, _ in counts
    )
    assert "\n" not in err and err.endswith("\r")  # closed and wiped: it leaves no line behind
    list(batches)  # later refills happen under training's own bar: no second bar
    assert capsys.readouterr().err == ""


def test_the_fill_bar_stops_where_a_short_source_ends_and_is_off_by_default(capsys):
    next(iter(ShuffleBuffer(source(n_batches=2), 900, 10, progress=True)))
    assert bar_renders(capsys.readouterr().err, "filling shuffle buffer")[-1] == (
        100,
        900,
    )  # 2 x 50 rows
    list(ShuffleBuffer(source(), 300, 40))
    assert capsys.readouterr().err == ""
