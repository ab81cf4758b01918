"""Text datasets in, fixed-length token contexts out.

``load_text_dataset`` resolves a dataset spec (a built-in corpus, local files or a
Hugging Face dataset id); ``context_batches`` tokenizes it in batches and packs it into
contexts of one length, each starting with a start token and documents separated by a
separator token (BOS and EOS, except for chat tokenizers: ``context_bos_id``), up to a
token budget.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from sae.data import corpus, english_corpus
from sae.data.corpus import HELDOUT_PERCENT
from sae.distributed import Shard
from sae.errors import ConfigError, DataError
from sae.hub import looks_like_local_path

# File suffix -> the `datasets` builder that reads it.
LOCAL_FORMATS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}

# Built-in corpora: name -> module with load(split) and fingerprint(split).
BUILTIN_CORPORA = {corpus.NAME: corpus, english_corpus.NAME: english_corpus}


def load_text_dataset(
    dataset: str,
    split: str = "train",
    text_column: str = "text",
    subset: str | None = None,
    streaming: bool = False,
    require_text: bool = True,
    hold_out: bool = True,
) -> TextData:
    """Load one split of a text dataset: its rows (``.dataset``, a ``datasets`` object) and
    where they came from (``.origin``, which errors found only while reading them name).

    ``dataset`` is a built-in corpus (``BUILTIN_CORPORA``: ``builtin:python-docs``,
    ``builtin:english-prose``), a local file or folder of ``.txt``/``.jsonl``/``.json``/
    ``.parquet``/``.csv`` files, or a Hugging Face hub id (``subset`` names its
    configuration). ``split`` may also be a local file or folder, read whole (a held-out
    set of the user's own). With ``hold_out``, a dataset without a ``test`` split of its
    own (local files; hub datasets with only ``train``) gets one: the documents whose text
    hashes into a fixed ``HELDOUT_PERCENT``, which ``train`` then leaves out (``split_source``).
    Raises ConfigError when the text column is missing, or (with ``require_text``) holds
    something other than text.
    """
    local_or_builtin = dataset.startswith("builtin:") or Path(dataset).exists()
    if subset is not None and local_or_builtin:
        raise ConfigError(
            f"data.subset: {subset!r} applies to hub datasets only; {dataset} has no subsets (use null)"
        )
    source = split_source(dataset, split, subset) if hold_out else SplitSource(split, None, None)
    ds, local = _load_rows(dataset, split, subset, source, streaming)
    _check_text_column(ds, dataset, text_column, require_text)
    if source.part is not None:
        ds = _keep_part(ds, dataset, text_column, source.part)
    key = "data.split" if source.path is not None else "data.dataset"
    root, files = local or (None, [])
    return TextData(
        ds, DataOrigin(key, f"{dataset} (split {split!r}, column {text_column!r})", root, files)
    )


def _load_rows(
    dataset: str, split: str, subset: str | None, source: SplitSource, streaming: bool
) -> tuple[datasets.Dataset | datasets.IterableDataset, tuple[Path, list[Path]] | None]:
    """The rows ``source`` says to read (``split_source``; its ``part`` not applied yet),
    and for local data (what was named, the files read), else None."""
    if source.path is not None:
        return _load_local(Path(source.path), "train", streaming)
    if dataset.startswith("builtin:"):
        return _load_builtin(dataset, split, streaming), None
    if Path(dataset).exists():
        return _load_local(Path(dataset), source.split, streaming)
    if looks_like_local_path(dataset):
        raise ConfigError(
            f"data.dataset: {dataset!r} does not exist (nor is it a hub id like org/name)"
        )
    ds = _guarded(
        lambda: datasets.load_dataset(dataset, subset, split=source.split, streaming=streaming),
        f"data.dataset: cannot load {dataset!r} (subset {subset!r}, split {source.split!r})",
    )
    return ds, None


def _load_builtin(
    dataset: str, split: str, streaming: bool
) -> datasets.Dataset | datasets.IterableDataset:
    """One split of a built-in corpus (``BUILTIN_CORPORA``); unknown names and splits refused."""
    if dataset not in BUILTIN_CORPORA:
        raise ConfigError(
            f"data.dataset: unknown built-in dataset {dataset!r}; "
            f"valid: {', '.join(BUILTIN_CORPORA)}"
        )
    try:
        ds = BUILTIN_CORPORA[dataset].load(split)
    except ConfigError:
        raise  # already one line about the dataset (english-prose without gensim)
    except ValueError as e:
        raise ConfigError(f"data.split: {e}") from None
    return ds.to_iterable_dataset() if streaming else ds


def _keep_part(
    ds: datasets.Dataset | datasets.IterableDataset, dataset: str, text_column: str, part: str
) -> datasets.Dataset | datasets.IterableDataset:
    """The rows of ``ds`` whose text hashes into ``part`` ("train" or "test", ``_in_part``)."""
    keep = functools.partial(_in_part, column=text_column, part=part)
    return (
        ds.filter(keep, batched=True)
        if isinstance(ds, datasets.IterableDataset)
        else ds.filter(keep, batched=True, desc=f"{part} documents of {dataset}")
    )


def _check_text_column(
    ds: datasets.Dataset | datasets.IterableDataset,
    dataset: str,
    text_column: str,
    require_text: bool,
) -> None:
    columns = ds.column_names
    if columns is not None and text_column not in columns:
        raise ConfigError(
            f"data.text_column: {text_column!r} is not a column of {dataset}; columns: {', '.join(columns)}"
        )
    feature = (ds.features or {}).get(text_column)
    if (
        require_text
        and feature is not None
        and getattr(feature, "dtype", None) not in ("string", "large_string")
    ):
        raise ConfigError(
            f"data.text_column: column {text_column!r} of {dataset} holds {feature.dtype}, not text"
        )


@dataclass(frozen=True)
class DataOrigin:
    """Where a dataset came from, for the errors found only while reading it: a malformed
    line of a streamed file, no text."""

    key: str  # the config key that named it
    description: str  # "corpus.jsonl (split 'train', column 'text')"
    root: Path | None  # local data: the file or folder named
    files: list[Path]  # local data: the files read


@dataclass(frozen=True)
class TextData:
    """A dataset from ``load_text_dataset`` (its rows: ``dataset``) and its origin."""

    dataset: datasets.Dataset | datasets.IterableDataset
    origin: DataOrigin

    @classmethod
    def of(
        cls, data: TextData | datasets.Dataset | datasets.IterableDataset, text_column: str
    ) -> TextData:
        """``data`` itself, or a dataset built elsewhere (tests, callers) with an origin made up for it."""
        if isinstance(data, TextData):
            return data
        return cls(
            data, DataOrigin("data.dataset", f"the dataset (column {text_column!r})", None, [])
        )


@dataclass(frozen=True)
class SplitSource:
    """Where a requested split's text comes from: the dataset's own ``split``; or
    (``part``) the documents of that split whose text hash puts them in ``part``, "train"
    or "test"; or a local file or folder (``path``) read whole."""

    split: str
    part: str | None
    path: str | None


@functools.lru_cache(maxsize=64)
def split_source(dataset: str, split: str, subset: str | None = None) -> SplitSource:
    """How ``split`` of ``dataset`` is read. Local files have no splits of their own, only
    "train" (everything) and "test" (held out by hash); a hub dataset's splits are its own,
    plus the same two when it has no "test" (asking the hub which splits it has)."""
    if (
        split not in ("train", "test")
        and Path(split).exists()
        and (
            looks_like_local_path(split)
            or Path(split).suffix in LOCAL_FORMATS
            or Path(split).is_dir()
        )
    ):
        return SplitSource("train", None, split)
    if dataset.startswith("builtin:"):
        return SplitSource(split, None, None)  # the built-in corpora hold out their own 10%
    if Path(dataset).exists():
        if split not in ("train", "test"):
            raise ConfigError(
                f"data.split: {split!r}: local data has the splits 'train' ({100 - HELDOUT_PERCENT}% "
                f"of the documents) and 'test' (the other {HELDOUT_PERCENT}%, by a hash of their "
                "text), or name a file or folder of held-out text"
            )
        return SplitSource("train", split, None)
    try:
        names = datasets.get_dataset_split_names(dataset, subset)
    except Exception:  # noqa: BLE001 - offline or unknown here: load_dataset will say what is wrong
        return SplitSource(split, None, None)
    if "test" not in names and "train" in names and split in ("train", "test"):
        return SplitSource("train", split, None)
    return SplitSource(split, None, None)


def describe_split(dataset: str, split: str, subset: str | None = None) -> str:
    """Where ``split`` of ``dataset`` comes from, in words, for logs and metric tables."""
    source = split_source(dataset, split, subset)
    if source.path is not None:
        return f"{source.path} (read whole)"
    if source.part == "test":
        return f"{dataset} [test: {HELDOUT_PERCENT}% of the documents, by a hash of their text; never trained on]"
    if source.part == "train":
        return f"{dataset} [train: {100 - HELDOUT_PERCENT}% of the documents; the other {HELDOUT_PERCENT}% are held out as test]"
    if dataset in BUILTIN_CORPORA and split == "test":
        return (
            f"{dataset} [test: its held-out {HELDOUT_PERCENT}% of the documents; never trained on]"
        )
    return f"{dataset} [{split}]"


def _in_part(batch: dict, column: str, part: str) -> list[bool]:
    if column not in batch:  # streaming datasets may not know their columns up front
        raise ConfigError(
            f"data.text_column: {column!r} is not a column; columns: {', '.join(batch)}"
        )
    return [corpus.split_of(t if isinstance(t, str) else repr(t)) == part for t in batch[column]]


def _guarded(load, what: str, explain=lambda: None):
    """Run a `datasets` loader; its many error types become one ConfigError line (``explain``
    may say more precisely what is wrong than the error)."""
    try:
        return load()
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        # ConnectionError and FileNotFoundError are OSErrors; bad splits/configs raise ValueError.
        raise DataError(f"{what}: {explain() or _first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ is not None:
        e = (
            e.__cause__
        )  # "An error occurred while generating the dataset" says nothing; its cause does
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _load_local(
    path: Path, split: str, streaming: bool
) -> tuple[datasets.Dataset | datasets.IterableDataset, tuple[Path, list[Path]]]:
    """The files at ``path`` as one split, and (path, the files read)."""
    files = (
        sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS) if path.is_dir() else [path]
    )
    suffixes = {p.suffix for p in files}
    if not files or len(suffixes) != 1 or next(iter(suffixes)) not in LOCAL_FORMATS:
        raise ConfigError(
            f"data.dataset: {str(path)!r} must be one file or a folder of files of one type "
            f"({', '.join(LOCAL_FORMATS)}); found {sorted(suffixes) or 'no such files'}"
        )
    if all(p.stat().st_size == 0 for p in files):
        raise DataError(f"data.dataset: {str(path)!r} is empty")
    builder = LOCAL_FORMATS[files[0].suffix]
    # Local files carry no split of their own: everything is read as one (split_source holds out a part).
    ds = _guarded(
        lambda: datasets.load_dataset(
            builder, data_files={split: [str(p) for p in files]}, split=split, streaming=streaming
        ),
        f"data.dataset: cannot read {str(path)!r}",
        lambda: bad_json_line(path, files),
    )
    return ds, (path, files)


def bad_json_line(root: Path, files: Sequence[Path]) -> str | None:
    """Where the first malformed JSON in ``files`` (.jsonl, .json) is, in words ("line 18 is
    not valid JSON (...)"), or None. Reads every file in Python: only for after a load failed."""
    for file in files:
        where = f" of {file.relative_to(root)}" if root.is_dir() else ""
        if file.suffix == ".jsonl" or (file.suffix == ".json" and _is_json_lines(file)):
            found = _bad_line(file)
            if found is not None:
                return f"line {found[0]}{where} {found[1]}"
        elif file.suffix == ".json":
            try:
                json.loads(file.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as e:
                return f"line {e.lineno}{where} is not valid JSON ({_json_problem(e)})"
            except UnicodeDecodeError:
                return f"{file.name} is not UTF-8 text"
    return None


def _json_problem(e: json.JSONDecodeError) -> str:
    # json's messages end in " at" where it would add a position: "Unterminated string starting at".
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _is_json_lines(file: Path) -> bool:
    """Whether a .json file is JSON lines (the `datasets` json reader takes both): its first
    line is a whole JSON object of its own."""
    with open(file, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def _bad_line(file: Path) -> tuple[int, str] | None:
    with open(file, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
                if line and not isinstance(json.loads(line), dict):
                    return number, "is not a JSON object"
            except json.JSONDecodeError as e:
                return number, f"is not valid JSON ({_json_problem(e)})"
            except UnicodeDecodeError:
                return number, "is not UTF-8 text"
    return None


def iter_packed(
    documents: Iterable[Sequence[int]], context_len: int, bos_id: int, eos_id: int
) -> Iterator[list[int]]:
    """Pack token documents into contexts, lazily.

    Documents (token ids without special tokens) are joined with ``eos_id`` between them
    and cut into pieces of ``context_len - 1`` tokens; each piece gets ``bos_id`` in front,
    so every context looks like the start of a sequence to the model. Long documents span
    several contexts; empty ones are skipped; a final piece shorter than that is dropped.
    """
    if context_len < 2:
        raise ValueError(f"context_len must be at least 2, got {context_len}")
    body = context_len - 1
    pending: list[int] = []
    first = True
    for doc in documents:
        if len(doc) == 0:
            continue
        if not first:
            pending.append(eos_id)
        first = False
        pending.extend(doc)
        start = 0
        while len(pending) - start >= body:
            yield [bos_id, *pending[start : start + body]]
            start += body
        del pending[:start]


def pack(
    documents: Iterable[Sequence[int]], context_len: int, bos_id: int, eos_id: int
) -> torch.Tensor:
    """``iter_packed`` collected: LongTensor [n_contexts, context_len]."""
    contexts = list(iter_packed(documents, context_len, bos_id, eos_id))
    if not contexts:
        return torch.empty(0, context_len, dtype=torch.long)
    return torch.tensor(contexts, dtype=torch.long)


def iter_token_documents(
    dataset: TextData | datasets.Dataset | datasets.IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str = "text",
    chunk_docs: int = 256,
) -> Iterator[list[int]]:
    """Token ids of each document (no special tokens), tokenized ``chunk_docs`` at a time.

    Batched calls let the fast (Rust) tokenizer use every core; streaming datasets work
    the same way, since only ``chunk_docs`` texts are held at once. Raises ConfigError when
    the data ends without any document holding text (all empty or whitespace).
    """
    data = TextData.of(dataset, text_column)
    documents, has_text = 0, False
    for chunk in _read_chunks(data, chunk_docs):
        if text_column not in chunk:  # streaming datasets may not know their columns up front
            raise ConfigError(
                f"data.text_column: {text_column!r} is not a column; columns: {', '.join(chunk)}"
            )
        texts = [t for t in chunk[text_column] if t]
        if any(not isinstance(t, str) for t in texts):
            raise ConfigError(f"data.text_column: column {text_column!r} holds non-text values")
        documents += len(chunk[text_column])
        has_text = has_text or any(
            t.strip() for t in texts
        )  # stops looking at the first document with text
        if texts:
            yield from tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    if not has_text:
        # Else whitespace packs into contexts of blank tokens, and the run ends much later
        # asking for a larger data.token_budget.
        what = (
            f"its {documents:,} documents are all empty or whitespace"
            if documents
            else "it has no documents"
        )
        raise DataError(
            f"{data.origin.key}: {data.origin.description} holds no text ({what}), so no complete context of "
            "text can be packed from it; check data.dataset, data.split and data.text_column"
        )


def _read_chunks(data: TextData, chunk_docs: int) -> Iterator[dict]:
    """``data.dataset.iter``; a malformed local file that is streamed (read only now, not
    when loaded: ``_load_local``) stops in one line naming the file and line."""
    try:
        yield from data.dataset.iter(batch_size=chunk_docs)
    except ConfigError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        origin = data.origin
        if origin.root is None:
            raise  # hub data: connection errors mid-stream are not about the user's data
        detail = bad_json_line(origin.root, origin.files) or _first_line(e)
        raise DataError(f"{origin.key}: cannot read {str(origin.root)!r}: {detail}") from None


# Tokens that end a document in pretraining data (GPT-2, Qwen2, SmolLM2; Llama 3).
DOCUMENT_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>")


def context_bos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that starts every context (and every plain prompt), in this order:

    1. the special token the tokenizer itself puts first (BOS of Llama, Mistral, Gemma);
    2. the document separator (``document_separator_id``) when the tokenizer has one of
       ``DOCUMENT_SEPARATORS``: the token GPT-2, Qwen2 and SmolLM2 were pretrained with
       between documents. Their chat tokenizers name a chat-turn marker as BOS
       (SmolLM2-Instruct: ``<|im_start|>``) or EOS (``<|im_end|>``), which open and close
       turns, not documents; SmolLM2-135M-Instruct's loss on prose is 3.60 nats/token after
       ``<|im_start|>`` and 3.55 after ``<|endoftext|>``;
    3. else BOS, else EOS.
    """
    if tokenizer.eos_token_id is None and tokenizer.bos_token_id is None:
        raise ConfigError(
            "model.name_or_path: the tokenizer has neither a BOS nor an EOS token to mark contexts"
        )
    added = tokenizer("a", add_special_tokens=True)["input_ids"]
    if (
        len(added) > len(tokenizer("a", add_special_tokens=False)["input_ids"])
        and added[0] in tokenizer.all_special_ids
    ):
        return added[0]
    separator = _known_separator(tokenizer)
    if separator is not None:
        return separator
    return legacy_context_bos_id(tokenizer)


def document_separator_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token put between documents in a context: the first of ``DOCUMENT_SEPARATORS``
    the tokenizer has as a special token, else EOS (a chat model's EOS may end a turn)."""
    separator = _known_separator(tokenizer)
    return tokenizer.eos_token_id if separator is None else separator


def _known_separator(tokenizer: PreTrainedTokenizerBase) -> int | None:
    known = [t for t in DOCUMENT_SEPARATORS if t in tokenizer.all_special_tokens]
    return tokenizer.convert_tokens_to_ids(known[0]) if known else None


def legacy_context_bos_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The start token before ``context_bos_id``'s rules 1 and 2 (BOS, else EOS): activation
    caches made where it differs hold other activations and must not be reused."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def context_batches(
    dataset: TextData | datasets.Dataset | datasets.IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_column: str = "text",
    context_tokens: int = 256,
    token_budget: int | None = None,
    batch_contexts: int = 8,
    skip_contexts: int = 0,
    shard: Shard | None = None,
) -> Iterator[torch.Tensor]:
    """Packed contexts in batches: LongTensor [batch_contexts, context_tokens] (the last may be smaller).

    dataset: what ``load_text_dataset`` returned (errors met while reading it name its
    origin), or any ``datasets`` object with a ``text_column``. Stops after
    ``ceil(token_budget / context_tokens)`` contexts (counted from the start, skipped ones
    included) or when the data runs out. ``shard``: keep only this process's
    share, contexts i with i % world == rank (of those within the budget).
    ``skip_contexts`` drops the first contexts (of the share), to resume an interrupted
    harvest where it stopped.
    """
    bos = context_bos_id(tokenizer)
    limit = None if token_budget is None else -(-token_budget // context_tokens)
    contexts = iter_packed(
        iter_token_documents(dataset, tokenizer, text_column),
        context_tokens,
        bos,
        document_separator_id(tokenizer),
    )
    contexts = itertools.islice(contexts, limit)
    if shard is not None:
        contexts = itertools.islice(contexts, shard.rank, None, shard.world)
    contexts = itertools.islice(contexts, skip_contexts, None)
    while batch := list(itertools.islice(contexts, batch_contexts)):
        yield torch.tensor(batch, dtype=torch.long)
