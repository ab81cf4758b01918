"""The built-in demo corpus, ``builtin:python-docs``: English text that ships with CPython.

Two sources, both read without importing or executing anything:

* the interactive help topics in ``pydoc_data.topics`` (one document per topic), and
* the docstrings of the pure-Python standard library, extracted with ``ast`` from the
  source files (one document per module: its module, class and function docstrings).

Importing every stdlib module would be slow and has side effects (``antigravity`` opens a
browser), hence ``ast``. Tests, demos and GUI toolkits are skipped: they are code-heavy.

The split is fixed per document: a document is held out when the SHA-256 of its id falls
in a fixed 10% bucket, so adding or removing one document (another Python version) never
moves any other document between splits.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from sae.atomic_io import write_text_atomic

if TYPE_CHECKING:
    import datasets

NAME = "builtin:python-docs"
SPLITS = ("train", "test")
HELDOUT_PERCENT = 10
_CACHE_FORMAT = 1  # bump when the extraction rules change

# Stdlib folders that hold tests, demos, vendored code or GUI code rather than prose.
_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "__pycache__",
    "unittest",
}


@dataclass(frozen=True)
class Document:
    id: str  # "topic:<name>" or "module:<dotted.name>"
    text: str


def split_of(key: str) -> str:
    """'test' for the fixed held-out 10% of document keys (ids here; the text itself for
    datasets without ids, ``sae.data.text.split_source``), 'train' otherwise."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 100
    return "test" if bucket < HELDOUT_PERCENT else "train"


def _topic_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [
        Document(f"topic:{name}", text.strip()) for name, text in topics.items() if text.strip()
    ]


def _module_docstrings(source: str) -> list[str]:
    tree = ast.parse(source)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                docs.append(doc.strip())
    return docs


def _stdlib_files(stdlib: Path) -> list[tuple[str, Path]]:
    """(dotted module name, path) of the stdlib's prose-bearing source files, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")
        )
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = Path(dirpath, filename)
            rel = path.relative_to(stdlib).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            if parts:
                out.append((".".join(parts), path))
    return out


def _stdlib_documents(files: list[tuple[str, Path]]) -> list[Document]:
    out = []
    for module, path in files:
        try:
            docs = _module_docstrings(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately invalid (bad encodings, py2 syntax)
        if docs:
            out.append(Document("module:" + module, "\n\n".join(docs)))
    return out


def cache_dir() -> Path:
    """Where the parsed corpus is kept between runs: $SAE_CACHE, else ~/.cache/sae."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sae"
    return Path(os.environ.get("SAE_CACHE", default))


def _sources_key(files: list[tuple[str, Path]]) -> str:
    """Changes whenever Python or any source file the corpus is read from changes."""
    import pydoc_data.topics

    h = hashlib.sha256(f"{_CACHE_FORMAT}\0{sys.version}".encode())
    for path in [Path(pydoc_data.topics.__file__)] + [p for _, p in files]:
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:20]


@lru_cache(maxsize=1)
def documents() -> tuple[Document, ...]:
    """Every document of the corpus, sorted by id (deterministic for a given Python).

    Parsing the stdlib takes seconds, so the result is kept in ``cache_dir()`` as JSON,
    keyed by the Python version and the size and mtime of every source file.
    """
    files = _stdlib_files(Path(sysconfig.get_paths()["stdlib"]))
    return cached_documents(
        cache_dir() / f"python-docs-{_sources_key(files)}.json",
        lambda: _topic_documents() + _stdlib_documents(files),
    )


def cached_documents(cached: Path, build: Callable[[], list[Document]]) -> tuple[Document, ...]:
    """A built-in corpus's documents, sorted by id: read from the JSON file ``cached``, or
    built (``build()``) and written there for the next run."""
    try:
        return tuple(Document(d["id"], d["text"]) for d in json.loads(cached.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache yet, or an unreadable one: build it
    docs = tuple(sorted(build(), key=lambda d: d.id))
    try:
        write_text_atomic(cached, json.dumps([{"id": d.id, "text": d.text} for d in docs]))
    except OSError:
        pass  # a read-only home only costs the next run a few seconds
    return docs


def split_dataset(docs: Sequence[Document], name: str, split: str) -> datasets.Dataset:
    """One split of a built-in corpus as a ``datasets.Dataset`` with columns ``id`` and ``text``."""
    if split not in SPLITS:
        raise ValueError(f"{name} has no split {split!r}; valid splits: {', '.join(SPLITS)}")
    import datasets  # here: the GGUF cache and the demo model use this module without a dataset

    kept = [d for d in docs if split_of(d.id) == split]
    return datasets.Dataset.from_dict({"id": [d.id for d in kept], "text": [d.text for d in kept]})


def split_fingerprint(docs: Sequence[Document], split: str) -> str:
    """SHA-256 over the ids and texts of one split: tells whether two installs see the same text."""
    h = hashlib.sha256()
    for d in docs:
        if split_of(d.id) == split:
            h.update(d.id.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()


def load(split: str = "train") -> datasets.Dataset:
    """The corpus's ``split``, "train" or "test" (the held-out documents), as a Dataset."""
    return split_dataset(documents(), NAME, split)


def fingerprint(split: str) -> str:
    """SHA-256 of one split's text (it differs between Python versions)."""
    return split_fingerprint(documents(), split)


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))
