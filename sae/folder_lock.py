"""One writer per folder: a run folder or an activation cache is claimed by the process
that writes it, so two runs never mix their files in one place.

The claim is a ``.lock`` file inside the folder, locked with ``flock`` and holding the
holder's pid, host and start time (for the message another process gets). The kernel
drops an flock when its process dies, however it dies, so a lock file left by a killed
run is stale and simply taken over. Where ``flock`` is missing (Windows) or refused (some
network filesystems), the pid and host in the file decide instead: a holder on this host
that no longer runs is stale; one on another host is trusted until its file is removed.

A process checks its claim before it writes (``FolderLock.check``): if the folder was
deleted or replaced under it, the write stops instead of landing in another run's folder.

Within one process a new claim on a folder takes it over from an older one (the kernel
cannot tell them apart): the older claimant, typically a writer abandoned after an error
or a stop, then fails its next ``check`` instead of writing. ``_HELD`` is that process-wide
bookkeeping, mirroring the one lock the kernel holds for the process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path

from sae.errors import StorageError

try:
    import fcntl
except ImportError:  # Windows: pid and host decide (see the module docstring)
    fcntl = None

LOCK_FILE = ".lock"
_HELD: dict[str, FolderLock] = {}  # lock file path -> this process's current claim on it


class FolderHeld(StorageError):
    """Another live process holds the folder. The message is one line naming the holder."""


class FolderLock:
    """This process's claim on ``folder`` (created if missing). Release it with ``release``
    or a ``with`` block; folders the claim created and nothing else was written into are
    removed again on release, so a failed start leaves no empty folder behind."""

    def __init__(self, folder: str | Path, what: str):
        """what: the folder's role in messages, e.g. 'output.run_name' or 'harvest.cache_dir'."""
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_FILE
        self.created = _new_folders(self.folder)  # removed again on release, if still empty
        self._fd: int | None = None
        self._superseded = False
        older = _HELD.get(str(self.path.absolute()))
        if older is not None and older._fd is not None and _same_file(older._fd, self.path):
            self._fd, older._fd, older._superseded = older._fd, None, True
            self.created = older.created
        else:
            self._acquire()
        _HELD[str(self.path.absolute())] = self

    def _acquire(self) -> None:
        for _ in range(100):  # retried only while a releasing holder removes the file under us
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StorageError(
                    f"{self.what}: cannot write to {str(self.folder)!r}: {e.strerror}"
                ) from None
            if not _lock_fd(fd, self.path):
                holder = _read_holder(fd)
                os.close(fd)
                raise FolderHeld(
                    f"{self.what}: {str(self.folder)!r} is in use by {describe_holder(holder)}; "
                    "wait for that run to end, or choose another folder"
                )
            if _same_file(fd, self.path):
                self._fd = fd
                _write_holder(fd)
                return
            os.close(fd)  # locked a file its holder had just removed: try the new one
        raise StorageError(
            f"{self.what}: could not claim {str(self.folder)!r} (its lock file keeps changing)"
        )

    def check(self) -> None:
        """Raise unless this claim still holds the folder (it was not deleted or replaced)."""
        if self._superseded:
            raise StorageError(
                f"{self.what}: {str(self.folder)!r} was claimed again by a later run in this "
                "process; this one stops writing to it"
            )
        if self._fd is None or not _same_file(self._fd, self.path):
            raise StorageError(
                f"{self.what}: {str(self.folder)!r} was removed or replaced by someone else while "
                "this process wrote it; stopping so that nothing lands in the wrong folder"
            )

    def release(self) -> None:
        if self._fd is None:
            return
        if _same_file(
            self._fd, self.path
        ):  # unlinked before unlocking: no one can take a file on its way out
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None
        if _HELD.get(str(self.path.absolute())) is self:
            del _HELD[str(self.path.absolute())]
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:  # not empty, as it should be once anything was written
                break

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _new_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def holder_of(folder: str | Path) -> dict | None:
    """Who holds ``folder`` now ({"pid", "host", "started"}), or None; takes nothing."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if _lock_fd(fd, path):
            return None
        return _read_holder(fd)
    finally:
        os.close(fd)  # closing drops a lock this probe took


def describe_holder(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (since {started})"


def _lock_fd(fd: int, path: Path) -> bool:
    """Take the lock on ``fd``; False if a live process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
    holder = _read_holder(fd)  # no flock here: the recorded holder decides
    if not holder:
        return True
    if holder.get("host") != socket.gethostname():
        raise FolderHeld(
            f"{str(path.parent)!r} is claimed by {describe_holder(holder)}, which this machine "
            f"cannot check; if that run has ended, delete {str(path)!r}"
        )
    return holder.get("pid") == os.getpid() or not _pid_alive(holder.get("pid", -1))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # exists, owned by someone else
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        doc = json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_holder(fd: int) -> None:
    data = json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    ).encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
