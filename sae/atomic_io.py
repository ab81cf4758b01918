"""Atomic file writes: write beside the target, then rename, so no reader (or a resumed
run) ever sees half a file."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from sae.errors import ConfigError


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step; the parent folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes files private; these are ordinary outputs
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) in one step."""
    write_bytes_atomic(path, text.encode("utf-8"))


def check_output_path(path: Path, option: str) -> None:
    """Fail now, in one line naming ``option``, if ``path`` cannot become a file (missing
    parent folders are created): before minutes of work, not after."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where a parent folder should be: say what is wrong with it
        raise _output_error(path, option, os.strerror(errno.ENOTDIR)) from None
    except OSError as e:
        raise _output_error(path, option, e.strerror) from None
    if path.is_dir():
        raise _output_error(path, option, os.strerror(errno.EISDIR))


def write_output(path: Path, data: bytes | str, option: str) -> int:
    """Write a user-named output file atomically; its size in bytes. An OSError becomes one
    line naming ``option``."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    check_output_path(path, option)
    try:
        write_bytes_atomic(Path(path), data)
    except OSError as e:
        raise _output_error(Path(path), option, e.strerror) from None
    return len(data)


def _output_error(path: Path, option: str, reason: str | None) -> ConfigError:
    return ConfigError(f"{option}: cannot write {str(path)!r}: {reason}")


def fsync_dir(folder: Path) -> None:
    """Make renames inside ``folder`` durable (a crash cannot undo them)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder_atomic(folder: Path, fill: Callable[[Path], None]) -> None:
    """Replace ``folder`` whole by the folder ``fill(tmp)`` writes.

    The new content is written and fsynced beside the target, then swapped in by renames.
    A crash leaves either the old folder, or the new one, or (between the two renames) the
    old one under ``.<name>.old``, which ``existing_folder`` finds.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp"))
    try:
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        tmp.chmod(0o755)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def replace_files_atomic(folder: Path, writers: dict[str, Callable[[Path], None]],
                         remove: Iterable[str] = ()) -> None:
    """Replace some files of ``folder``, leaving every other file in it alone.

    ``writers``: {file name: fill(tmp path)}, written and fsynced beside their targets
    first, then renamed into place in the order given (put the file that readers check
    first, such as a config, last); files named in ``remove`` that were not written are
    deleted after. A failure before the renames leaves the folder as it was, with no
    temporary files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmps: dict[str, Path] = {}
    try:
        for name, fill in writers.items():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
            os.close(fd)
            tmps[name] = Path(tmp)
            fill(tmps[name])
            os.chmod(tmp, 0o644)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        for tmp in tmps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for name, tmp in tmps.items():
        os.replace(tmp, folder / name)
    for name in remove:
        if name not in writers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)
    fsync_dir(folder)


def existing_folder(folder: Path) -> Path | None:
    """``folder`` if present, else the previous version a crash mid-replace left, else None."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    return folder if folder.exists() else old if old.exists() else None
