"""Checkpoints and --resume: an interrupted run, resumed, ends bit-identical to an
uninterrupted one; bad resume folders get one line."""

import json
import os
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

from sae.config import load_config
from sae.errors import CheckpointError, ConfigError, TrainingStopped
from sae.training.resample import resample_dead
from sae.training.run import train_run
from sae.training.run_folder import resume_config, run_dir_for
from sae.training.trainer import Trainer


def small_run(root, *extra):
    return load_config(
        None,
        [
            f"output.root={root}",
            "output.run_name=r",
            "output.tensorboard=false",
            "output.log_every_steps=5",
            "output.checkpoint_every_steps=7",
            "data.token_budget=12288",
            "data.eval_split=null",
            "train.batch_tokens=512",
            "harvest.buffer_tokens=2048",
            "train.warmup_steps=2",
            "train.dead_tokens=2000",
            "sae.expansion_factor=4",
            *extra,
        ],
    )


def signalling_step(step):
    """Trainer.step, sending this process a real SIGINT right after optimizer step ``step``."""
    original = Trainer.step

    def step_then_signal(self, batch):
        out = original(self, batch)
        if self.step_count == step:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    return step_then_signal


def interrupt_at(monkeypatch, step):
    monkeypatch.setattr(Trainer, "step", signalling_step(step))


def record_resamples(monkeypatch):
    """A list that gets the number of latents each of the trainer's resamplings renews."""
    counts = []

    def recording(sae, optimizer, x, dead):
        counts.append(int(dead.sum()))
        return resample_dead(sae, optimizer, x, dead)

    monkeypatch.setattr("sae.training.trainer.resample_dead", recording)
    return counts


def weights(run_dir, hook="layers.2"):
    return load_file(str(run_dir / hook / "sae_weights.safetensors"))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "relu", "gated"])
@pytest.mark.parametrize("cache", [False, True])
def test_interrupted_and_resumed_run_ends_bit_identical(tmp_path, monkeypatch, cache, arch):
    extra = [f"sae.architecture={arch}"] + (["sae.k=16"] if arch not in ("relu", "gated") else [])
    if arch == "relu":  # enough pressure that latents die, and resampling renews them
        extra += ["sae.l1_coefficient=30", "sae.resample_dead=true"]
    if cache:  # the cache starts cold in both runs; the interrupted one leaves it half written
        extra += ["harvest.cache_shard_tokens=1024", "harvest.cache_epochs=2"]

    def cfg(name):
        return small_run(
            tmp_path / name,
            *extra,
            *([f"harvest.cache_dir={tmp_path / name / 'cache'}"] if cache else []),
        )

    resampled = record_resamples(monkeypatch)
    whole = train_run(cfg("whole"), log=lambda s: None)
    interrupt_at(monkeypatch, 10)
    with pytest.raises(TrainingStopped):
        train_run(cfg("parts"), log=lambda s: None)
    parts = tmp_path / "parts" / "r"
    assert (parts / "state" / "state.json").exists()
    assert json.loads((parts / "state" / "state.json").read_text())["trainer"]["step"] == 10
    monkeypatch.undo()
    resumed = record_resamples(monkeypatch)
    train_run(resume_config(parts), log=lambda s: None, resume=True)
    if arch == "relu":  # resampling renewed latents, after the interruption too
        assert sum(resampled) > 0 and sum(resumed) > 0, (resampled, resumed)
    a, b = weights(whole), weights(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (parts / "state").exists()  # a finished run drops its state


def test_resume_refusals_are_one_line(tmp_path, monkeypatch):
    cfg = small_run(tmp_path)
    run_dir = run_dir_for(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        resume_config(run_dir)
    run_dir.mkdir()
    with pytest.raises(ConfigError, match="is not a run folder"):
        resume_config(run_dir)
    interrupt_at(monkeypatch, 3)
    with pytest.raises(TrainingStopped):
        train_run(cfg, log=lambda s: None)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="holds an unfinished run; continue it with --resume"):
        run_dir_for(small_run(tmp_path))
    other = small_run(tmp_path, "train.seed=5")
    with pytest.raises(
        ConfigError, match="belongs to another run.*train.seed: checkpoint has 0, this run 5"
    ):
        train_run(other, log=lambda s: None, resume=True)
    (run_dir / "state" / "trainer.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ConfigError, match="is damaged"):
        train_run(resume_config(run_dir), log=lambda s: None, resume=True)
    (run_dir / "state" / "state.json").unlink()
    with pytest.raises(ConfigError, match="is damaged"):
        train_run(resume_config(run_dir), log=lambda s: None, resume=True)


def test_nan_stops_with_the_step_and_hook_and_keeps_the_last_checkpoint():
    cfg = load_config(None, ["sae.num_latents=64", "sae.k=4", "train.batch_tokens=32"])
    trainer = Trainer(cfg, {"layers.1": 16}, total_steps=100)
    saved = []
    batches = [{"layers.1": torch.randn(32, 16)} for _ in range(12)]
    batches[8]["layers.1"][3, 5] = float("nan")
    with pytest.raises(
        ConfigError,
        match=r"activations at layers.1 held NaN or inf in steps 5..9.*"
        r"last good checkpoint \(step 5\) is kept",
    ):
        trainer.fit(
            batches,
            progress=False,
            log_every=100,
            checkpoint_every=5,
            on_checkpoint=lambda t: saved.append(t.step_count),
        )
    assert saved == [5]  # nothing written once a bad batch went in


def test_checkpoint_width_mismatch_is_refused():
    cfg = load_config(None, ["sae.num_latents=64", "sae.k=4"])
    state = Trainer(cfg, {"layers.1": 16}, total_steps=10).state_dict()
    with pytest.raises(ConfigError, match=r"checkpoint holds SAEs \{'layers.1': \(16, 64\)\}"):
        Trainer(cfg, {"layers.1": 32}, total_steps=10).load_state_dict(*state)


@pytest.mark.parametrize(
    "key, shape",
    [
        ("layers.1/sae/W_enc", (64, 32)),
        ("layers.1/adam/2/exp_avg", (64,)),
        ("layers.1/since_fired", (65,)),
        ("torch_rng", (7,)),
    ],
)
def test_checkpoint_tensors_of_another_shape_are_refused_though_its_json_agrees(key, shape):
    cfg = load_config(None, ["sae.num_latents=64", "sae.k=4", "train.batch_tokens=32"])
    trainer = Trainer(cfg, {"layers.1": 16}, total_steps=10)
    trainer.step({"layers.1": torch.randn(32, 16)})  # Adam state exists after a step
    tensors, meta = trainer.state_dict()
    tensors[key] = torch.zeros(shape, dtype=tensors[key].dtype)
    with pytest.raises(
        CheckpointError,
        match=rf"checkpoint's {key} has shape {re.escape(str(shape))}, this run needs",
    ):
        Trainer(cfg, {"layers.1": 16}, total_steps=10).load_state_dict(tensors, meta)
    del tensors[key]
    with pytest.raises(ConfigError, match=rf"checkpoint's {key} has shape None"):
        Trainer(cfg, {"layers.1": 16}, total_steps=10).load_state_dict(tensors, meta)
