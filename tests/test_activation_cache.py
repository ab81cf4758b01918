"""The activation cache: round trip, resume after interruption, refusals, disk errors."""

import json

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sae.activations import cache as activation_cache
from sae.activations.cache import MANIFEST, CacheReader, CacheWriter
from sae.activations.stream import activation_source
from sae.config import load_config
from sae.errors import ConfigError, DataError

IDENTITY = {"model": "m", "hooks": ["a", "b"], "dtype": "float32", "width": 4}


def batches(n=10, rows=7):
    for i in range(n):
        a = torch.arange(i * rows, (i + 1) * rows, dtype=torch.float32)[:, None].repeat(1, 4)
        yield {"a": a, "b": a + 0.5}


def write(folder, source, shard_tokens=20, stop_after=None):
    w = CacheWriter(folder, IDENTITY, shard_tokens)
    for i, acts in enumerate(source):
        if stop_after is not None and i == stop_after:
            raise KeyboardInterrupt
        w.add(acts, contexts_done=i + 1)
    w.finish()
    return w


def rows_of(reader):
    return torch.cat([s["a"][:, 0] for s in reader]).sort().values


def test_round_trip_keeps_every_row_and_writes_a_manifest(tmp_path):
    write(tmp_path, batches())
    m = json.loads((tmp_path / MANIFEST).read_text())
    assert (
        m["complete"]
        and m["tokens"] == 70
        and m["contexts_done"] == 10
        and m["identity"] == IDENTITY
    )
    assert sum(s["tokens"] for s in m["shards"]) == 70 and all(
        s["tokens"] >= 20 for s in m["shards"][:-1]
    )
    reader = CacheReader(tmp_path, identity=IDENTITY)
    assert torch.equal(rows_of(reader), torch.arange(70, dtype=torch.float32))
    for shard in reader:
        torch.testing.assert_close(shard["b"], shard["a"] + 0.5)  # hooks aligned


def test_interrupted_run_resumes_to_the_same_cache(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    write(full, batches())
    with pytest.raises(KeyboardInterrupt):
        write(cut, batches(), stop_after=6)
    w = CacheWriter(cut, IDENTITY, 20)
    assert not w.complete and w.contexts_done == 6  # shards hold 3+3 batches; batch 6 was lost
    remaining = list(batches())[w.contexts_done :]
    for i, acts in enumerate(remaining, start=w.contexts_done):
        w.add(acts, contexts_done=i + 1)
    w.finish()
    assert torch.equal(rows_of(CacheReader(cut)), rows_of(CacheReader(full)))


def test_half_written_shard_is_never_read(tmp_path):
    write(tmp_path, batches(n=3), shard_tokens=7)
    m = json.loads((tmp_path / MANIFEST).read_text())
    m["complete"] = False
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    (tmp_path / ".shard-00003.safetensors.tmp").write_bytes(b"\x00" * 10)  # a crash mid-write
    w = CacheWriter(tmp_path, IDENTITY)
    assert not (tmp_path / ".shard-00003.safetensors.tmp").exists()
    w.finish()
    assert torch.equal(rows_of(CacheReader(tmp_path)), torch.arange(21, dtype=torch.float32))


def test_other_runs_and_incomplete_caches_are_refused(tmp_path):
    write(tmp_path / "c", batches(n=2))
    with pytest.raises(
        ConfigError, match=r"another run \(model: cache has 'm', this run 'other'\)"
    ):
        CacheWriter(tmp_path / "c", {**IDENTITY, "model": "other"})
    with pytest.raises(ConfigError, match="hooks: 'z' is not in the cache"):
        CacheReader(tmp_path / "c", hooks=["z"])
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "i", batches(), stop_after=4)
    with pytest.raises(ConfigError, match="incomplete"):
        CacheReader(tmp_path / "i")
    with pytest.raises(ConfigError, match="holds no manifest.json"):
        CacheReader(tmp_path / "nothing")


