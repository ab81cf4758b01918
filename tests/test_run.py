"""Whole runs through sae.training.run: sweeps on one harvest, evaluation of a saved run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sae.config import load_config
from sae.errors import ConfigError
from sae.evaluation.heldout import evaluate_saved_run
from sae.training.run import train_run


def small_run(root, name, *extra):
    return load_config(
        None,
        [
            f"output.root={root}",
            f"output.run_name={name}",
            "output.tensorboard=false",
            "data.token_budget=8192",
            "data.eval_tokens=2048",
            "train.batch_tokens=512",
            "harvest.buffer_tokens=2048",
            "train.warmup_steps=2",
            "sae.expansion_factor=4",
            *extra,
        ],
    )


def test_a_sweep_trains_every_variant_as_if_alone_from_one_harvest(tmp_path):
    sweep = train_run(
        small_run(tmp_path, "sweep", "sweep=[{k: 8}, {k: 16, expansion_factor: 2, name: narrow}]"),
        log=lambda s: None,
    )
    alone = train_run(
        small_run(tmp_path, "alone", "sae.k=16", "sae.expansion_factor=2"), log=lambda s: None
    )
    for name, k, M in (("k8", 8, 1024), ("narrow", 16, 512)):
        cfg = json.loads((sweep / "layers.2" / name / "cfg.json").read_text())
        assert (cfg["k"], cfg["num_latents"], cfg["metadata"]["hook_name"]) == (k, M, "layers.2")
        metrics = json.loads((sweep / "layers.2" / name / "metrics.json").read_text())
        assert metrics["l0"] <= k and metrics["hook"] == "layers.2"
    a = load_file(str(sweep / "layers.2" / "narrow" / "sae_weights.safetensors"))
    b = load_file(str(alone / "layers.2" / "sae_weights.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_evaluate_measures_a_saved_run_again_with_other_settings(tmp_path):
    run_dir = train_run(small_run(tmp_path, "r", "data.eval_split=null"), log=lambda s: None)
    assert not (run_dir / "layers.2" / "metrics.json").exists()
    lines = []
    results = evaluate_saved_run(
        run_dir, ["data.eval_split=test", "data.eval_tokens=1024"], log=lines.append
    )
    saved = json.loads((run_dir / "layers.2" / "metrics.json").read_text())
    assert saved == results["layers.2"] and 0 < saved["tokens"] <= 1024 and 0 < saved["fvu"] < 1
    assert any(line.lstrip().startswith("layers.2") for line in lines)


def test_evaluate_refusals_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no saved SAEs in"):
        evaluate_saved_run(tmp_path)
    run_dir = train_run(small_run(tmp_path, "r", "data.eval_split=null"), log=lambda s: None)
    with pytest.raises(ConfigError, match="data.eval_split: null"):
        evaluate_saved_run(run_dir)
    cfg = json.loads((run_dir / "layers.2" / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "layers.9"
    (run_dir / "layers.2" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError, match="metadata.hook_name 'layers.9' is not one of the run's hooks"
    ):
        evaluate_saved_run(run_dir, ["data.eval_split=test"])


def local_corpus(folder, n=600):
    folder.mkdir()
    words = "the key is missing so a KeyError is raised when the thread starts and the file is closed".split()
    texts = [
        " ".join(words[(i * 7 + j) % len(words)] for j in range(25)) + f" {i}" for i in range(n)
    ]
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return folder


def test_local_data_is_evaluated_on_its_held_out_documents_and_runs_are_not_mixed(tmp_path):
    data = local_corpus(tmp_path / "corpus")
    lines = []
    local = train_run(
        small_run(tmp_path / "runs", "local", f"data.dataset={data}"), log=lines.append
    )
    header = next(line for line in lines if "metrics" in line and " on " in line)
    assert header.startswith("held-out metrics on") and "[test: 10% of the documents" in header
    saved = json.loads((local / "layers.2" / "metrics.json").read_text())
    assert str(data) in saved["eval_data"] and "never trained on" in saved["eval_data"]
    train_run(small_run(tmp_path / "runs", "builtin", "data.eval_split=null"), log=lambda s: None)
    with pytest.raises(
        ConfigError, match="holds SAEs of different runs or data .* evaluate one run at a time"
    ):
        evaluate_saved_run(tmp_path / "runs", ["data.eval_split=test"])
    assert not (tmp_path / "runs" / "builtin" / "layers.2" / "metrics.json").exists()
    lines.clear()
    evaluate_saved_run(local, ["data.eval_split=train"], log=lines.append)
    assert any(line.startswith("in-sample metrics, NOT held out,") for line in lines)


def test_an_impossible_sae_stops_before_the_run_folder_is_written(tmp_path):
    cfg = small_run(tmp_path, "r", "sae.k=5000", "data.eval_split=null")  # 4x256 = 1024 latents
    with pytest.raises(ConfigError, match="sae.k: 5000 is larger than the 1024 latents"):
        train_run(cfg, log=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_running_a_finished_run_again_keeps_what_sits_beside_its_saes_and_sets_its_curves_aside(
    tmp_path,
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = lambda: small_run(tmp_path, "r", "output.tensorboard=true", "output.log_every_steps=7")  # noqa: E731
    run_dir = train_run(cfg(), log=lambda s: None)
    tb = run_dir / "tensorboard"
    events = EventAccumulator(str(tb)).Reload()
    steps = [e.step for e in events.Scalars("layers.2/loss")]
    final = events.Scalars("heldout/layers.2/fvu")
    metrics = json.loads((run_dir / "layers.2" / "metrics.json").read_text())
    assert (
        steps[-1] == final[0].step and steps[-1] % 7 != 0
    )  # the last step is logged, not the last multiple
    assert final[0].value == pytest.approx(metrics["fvu"])
    (run_dir / "layers.2" / "report.html").write_text("mine")
    (run_dir / "layers.2" / "features").mkdir()
    lines = []
    train_run(cfg(), log=lines.append)
    assert (run_dir / "layers.2" / "report.html").read_text() == "mine" and (
        run_dir / "layers.2" / "features"
    ).is_dir()
    earlier = [p for p in tb.iterdir() if p.is_dir() and p.name.startswith("earlier-")]
    assert len(earlier) == 1 and any(earlier[0].glob("events.out.tfevents.*"))
    again = [e.step for e in EventAccumulator(str(tb)).Reload().Scalars("layers.2/loss")]
    assert again == steps  # the new run's curves alone, not mixed
    assert any("TensorBoard curves moved to" in line for line in lines)
