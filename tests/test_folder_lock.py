"""One writer per folder (sae.folder_lock): what a claim guarantees, in one process; the
cross-process cases (a live holder refused, a dead one's lock taken over) are in
tests/test_faults.py and tests/test_activation_cache.py."""

import json
import os
import shutil
import socket

import pytest

from sae.errors import StorageError
from sae.folder_lock import LOCK_FILE, FolderLock, holder_of


def test_a_claim_records_its_holder_and_gives_the_folder_back(tmp_path):
    lock = FolderLock(tmp_path / "run", "output.run_name")
    holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
    assert holder_of(tmp_path / "run")["pid"] == os.getpid()
    lock.check()  # still ours
    lock.release()
    assert holder_of(tmp_path / "run") is None and not (tmp_path / "run").exists()


def test_a_folder_deleted_or_recreated_under_a_claim_stops_its_next_write(tmp_path):
    lock = FolderLock(tmp_path / "cache", "harvest.cache_dir")
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(StorageError, match="was removed or replaced by someone else"):
        lock.check()
    (tmp_path / "cache").mkdir()  # another run made a new folder of the same name
    FolderLock(tmp_path / "cache", "harvest.cache_dir").release()
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache" / LOCK_FILE).write_text("{}")
    with pytest.raises(StorageError, match="was removed or replaced"):
        lock.check()  # a lock file is there, but not the one this claim holds
    lock.release()  # and giving it back leaves the other one alone
    assert (tmp_path / "cache" / LOCK_FILE).exists()


def test_a_later_claim_in_the_same_process_takes_the_folder_over(tmp_path):
    first = FolderLock(tmp_path / "run", "output.run_name")
    (tmp_path / "run" / "config.yaml").write_text("x")
    second = FolderLock(tmp_path / "run", "output.run_name")
    with pytest.raises(StorageError, match="claimed again by a later run in this process"):
        first.check()
    second.check()
    first.release()  # gives back nothing: the claim is the second's now
    assert holder_of(tmp_path / "run")["pid"] == os.getpid()
    second.release()
    assert holder_of(tmp_path / "run") is None
    assert (tmp_path / "run" / "config.yaml").exists()  # a folder with files in it stays