def test_full_disk_is_one_line_and_keeps_the_cache_resumable(tmp_path, monkeypatch):
    w = CacheWriter(tmp_path, IDENTITY, shard_tokens=7)
    w.add(next(batches()), contexts_done=1)

    def no_space(tensors, filename, metadata=None):  # as safetensors reports a full disk
        open(filename, "wb").write(b"partial")
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(
        ConfigError,
        match=r"cannot write shard-00001.safetensors .*No space left on device.*keeps its 7 tokens",
    ):
        w.add(next(batches()), contexts_done=2)
    w.close()  # as the run's end does: the lock file goes too
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "shard-00000.safetensors"]
    assert CacheWriter(tmp_path, IDENTITY).contexts_done == 1


def test_unwritable_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="harvest.cache_dir: cannot create"):
        CacheWriter(tmp_path / "file" / "cache", IDENTITY)


def test_epoch_one_is_harvest_order_and_later_epochs_reshuffle(tmp_path):
    write(tmp_path, batches(n=10), shard_tokens=7)
    firsts = [s["a"][0, 0].item() for s in CacheReader(tmp_path, epochs=3, seed=0)]
    assert firsts[:10] == [7.0 * i for i in range(10)]  # manifest order: as harvested
    assert (
        len(firsts) == 30
        and sorted(firsts[10:20]) == sorted(firsts[:10])
        and firsts[10:20] != firsts[:10]
    )
    assert firsts[20:] != firsts[10:20]
    # An epoch's order depends on (seed, epoch) only: a reader can enter any epoch directly.
    assert activation_cache.shard_order(10, 0, 3) == [int(f) // 7 for f in firsts[20:]]
    assert activation_cache.shard_order(10, 1, 2) != activation_cache.shard_order(10, 0, 2)


def test_reader_starts_at_any_row_and_says_where_a_harvest_would_restart(tmp_path):
    write(tmp_path, batches(n=10), shard_tokens=14)  # 5 shards of 2 batches = 14 rows, 2 contexts
    full = torch.cat([s["a"][:, 0] for s in CacheReader(tmp_path, epochs=2, seed=3)])
    for start in (0, 1, 13, 14, 15, 69, 70, 71, 139, 140):
        reader = CacheReader(tmp_path, epochs=2, seed=3, start_row=start)
        got = [s["a"][:, 0] for s in reader]
        assert torch.equal(torch.cat(got) if got else torch.empty(0), full[start:]), start
    reader = CacheReader(tmp_path, start_row=30)
    starts = []
    for shard in reader:  # noqa: B007 (the last one is checked below)
        starts.append(reader.item_start)
    assert shard["a"][0, 0] == 56  # the last shard, rows 56..69
    assert starts == [
        {"contexts": 4, "rows_before_contexts": 28},
        {"contexts": 6, "rows_before_contexts": 42},
        {"contexts": 8, "rows_before_contexts": 56},
    ]
    assert [
        s["contexts_done"] for s in json.loads((tmp_path / MANIFEST).read_text())["shards"]
    ] == [2, 4, 6, 8, 10]


def test_cache_without_per_shard_context_counts_still_reads(tmp_path):
    write(tmp_path, batches(n=4), shard_tokens=7)
    m = json.loads((tmp_path / MANIFEST).read_text())
    for shard in m["shards"]:
        del shard["contexts_done"]  # as written before shards recorded it
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    reader = CacheReader(tmp_path, start_row=10)
    assert torch.equal(
        torch.cat([s["a"][:, 0] for s in reader]), torch.arange(10, 28, dtype=torch.float32)
    )
    assert reader.item_start == {"contexts": None, "rows_before_contexts": None}


def test_config_pipeline_writes_then_reads_without_the_model(tiny_llama, tmp_path, monkeypatch):
    model, tok = tiny_llama
    cfg = load_config(
        None,
        [
            "train.batch_tokens=128",
            "data.token_budget=2048",
            "data.context_tokens=64",
            "hooks=[layers.0,layers.1]",
            f"harvest.cache_dir={tmp_path}",
            "harvest.cache_shard_tokens=300",
        ],
    )
    first = [acts for acts in activation_source(cfg, model, tok)]
    harvested = torch.cat([a["layers.1"] for a in first])
    shards = json.loads((tmp_path / MANIFEST).read_text())["shards"]
    assert len(shards) > 1 and sum(s["tokens"] for s in shards) == harvested.shape[0]
    on_disk = torch.cat([load_file(tmp_path / s["file"])["layers.1"] for s in shards])
    assert torch.equal(on_disk, harvested)

    def model_must_not_run(*a, **k):
        raise AssertionError("the model ran although the cache is complete")

    monkeypatch.setattr(model, "forward", model_must_not_run)
    again = torch.cat([a["layers.1"] for a in activation_source(cfg, model, tok)])
    assert torch.equal(again, harvested)  # epoch 1 of a complete cache comes in harvest order too


def test_interrupted_pipeline_resumes_to_the_uninterrupted_cache(tiny_llama, tmp_path):
    model, tok = tiny_llama
    args = [
        "train.batch_tokens=128",
        "data.token_budget=4096",
        "data.context_tokens=64",
        "harvest.batch_contexts=4",
        "harvest.cache_shard_tokens=500",
        "harvest.prefetch=false",
    ]
    straight = load_config(None, args + [f"harvest.cache_dir={tmp_path / 'straight'}"])
    list(activation_source(straight, model, tok))
    resumed = load_config(None, args + [f"harvest.cache_dir={tmp_path / 'resumed'}"])
    for i, _ in enumerate(activation_source(resumed, model, tok)):
        if i == 6:
            break  # Ctrl-C: the generator closes without finishing the cache
    partial = json.loads((tmp_path / "resumed" / MANIFEST).read_text())
    assert not partial["complete"] and 0 < partial["contexts_done"] < 64
    served = torch.cat([a["layers.2"] for a in activation_source(resumed, model, tok)])

    def rows(folder):
        m = json.loads((folder / MANIFEST).read_text())
        assert m["complete"] and m["contexts_done"] == 64
        return torch.cat([load_file(folder / s["file"])["layers.2"] for s in m["shards"]])

    assert torch.equal(rows(tmp_path / "resumed"), rows(tmp_path / "straight"))
    # the resumed run trains on the whole budget: the shards written before, then the rest
    assert torch.equal(served.sort(0).values, rows(tmp_path / "straight").sort(0).values)


def test_epochs_after_a_fresh_harvest_read_the_cache(tiny_llama, tmp_path):
    model, tok = tiny_llama
    cfg = load_config(
        None,
        [
            "train.batch_tokens=128",
            "data.token_budget=1024",
            "data.context_tokens=64",
            f"harvest.cache_dir={tmp_path}",
            "harvest.cache_epochs=3",
        ],
    )
    rows = torch.cat([a["layers.2"] for a in activation_source(cfg, model, tok)])
    once = torch.cat(
        [
            load_file(tmp_path / s["file"])["layers.2"]
            for s in json.loads((tmp_path / MANIFEST).read_text())["shards"]
        ]
    )
    assert torch.equal(rows.sort(0).values, once.repeat(3, 1).sort(0).values)


def test_resume_after_the_last_shard_serves_the_cache_and_finishes(tiny_llama, tmp_path):
    model, tok = tiny_llama
    cfg = load_config(
        None,
        [
            "train.batch_tokens=128",
            "data.token_budget=1024",
            "data.context_tokens=64",
            f"harvest.cache_dir={tmp_path}",
        ],
    )
    first = torch.cat([a["layers.2"] for a in activation_source(cfg, model, tok)])
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(
        json.dumps({**manifest, "complete": False})
    )  # killed before finish()
    again = torch.cat([a["layers.2"] for a in activation_source(cfg, model, tok)])
    assert torch.equal(
        again.sort(0).values, first.sort(0).values
    )  # every row served again, none twice
    assert json.loads((tmp_path / MANIFEST).read_text()) == manifest


def test_corrupt_manifest_is_refused_in_one_line(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ConfigError, match="is not a format-1 activation cache manifest"):
        CacheWriter(tmp_path, IDENTITY)
    (tmp_path / MANIFEST).write_text('{"some": "other tool"}')
    with pytest.raises(ConfigError, match="is not a format-1 activation cache manifest"):
        CacheReader(tmp_path)


def test_tokenizer_fingerprint_ignores_per_call_padding_state(tiny_llama):
    _, tok = tiny_llama
    before = activation_cache.tokenizer_fingerprint(tok)
    tok(["hello world"], truncation=True, max_length=5, padding="max_length")
    assert activation_cache.tokenizer_fingerprint(tok) == before


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_shard_is_harvested_again_from_where_it_starts(tmp_path, damage):
    full, hurt = tmp_path / "full", tmp_path / "hurt"
    write(full, batches())
    write(hurt, batches())
    shard = hurt / "shard-00001.safetensors"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-9])
    else:
        shard.unlink()
    with pytest.raises(
        ConfigError, match=r"shard-00001.safetensors in .* is damaged \(.*\); delete that file"
    ):
        CacheReader(hurt)  # a reader alone says which shard, before reading any
    said = []
    w = CacheWriter(hurt, IDENTITY, 20, log=said.append)
    assert len(said) == 1 and "shard-00001.safetensors" in said[0] and "keeps 1 shard" in said[0]
    assert not w.complete and w.contexts_done == 3  # shard 0 held batches 0-2
    for i, acts in enumerate(list(batches())[w.contexts_done :], start=w.contexts_done):
        w.add(acts, contexts_done=i + 1)
    w.finish()
    assert json.loads((hurt / MANIFEST).read_text()) == json.loads((full / MANIFEST).read_text())
    assert torch.equal(rows_of(CacheReader(hurt)), rows_of(CacheReader(full)))


