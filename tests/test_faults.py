"""Faults injected into real runs: SIGKILL inside checkpoint writes, a full disk, a second
process on a held folder, damaged activation caches. Each must end in a resumable state or
one ``error:`` line, with nothing half-written left behind."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from safetensors import SafetensorError
from safetensors.torch import load_file

from sae import cli
from sae.config import load_config
from sae.training.checkpoint import load_checkpoint
from sae.training.run_folder import claim_run_folder

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from kill_driver import RUN  # noqa: E402


def run_args(root, *extra):
    return [x for kv in [*RUN, f"output.root={root}", *extra] for x in ("--set", kv)]


def train(*args):
    return CliRunner().invoke(cli.train, [str(a) for a in args])


def one_error_line(result):
    """The one ``error:`` line the command printed (the only line that is not a bar or log)."""
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def temporaries(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if ".tmp" in p.name)


def weights(root):
    return load_file(str(Path(root) / "r" / "layers.1" / "sae_weights.safetensors"))


def drive(root, kill_at):
    """One process of the kill driver's run in ``root``; its CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(HERE / "kill_driver.py"), str(root), str(kill_at)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sigkill_inside_checkpoint_writes_then_resume_ends_bit_identical(tmp_path):
    # The reference is a fresh process too: this one's thread count and settings, which
    # other tests may have changed, could round differently.
    assert drive(tmp_path / "reference", 0).returncode == 0
    reference = weights(tmp_path / "reference")
    # Kill points, counted in file-system steps of checkpoint writes (about 19 per step):
    # inside the 2nd checkpoint's tensors, between the 1st's two renames of the resumed
    # run (the old state is then only under .state.old), and inside a 3rd checkpoint.
    left_over = []
    for kill_at in (21, 8, 45):
        proc = drive(tmp_path / "killed", kill_at)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        left_over += temporaries(tmp_path / "killed" / "r")
        cfg = load_config(None, [*RUN, f"output.root={tmp_path / 'killed'}"])
        assert load_checkpoint(tmp_path / "killed" / "r", cfg).step >= 1
    assert left_over, "no kill landed inside a write: the kill points no longer hit the checkpoint"
    proc = drive(tmp_path / "killed", 0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "killed" / "r"
    assert (
        temporaries(run_dir) == []
        and not (run_dir / "state").exists()
        and not (run_dir / ".lock").exists()
    )
    final = weights(tmp_path / "killed")
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_full_disk_mid_run_is_one_line_and_the_last_checkpoint_resumes(tmp_path, monkeypatch):
    assert train(*run_args(tmp_path / "reference")).exit_code == 0
    reference = weights(tmp_path / "reference")
    root = tmp_path / "full"
    calls = {"n": 0}
    real_save = safetensors.torch.save_file

    def fills_up(tensors, filename, metadata=None):
        calls["n"] += 1
        if (
            calls["n"] == 4
        ):  # the 2nd checkpoint's first file (each checkpoint: trainer, buffer, SAE)
            Path(filename).write_bytes(b"\0" * 100)  # what had fit
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_up)
    result = train(*run_args(root))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "cannot write the checkpoint in" in line and "No space left on device" in line
    assert temporaries(root) == []
    monkeypatch.undo()
    assert load_checkpoint(root / "r", load_config(None, [*RUN, f"output.root={root}"])).step == 1
    assert train("--resume", root / "r").exit_code == 0
    final = weights(root)
    assert all(torch.equal(final[k], reference[k]) for k in reference)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only, where mounting is allowed); skipped elsewhere, where the
    serializer-level test above covers the same paths."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_real_full_disk_is_one_line_and_leaves_nothing(small_tmpfs):
    result = train(*run_args(small_tmpfs))  # the first checkpoint (about 5 MB) cannot fit
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "No space left on device" in line and str(small_tmpfs) in line
    assert (
        list(small_tmpfs.iterdir()) == []
    )  # nothing to resume was written, so no run folder either


def test_a_folder_held_by_a_live_process_is_refused_until_it_dies(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from sae.folder_lock import FolderLock; FolderLock(sys.argv[1], 'x'); "
                "print('held', flush=True); time.sleep(120)"
            ),
            str(tmp_path / "r"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        result = train(*run_args(tmp_path))
        assert result.exit_code == 2
        assert f"is in use by process {holder.pid} on " in one_error_line(result)
        (tmp_path / "r" / "config.yaml").write_text(
            (HERE.parent / "configs" / "demo.yaml").read_text()
        )
        result = train("--resume", tmp_path / "r")
        assert result.exit_code == 2
        assert f"is still running (process {holder.pid} on " in one_error_line(result)
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "r" / "config.yaml").unlink()
    lock = claim_run_folder(load_config(None, [*RUN, f"output.root={tmp_path}"]), resume=False)
    lock.release()  # the dead holder's lock file was stale: taken over, then given back


def test_a_claim_that_wrote_nothing_leaves_no_folder_behind(tmp_path):
    cfg = load_config(None, [*RUN, f"output.root={tmp_path / 'a' / 'b'}"])
    lock = claim_run_folder(cfg, resume=False)
    assert (tmp_path / "a" / "b" / "r" / ".lock").is_file()
    lock.release()
    assert list(tmp_path.iterdir()) == []  # nor the parent folders it had to create


def test_a_bit_flipped_cache_shard_stops_the_run_in_one_line_and_leaves_no_folder(tmp_path):
    cache = tmp_path / "cache"
    assert train(*run_args(tmp_path, f"harvest.cache_dir={cache}")).exit_code == 0
    shard = cache / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40  # one bit in the last row's activations: the file still parses
    shard.write_bytes(bytes(data))
    result = train(*run_args(tmp_path, f"harvest.cache_dir={cache}", "output.run_name=again"))
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "shard-00000.safetensors" in line and "checksum" in line and "delete that file" in line
    assert not (tmp_path / "again").exists()
    shard.unlink()  # as the message says: the next run harvests it again
    result = train(*run_args(tmp_path, f"harvest.cache_dir={cache}", "output.run_name=again"))
    assert result.exit_code == 0, result.output
    assert "shard-00000.safetensors" in result.output and "harvesting it" in result.output


def test_files_follow_the_umask_like_any_other_file(tmp_path):
    old = os.umask(0o027)
    try:
        result = train(*run_args(tmp_path, f"harvest.cache_dir={tmp_path / 'cache'}"))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    files = [
        tmp_path / "r" / "layers.1" / "sae_weights.safetensors",
        tmp_path / "r" / "layers.1" / "cfg.json",
        tmp_path / "r" / "config.yaml",
        *(tmp_path / "cache").glob("shard-*"),
    ]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o640)}


def test_resume_of_a_missing_folder_answers_before_torch_is_imported(tmp_path):
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom sae import cli\n"
        f"r = CliRunner().invoke(cli.train, ['--resume', {str(tmp_path / 'gone')!r}])\n"
        "print(r.exit_code, 'torch' in sys.modules, r.output.strip())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    ).stdout
    assert out.strip() == f"2 False error: --resume: {str(tmp_path / 'gone')!r} does not exist"
