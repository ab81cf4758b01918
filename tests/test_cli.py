"""The CLIs: one-line errors, the saved config, console scripts."""

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import yaml
from click.testing import CliRunner

from sae import cli

REPO = Path(__file__).resolve().parent.parent


def run(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_bad_override_prints_one_line_and_exits_nonzero():
    result = run("train.py", "--set", "train.lr=abc")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: train.lr: 'abc' is not a number"
    assert "Traceback" not in result.stdout + result.stderr


def test_misspelt_key_in_config_file_prints_one_line(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("train:\n  learning_rat: 0.001\n")
    result = run("train.py", str(f))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'train.learning_rat'" in lines[0], result.stderr


def test_without_a_config_the_defaults_share_no_run_folder_or_cache_with_the_demo():
    result = run("train.py", "--print-config", "--set", "data.dataset=/data/my_corpus")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["output"]["run_name"] is None and cfg["harvest"]["cache_dir"] is None
    demo = yaml.safe_load(run("train.py", "configs/demo.yaml", "--print-config").stdout)
    assert demo["output"]["run_name"] == "demo" and demo["harvest"]["cache_dir"]


def test_the_demo_config_runs_and_saves_the_resolved_config(tmp_path):
    result = run(
        "train.py",
        "configs/demo.yaml",
        "--set",
        f"output.root={tmp_path}",
        "--set",
        "output.run_name=demo",
        "--set",
        "data.token_budget=20000",
        "--set",
        "data.eval_tokens=4096",
        "--set",
        f"harvest.cache_dir={tmp_path / 'cache'}",
    )
    assert result.returncode == 0, result.stderr
    assert "builtin:demo-llama" in result.stdout and "held-out metrics" in result.stdout
    metrics = json.loads((tmp_path / "demo" / "layers.2" / "metrics.json").read_text())
    assert 0 < metrics["fvu"] < 1 and metrics["l0"] <= 32 and metrics["tokens"] > 0
    assert (tmp_path / "demo" / "layers.2" / "sae_weights.safetensors").exists()
    saved = yaml.safe_load((tmp_path / "demo" / "config.yaml").read_text())
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert saved["model"]["name_or_path"] == demo["model"]["name_or_path"]
    assert saved["hooks"] == demo["hooks"] and saved["sae"]["k"] == demo["sae"]["k"]
    assert saved["output"]["root"] == str(tmp_path)


def test_run_folder_of_another_run_is_refused(tmp_path):
    runner = CliRunner()
    args = [
        "--set",
        f"output.root={tmp_path}",
        "--set",
        "output.run_name=r",
        "--set",
        "train.seed=1",
    ]
    from sae.config import load_config
    from sae.training.run_folder import run_dir_for, save_run_config

    first = load_config(None, args[1::2])
    save_run_config(first, run_dir_for(first))
    result = runner.invoke(cli.train, args[:-1] + ["train.seed=2"])
    assert result.exit_code == 2
    assert "already holds another run's config" in result.output
    assert (
        yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["train"]["seed"] == 1
    )  # untouched


def test_print_config_shows_overrides():
    result = CliRunner().invoke(cli.train, ["--print-config", "--set", "sae.k=64"])
    assert result.exit_code == 0
    assert yaml.safe_load(result.output)["sae"]["k"] == 64


def test_missing_model_folder_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "runs"
    result = CliRunner().invoke(
        cli.train,
        ["--set", f"model.name_or_path={tmp_path / 'nope'}", "--set", f"output.root={out}"],
    )
    assert result.exit_code == 2
    assert (
        result.output
        == f"error: model.name_or_path: '{tmp_path / 'nope'}' is not a folder (nor a hub id like org/name)\n"
    )
    assert not out.exists()


def test_folder_without_a_model_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        cli.train,
        [
            "--set",
            f"model.name_or_path={tmp_path / 'empty'}",
            "--set",
            f"output.root={tmp_path / 'runs'}",
        ],
    )
    assert result.exit_code == 2
    assert (
        result.output.startswith("error: model.name_or_path: cannot load")
        and result.output.count("\n") == 1
    )


def test_help_lists_every_config_key():
    result = CliRunner().invoke(cli.train, ["--help"])
    assert result.exit_code == 0
    for key in (
        "model.name_or_path",
        "data.token_budget",
        "hooks",
        "sae.k",
        "train.lr",
        "output.root",
    ):
        assert key in result.output


def test_analyze_layers_lists_demo_hook_points():
    result = CliRunner().invoke(cli.analyze, ["layers"])
    assert result.exit_code == 0, result.output
    assert "layers.0 .. layers.3" in result.output


def test_console_scripts_point_at_the_cli_functions():
    scripts = {
        ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("sae-")
    }
    assert scripts["sae-train"].load() is cli.train
    assert scripts["sae-analyze"].load() is cli.analyze


def test_bad_devices_are_one_line(tmp_path):
    for device, message in [
        ("meta", "is not supported"),
        ("cuda:7", "no CUDA GPU"),
        ("banana", "is not a device"),
    ]:
        result = CliRunner().invoke(
            cli.train, ["--set", f"model.device={device}", "--set", f"output.root={tmp_path}"]
        )
        assert (
            result.exit_code == 2 and message in result.output and result.output.count("\n") == 1
        ), result.output


def test_data_error_during_harvest_leaves_no_run_folder(tmp_path):
    data = tmp_path / "specials.txt"
    data.write_text("<|bos|><|eos|>" * 3000 + "\n")  # every token is special, so all are masked
    out = tmp_path / "runs"
    result = CliRunner().invoke(
        cli.train,
        [
            "--set",
            f"data.dataset={data}",
            "--set",
            f"output.root={out}",
            "--set",
            "data.token_budget=4096",
            "--set",
            "harvest.cache_dir=null",
            "--set",
            "harvest.cache_epochs=1",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "was masked" in result.output
    assert not out.exists()


def test_missing_eval_split_stops_before_training(tmp_path):
    result = CliRunner().invoke(
        cli.train,
        [
            "--set",
            "data.eval_split=validation",
            "--set",
            f"output.root={tmp_path}",
            "--set",
            "harvest.cache_dir=null",
            "--set",
            "harvest.cache_epochs=1",
        ],
    )
    assert result.exit_code == 2
    assert "data.eval_split" in result.output and "validation" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_sigterm_writes_a_checkpoint_and_resume_finishes_the_run(tmp_path):
    """The real signal path, as a job scheduler would use it."""
    import signal
    import time

    args = [
        "train.py",
        "--set",
        f"output.root={tmp_path}",
        "--set",
        "output.run_name=r",
        "--set",
        "data.token_budget=60000",
        "--set",
        "data.eval_tokens=2048",
        "--set",
        "train.batch_tokens=512",
        "--set",
        "output.checkpoint_every_steps=3",
        "--set",
        "harvest.buffer_tokens=4096",
        "--set",
        "harvest.cache_dir=null",
        "--set",
        "harvest.cache_epochs=1",
    ]
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    state = tmp_path / "r" / "state" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert f"continue with: python train.py --resume {tmp_path / 'r'}" in out
    result = run("train.py", "--resume", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout and "held-out metrics" in result.stdout
    assert (tmp_path / "r" / "layers.2" / "metrics.json").exists() and not (
        tmp_path / "r" / "state"
    ).exists()
    again = run("train.py", "--resume", str(tmp_path / "r"))
    assert again.returncode == 2 and "has already finished" in again.stderr


def test_resume_with_a_config_is_refused():
    result = run("train.py", "configs/demo.yaml", "--resume", "checkpoints/x")
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --resume: the run continues with its own config.yaml; drop CONFIG and --set"
    )


def test_sae_debug_shows_the_traceback_and_its_cause_before_the_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [\n")
    quiet = CliRunner().invoke(cli.train, [str(bad)])
    loud = CliRunner(env={"SAE_DEBUG": "1"}).invoke(cli.train, [str(bad)])
    assert quiet.exit_code == loud.exit_code == 2
    assert "Traceback" not in quiet.output and quiet.output.startswith("error: config file")
    assert (
        "Traceback" in loud.output and "yaml" in loud.output
    )  # the YAML parser's own error, hidden by default
    assert loud.output.rstrip().splitlines()[-1] == quiet.output.rstrip()


def test_failures_come_in_kinds_that_are_all_one_line_errors():
    from sae import errors

    kinds = [
        errors.DataError,
        errors.CheckpointError,
        errors.DivergedError,
        errors.DistributedError,
        errors.StorageError,
    ]
    assert all(
        issubclass(kind, errors.ConfigError) for kind in kinds
    )  # the CLI prints each as one line
    assert not issubclass(errors.TrainingStopped, errors.ConfigError)  # a stop is not an error
