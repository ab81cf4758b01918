"""Text datasets in, fixed-length token contexts out.

``load_text_dataset`` resolves a dataset spec (the built-in corpus, local files or a
Hugging Face dataset id) and ``pack`` turns tokenized documents into contexts of one
length, each starting with BOS, documents separated by EOS.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets
import torch

from sae import corpus
from sae.errors import ConfigError

# File suffix -> the `datasets` builder that reads it.
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_text_dataset(
    dataset: str,
    split: str = "train",
    text_column: str = "text",
    subset: str | None = None,
    streaming: bool = False,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split of a text dataset.

    ``dataset`` is ``builtin:python-docs``, a local file or folder of ``.txt``/``.jsonl``/
    ``.json``/``.parquet``/``.csv`` files, or a Hugging Face hub id (``subset`` names its
    configuration). Raises ConfigError when the text column is missing.
    """
    if dataset.startswith("builtin:"):
        if dataset != corpus.NAME:
            raise ConfigError(f"data.dataset: unknown built-in dataset {dataset!r}; valid: {corpus.NAME}")
        try:
            ds = corpus.load(split)
        except ValueError as e:
            raise ConfigError(f"data.split: {e}") from None
        if streaming:
            ds = ds.to_iterable_dataset()
    elif Path(dataset).exists():
        ds = _load_local(Path(dataset), split, streaming)
    else:
        ds = datasets.load_dataset(dataset, subset, split=split, streaming=streaming)
    columns = ds.column_names
    if columns is not None and text_column not in columns:
        raise ConfigError(
            f"data.text_column: {text_column!r} is not a column of {dataset}; columns: {', '.join(columns)}"
        )
    return ds


def _load_local(path: Path, split: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS) if path.is_dir() else [path]
    suffixes = {p.suffix for p in files}
    if not files or len(suffixes) != 1 or next(iter(suffixes)) not in LOCAL_FORMATS:
        raise ConfigError(
            f"data.dataset: {str(path)!r} must be one file or a folder of files of one type "
            f"({', '.join(LOCAL_FORMATS)}); found {sorted(suffixes) or 'no such files'}"
        )
    builder = LOCAL_FORMATS[files[0].suffix]
    # Local files carry no split: every file is the requested split.
    return datasets.load_dataset(builder, data_files={split: [str(p) for p in files]}, split=split,
                                 streaming=streaming)


def pack(documents: Iterable[Sequence[int]], context_len: int, bos_id: int, eos_id: int) -> torch.Tensor:
    """Pack token documents into contexts.

    Documents (token ids without special tokens) are joined with ``eos_id`` between them,
    cut into pieces of ``context_len - 1`` tokens, and each piece gets ``bos_id`` in front,
    so every context looks like the start of a sequence to the model. A final piece shorter
    than that is dropped.

    Returns a LongTensor [n_contexts, context_len].
    """
    if context_len < 2:
        raise ValueError(f"context_len must be at least 2, got {context_len}")
    stream: list[int] = []
    for doc in documents:
        if len(doc) == 0:
            continue
        if stream:
            stream.append(eos_id)
        stream.extend(doc)
    body = context_len - 1
    n = len(stream) // body
    if n == 0:
        return torch.empty(0, context_len, dtype=torch.long)
    pieces = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), pieces], dim=1)