def test_a_shard_that_fails_its_checksum_is_named_when_read(tmp_path):
    write(tmp_path, batches())
    shard = tmp_path / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # same size, still parses: only the checksum can tell
    shard.write_bytes(bytes(data))
    reader = iter(CacheReader(tmp_path))
    next(reader), next(reader)  # shards 0 and 1 are fine
    with pytest.raises(DataError, match="shard-00002.safetensors in .* is damaged .*checksum"):
        next(reader)


def test_a_cache_without_restart_points_is_not_repaired_but_refused(tmp_path):
    write(tmp_path, batches())
    m = json.loads((tmp_path / MANIFEST).read_text())
    for s in m["shards"]:
        del s["contexts_done"]  # as caches written before restart points were recorded
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    (tmp_path / "shard-00001.safetensors").unlink()
    with pytest.raises(
        ConfigError,
        match=r"shard-00001.safetensors .*\(missing\).*predates the restart points.*delete",
    ):
        CacheWriter(tmp_path, IDENTITY)
    assert not (tmp_path / ".lock").exists()  # refused: the folder is not kept claimed


def test_a_second_writer_process_is_refused_while_the_first_holds_the_cache(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from sae.folder_lock import FolderLock; FolderLock(sys.argv[1], 'x'); "
                "print('held', flush=True); time.sleep(120)"
            ),
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(
            ConfigError, match=rf"harvest.cache_dir: .* is in use by process {holder.pid} on "
        ):
            CacheWriter(tmp_path, IDENTITY)
    finally:
        holder.kill()
        holder.wait()
    CacheWriter(tmp_path, IDENTITY).close()  # a dead holder's lock is stale
