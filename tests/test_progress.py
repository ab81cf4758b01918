"""The slow silent phases of a run show progress: the shuffle buffer's fill and the final
evaluation; Ctrl-C or SIGTERM while the buffer fills stops in one line saying what was kept."""

import json
import os
import re
import signal

import pytest
from click.testing import CliRunner

from sae import cli
from sae.activations import stream as activations
from sae.activations.harvest import Harvester
from sae.config import load_config
from sae.errors import TrainingStopped
from sae.training.run import train_run


def settings(root, *extra):
    return [
        f"output.root={root}",
        "output.run_name=r",
        "output.tensorboard=false",
        "data.token_budget=4096",
        "data.eval_tokens=768",
        "train.batch_tokens=256",
        "harvest.buffer_tokens=768",
        "train.warmup_steps=2",
        "sae.expansion_factor=4",
        *extra,
    ]


def bar_renders(err, desc):
    """(n, total) of each state of the tqdm bar ``desc`` drawn to ``err`` (counts below 1000,
    which tqdm writes as plain integers)."""
    return [
        tuple(map(int, m.groups())) for m in re.finditer(rf"{desc}:[^\r\n]*?\| *(\d+)/(\d+) ", err)
    ]


def test_the_fill_and_the_evaluation_show_bars_that_end_at_their_token_counts_and_clear(
    tmp_path, capsys
):
    train_run(load_config(None, settings(tmp_path)), log=lambda s: None)
    err = capsys.readouterr().err
    # harvest.buffer_tokens rows fill the buffer; data.eval_tokens (3 contexts of 256) are evaluated
    for desc in ("filling shuffle buffer", "held-out metrics", "splice layers.2"):
        assert bar_renders(err, desc)[-1] == (768, 768), desc
    # Each of them is wiped when done: what stays on a line is never one of them.
    shown = [line.split("\r")[-1] for line in err.split("\n")]
    assert not [s for s in shown if re.search("filling shuffle buffer|held-out metrics|splice", s)]
    assert err.rindex("filling shuffle buffer") < err.index(
        "train:"
    )  # gone before training's bar starts


def interrupt_harvest_after(monkeypatch, items, action):
    """Harvester.__iter__ calling ``action()`` before its item ``items`` (0-based); returns
    the row counts of the items it yielded."""
    original, rows = Harvester.__iter__, []

    def harvest(self):
        for i, acts in enumerate(original(self)):
            if i == items:
                action()
            rows.append(next(iter(acts.values())).shape[0])
            yield acts

    monkeypatch.setattr(Harvester, "__iter__", harvest)
    return rows


def test_ctrl_c_while_the_buffer_fills_is_one_line_and_leaves_no_run_folder(tmp_path, monkeypatch):
    def ctrl_c():
        raise KeyboardInterrupt

    rows = interrupt_harvest_after(monkeypatch, 3, ctrl_c)
    args = [
        a
        for s in settings(tmp_path, "harvest.batch_contexts=1", "harvest.buffer_tokens=2048")
        for a in ("--set", s)
    ]
    result = CliRunner().invoke(cli.train, args)
    assert result.exit_code == 130
    assert "interrupted" not in result.output and "Traceback" not in result.output
    last = result.stdout.splitlines()[-1]
    assert sum("stopped" in line for line in result.stdout.splitlines()) == 1
    assert last.startswith(
        f"stopped while filling the shuffle buffer ({sum(rows):,} of 2,048 activation vectors)"
    )
    assert "what it harvested is not kept (no harvest.cache_dir)" in last and last.endswith(
        "no run folder was created"
    )
    assert len(rows) == 3 and not (tmp_path / "r").exists()


def test_sigterm_while_the_buffer_fills_keeps_the_cache_shards_and_the_next_start_harvests_on(
    tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    cfg = lambda: load_config(
        None,
        settings(  # noqa: E731
            tmp_path,
            f"harvest.cache_dir={cache}",
            "harvest.cache_shard_tokens=256",
            "harvest.batch_contexts=1",
            "data.eval_split=null",
        ),
    )

    def not_ours(signum, frame):  # reached only if the run left SIGTERM to whoever had it before
        raise AssertionError("SIGTERM was not handled by the run")

    previous = signal.signal(signal.SIGTERM, not_ours)
    try:
        interrupt_harvest_after(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
        lines = []
        with pytest.raises(TrainingStopped) as stopped:
            train_run(cfg(), log=lines.append)
        assert signal.getsignal(signal.SIGTERM) is not_ours  # given back after the fill
    finally:
        signal.signal(signal.SIGTERM, previous)
    manifest = json.loads((cache / "manifest.json").read_text())
    shards = sorted(cache.glob("shard-*.safetensors"))
    assert (
        not manifest["complete"]
        and manifest["tokens"] > 0
        and len(shards) == len(manifest["shards"])
    )
    assert lines[-1] == str(stopped.value) and lines[-1].startswith(
        "stopped while filling the shuffle buffer"
    )
    assert (
        f"the activation cache in {cache} keeps the {manifest['tokens']:,} tokens of its {len(shards)} "
        in lines[-1]
    )
    assert lines[-1].endswith("no run folder was created") and not (tmp_path / "r").exists()

    monkeypatch.undo()
    starts, make_harvester = [], activations.make_harvester

    def recording(cfg, model, tokenizer, skip_contexts=0, shard=None):
        starts.append(skip_contexts)
        return make_harvester(cfg, model, tokenizer, skip_contexts, shard)

    monkeypatch.setattr(activations, "make_harvester", recording)
    run_dir = train_run(cfg(), log=lambda s: None)
    assert (
        starts == [manifest["contexts_done"]] and starts[0] > 0
    )  # on from the kept shards, not from 0
    assert (
        json.loads((cache / "manifest.json").read_text())["complete"]
        and (run_dir / "layers.2").is_dir()
    )
