"""Atomic file writes: write beside the target, then rename, so no reader (or a resumed
run) ever sees half a file.

Every temporary name is ``.<name>.tmp<random>``: a write that a crash or SIGKILL cut
short leaves only such names, which ``remove_temporaries`` clears (by the folder's
owner: a run holding its folder's lock). Files get the user's default mode (umask), like
any other file they write, whatever the serializer would choose. Write failures arrive as
``OSError`` whatever library raised them (``save_tensors`` translates safetensors' own).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from sae.errors import StorageError

if TYPE_CHECKING:
    import torch

TMP = ".tmp"  # every temporary name is "." + target name + TMP + random letters


def file_mode() -> int:
    """The mode a new file gets from this process's umask (0o644 under the usual 022)."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode a new folder gets from this process's umask (0o755 under the usual 022)."""
    return 0o777 & ~_umask()


def _umask() -> int:
    try:  # read, not set: setting it even briefly would race with other threads
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors' ``save_file``, with the usual file mode, and its I/O errors (a
    ``SafetensorError`` wrapping e.g. "No space left on device") raised as ``OSError``."""
    from safetensors import (
        SafetensorError,  # here: the run-folder checks import this module without torch
    )
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        found = re.search(
            r"os error (\d+)|code: (\d+)", str(e)
        )  # how the Rust side prints an errno
        if found is None:
            raise OSError(errno.EIO, f"cannot serialize tensors ({e})", str(path)) from None
        code = int(found.group(1) or found.group(2))
        raise OSError(code, os.strerror(code), str(path)) from None
    os.chmod(path, file_mode())


def remove_temporaries(folder: Path, recursive: bool = False) -> int:
    """Delete what interrupted atomic writes left in ``folder`` (and its sub-folders);
    the number removed. Only for a folder this process owns: another writer's
    temporaries are in use."""
    found = 0
    for entry in Path(folder).rglob(f".*{TMP}*") if recursive else Path(folder).glob(f".*{TMP}*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        found += 1
    return found


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step; the parent folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP}")
    try:
        os.chmod(tmp, file_mode())  # mkstemp makes files private; these are ordinary outputs
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if (
            isinstance(e, OSError) and e.filename is None
        ):  # os.write's errors name no file: name the target
            raise OSError(e.errno, e.strerror, str(path)) from None
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


def _output_error(path: Path, option: str, reason: str | None) -> StorageError:
    return StorageError(f"{option}: cannot write {str(path)!r}: {reason}")


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
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}{TMP}"))
    try:
        fill(tmp)
        for f in tmp.iterdir():
            os.chmod(f, file_mode())
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        tmp.chmod(folder_mode())
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


def replace_files_atomic(
    folder: Path, writers: dict[str, Callable[[Path], None]], remove: Iterable[str] = ()
) -> None:
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
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}{TMP}")
            os.close(fd)
            tmps[name] = Path(tmp)
            fill(tmps[name])
            os.chmod(tmp, file_mode())
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
