"""Activation cache on disk: harvest once, train many times (several epochs, sweeps).

A cache folder holds safetensors shards (``shard-00000.safetensors``: one tensor per hook
point, [n, d], rows of whole contexts) and ``manifest.json``:

    {"format": 1, "identity": {...what produced it...}, "complete": false,
     "tokens": 123, "contexts_done": 45,
     "shards": [{"file": ..., "tokens": ..., "contexts_done": ...,
                 "bytes": ..., "crc32": [one per crc32_chunk bytes], "crc32_chunk": ...}, ...]}

``identity`` names the model, hook points, dtype, widths, dataset, tokenizer fingerprint
and masking; a run whose identity differs is refused. Shards are written to a temporary
name and renamed, then the manifest is replaced atomically, so a shard is listed only
once it is whole. An interrupted cache run resumes after the last listed shard by skipping
``contexts_done`` contexts of the (deterministic) context stream. A shard's own
``contexts_done`` (the context count after its last row; absent in caches written before
it was added, which stay readable) lets a stream restart at that shard without the cache.

Damage: every listed shard's size is checked when a cache is opened, and its CRC-32 when
the shard is read (both recorded since they were added; older caches skip the check). A
writer that finds a shard missing or cut short drops it and every later shard from the
manifest and harvests them again (a shard records where its harvest restarts); a shard
that fails its checksum while read stops the run in one line naming it. One process at
a time writes a cache: it holds the folder's lock (``sae.folder_lock``) while incomplete.

Reading order: epoch 1 is manifest (= harvest) order, so a cold, a partial and a complete
cache all give the run the same row stream; epochs 2.. read the shards in a permutation
seeded by (seed, epoch) alone, so a reader can start at any row of any epoch.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from sae.atomic_io import fsync_dir, remove_temporaries, save_tensors, write_text_atomic
from sae.errors import ConfigError, DataError, StorageError
from sae.folder_lock import FolderLock

MANIFEST = "manifest.json"
FORMAT = 1
CRC_CHUNK = 64 << 20  # bytes per CRC-32 in a shard's "crc32" list (recorded as "crc32_chunk")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of the tokenizer's vocabulary and merges (fast tokenizers) or vocab (others)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # per-call state that tokenizer(..., padding=...) changes
        spec.pop("padding", None)
    else:
        spec = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def identity_difference(cached: dict, wanted: dict) -> str:
    """``first_difference`` of two cache identities, naming data keys as the config does
    (the identity's "dataset" section, kept for existing caches, holds the data.* keys)."""
    diff = first_difference(cached, wanted)
    return "data." + diff.removeprefix("dataset.") if diff.startswith("dataset.") else diff


def first_difference(a: dict, b: dict, prefix: str = "", a_has: str = "cache has") -> str:
    """'key.sub: <a_has> X, this run Y' for the first key where the nested dicts differ
    ('' if equal); keys in ``b``'s order, depth first, so a dataset's name is named before
    the fingerprint of its content."""
    for key in [*b, *(k for k in a if k not in b)]:
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            found = first_difference(a[key], b[key], f"{prefix}{key}.", a_has)
            if found:
                return found
        elif a.get(key) != b.get(key):
            return f"{prefix}{key}: {a_has} {a.get(key)!r}, this run {b.get(key)!r}"
    return ""


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """Indices of the shards in the order epoch ``epoch`` (1-based) reads them.

    Epoch 1 keeps manifest order, which is harvest order: a run that harvests while it
    trains and one that reads the finished cache then see the same rows in the same order.
    Later epochs are a permutation seeded by (seed, epoch) only, not by a generator that
    earlier epochs advanced, so a resumed reader can enter epoch 3 without replaying 1-2.
    """
    if epoch == 1:
        return list(range(n_shards))
    digest = hashlib.sha256(f"sae shard order {seed} {epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(n_shards, generator=generator).tolist()


class CacheWriter:
    """Appends harvested rows to a cache folder, one shard per ``shard_tokens`` rows (or more).

    ``identity`` is a JSON-able dict describing what produces the activations; an existing
    cache with another identity is refused. ``contexts_done`` after opening says how many
    contexts the listed shards already cover: skip that many when resuming. An incomplete
    (or damaged, then repaired) cache is claimed for this process until ``finish`` or
    ``close``; another live writer is refused in one line. ``log``: where the repair of a
    damaged cache is announced.
    """

    def __init__(
        self,
        folder: str | Path,
        identity: dict,
        shard_tokens: int = 65536,
        log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    ):
        self.folder, self.identity, self.shard_tokens = Path(folder), identity, shard_tokens
        self.lock: FolderLock | None = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(
                f"harvest.cache_dir: cannot create {str(self.folder)!r}: {e.strerror}"
            ) from None
        if (self.folder / MANIFEST).exists():
            self.manifest = read_manifest(self.folder)
            diff = identity_difference(self.manifest.get("identity", {}), identity)
            if diff:
                raise DataError(
                    f"harvest.cache_dir: {str(self.folder)!r} holds activations of another run "
                    f"({diff}); use another cache_dir"
                )
            damaged = first_damaged(self.folder, self.manifest["shards"])
            if not self.manifest["complete"] or damaged is not None:
                self._claim()
                try:
                    if damaged is not None:
                        self._drop_from(*damaged, log)
                except BaseException:
                    self.close()
                    raise
        else:
            self._claim()
            self.manifest = {
                "format": FORMAT,
                "identity": identity,
                "complete": False,
                "tokens": 0,
                "contexts_done": 0,
                "shards": [],
            }
            try:
                self._write_manifest()  # claims the folder for this run's identity at once
            except OSError as e:
                raise StorageError(
                    f"harvest.cache_dir: cannot write to {str(self.folder)!r}: {e.strerror}"
                ) from None
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._n_rows = 0

    def _claim(self) -> None:
        """Hold the folder while writing; leftovers of an interrupted write (never listed,
        so never read) are removed once no one else can be writing them."""
        self.lock = FolderLock(self.folder, "harvest.cache_dir")
        remove_temporaries(self.folder)

    def _drop_from(self, index: int, why: str, log: Callable[[str], None]) -> None:
        """Unlist shard ``index`` (damaged: ``why``) and all after it, to harvest them again."""
        shards = self.manifest["shards"]
        name = shards[index]["file"]
        restart = 0 if index == 0 else shards[index - 1].get("contexts_done")
        if restart is None:
            raise DataError(
                f"harvest.cache_dir: {name} in {str(self.folder)!r} is damaged ({why}), and this "
                "cache predates the restart points a repair needs; delete the folder to harvest again"
            )
        kept = shards[:index]
        self.manifest.update(
            shards=kept,
            complete=False,
            tokens=sum(s["tokens"] for s in kept),
            contexts_done=restart,
        )
        self._write_manifest()
        for shard in shards[index:]:
            (self.folder / shard["file"]).unlink(missing_ok=True)
        log(
            f"harvest.cache_dir: {name} in {self.folder} is damaged ({why}); harvesting it and the "
            f"{len(shards) - index - 1} shard(s) after it again (the cache keeps {index} shard(s))"
        )

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    @property
    def contexts_done(self) -> int:
        return self.manifest["contexts_done"]

    @property
    def tokens(self) -> int:
        return self.manifest["tokens"]

    def add(self, acts: dict[str, torch.Tensor], contexts_done: int) -> None:
        """Add one harvest batch; ``contexts_done`` is the stream position after it."""
        for name, rows in acts.items():
            self._rows.setdefault(name, []).append(rows.to("cpu"))
        self._n_rows += next(iter(acts.values())).shape[0]
        self._contexts_after = contexts_done
        if self._n_rows >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._n_rows:
            return
        index = len(self.manifest["shards"])
        name = f"shard-{index:05d}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        tensors = {hook: torch.cat(parts) for hook, parts in self._rows.items()}
        listed = self.manifest["tokens"]
        if self.lock is None:
            raise RuntimeError("CacheWriter: rows added after close()")
        self.lock.check()  # the folder was not deleted or taken over since this run claimed it
        try:
            save_tensors(tensors, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            size, crcs = tmp.stat().st_size, chunk_crcs(tmp)
            os.replace(tmp, self.folder / name)
            fsync_dir(
                self.folder
            )  # the shard's rename must be on disk before the manifest lists it
            self.manifest["shards"].append(
                {
                    "file": name,
                    "tokens": self._n_rows,
                    "contexts_done": self._contexts_after,
                    "bytes": size,
                    "crc32": crcs,
                    "crc32_chunk": CRC_CHUNK,
                }
            )
            self.manifest["tokens"] += self._n_rows
            self.manifest["contexts_done"] = self._contexts_after
            self._write_manifest()
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(
                f"harvest.cache_dir: cannot write {name} in {str(self.folder)!r} ({e.strerror}); "
                f"the cache keeps its {listed} tokens and resumes from there"
            ) from None
        self._rows, self._n_rows = {}, 0

    def finish(self) -> None:
        """Flush what is left and mark the cache complete (the token budget or data ran out)."""
        self.flush()
        self.manifest["complete"] = True
        self._write_manifest()
        self.close()

    def close(self) -> None:
        """Give up the claim on the folder (rows not yet in a shard are dropped)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _write_manifest(self) -> None:
        write_text_atomic(self.folder / MANIFEST, json.dumps(self.manifest, indent=1) + "\n")


def chunk_crcs(path: Path, chunk: int = CRC_CHUNK) -> list[int]:
    """CRC-32 of each ``chunk`` bytes of a file: damage detection, not protection from
    tampering. Chunks go to several threads (zlib releases the GIL), so the check runs at
    several GB/s and a page-cached cache stays fast to read."""
    size = Path(path).stat().st_size
    if size == 0:
        return []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return list(
                pool.map(
                    lambda start: zlib.crc32(memoryview(mapped)[start : start + chunk]),
                    range(0, size, chunk),
                )
            )


def first_damaged(folder: Path, shards: list[dict]) -> tuple[int, str] | None:
    """(index, why) of the first listed shard that is missing or of another size than
    written, or None. Cheap: sizes only (checksums are checked as shards are read)."""
    for i, shard in enumerate(shards):
        try:
            size = (Path(folder) / shard["file"]).stat().st_size
        except FileNotFoundError:
            return i, "missing"
        if "bytes" in shard and size != shard["bytes"]:
            return i, f"{size:,} bytes where {shard['bytes']:,} were written"
    return None


def damaged_shard(folder: Path, file: str, why: str) -> DataError:
    return DataError(
        f"harvest.cache_dir: {file} in {str(folder)!r} is damaged ({why}); delete that file and "
        "run again: a training run harvests it again"
    )


def read_shard(folder: Path, shard: dict) -> dict[str, torch.Tensor]:
    """A listed shard's tensors, its checksum checked (where the manifest records one)."""
    path = Path(folder) / shard["file"]

    def damaged(why: str) -> ConfigError:
        return damaged_shard(folder, shard["file"], why)

    if "crc32" in shard:
        try:
            found = chunk_crcs(path, shard.get("crc32_chunk", CRC_CHUNK))
        except FileNotFoundError:
            raise damaged("missing") from None
        except (OSError, ValueError) as e:
            raise damaged(getattr(e, "strerror", None) or str(e)) from None
        if found != shard["crc32"]:
            raise damaged("its checksum does not match the one recorded when it was written")
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise damaged("missing") from None
    except (OSError, SafetensorError) as e:
        raise damaged(getattr(e, "strerror", None) or str(e)) from None


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a cache folder; ConfigError if missing or not one of ours."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise DataError(f"harvest.cache_dir: {str(folder)!r} holds no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
        ok = (
            manifest.get("format") == FORMAT
            and isinstance(manifest.get("identity"), dict)
            and isinstance(manifest.get("shards"), list)
            and all(k in manifest for k in ("complete", "tokens", "contexts_done"))
        )
    except (ValueError, UnicodeDecodeError, AttributeError):
        ok = False
    if not ok:
        raise DataError(
            f"harvest.cache_dir: {str(path)!r} is not a format-{FORMAT} activation cache manifest; "
            "use another cache_dir"
        )
    return manifest


class CacheReader:
    """Iterable of {hook name: [n, d]} shards of a complete cache, ``epochs`` times: epoch 1
    in manifest order, later ones in an order seeded by (seed, epoch) (see ``shard_order``).
    Feed it to a ShuffleBuffer to mix across shards.

    ``start_row`` starts the stream (all epochs concatenated) at that row: whole shards
    before it are skipped without being read, the shard holding it is served from it on.
    ``identity``, if given, must match the cache's (same check as the writer).
    ``require_complete=False`` reads the shards listed so far (resuming a harvest).
    ``item_start`` is, after each shard served, where a harvest could restart to produce
    it: {"contexts": c, "rows_before_contexts": rows before that shard} in epoch 1 when
    the manifest records the previous shard's context count, else both None.
    """

    def __init__(
        self,
        folder: str | Path,
        hooks: list[str] | None = None,
        epochs: int = 1,
        seed: int = 0,
        identity: dict | None = None,
        require_complete: bool = True,
        start_row: int = 0,
    ):
        self.folder, self.epochs, self.seed, self.start_row = Path(folder), epochs, seed, start_row
        self.manifest = read_manifest(folder)
        if identity is not None:
            diff = identity_difference(self.manifest["identity"], identity)
            if diff:
                raise DataError(
                    f"harvest.cache_dir: {str(folder)!r} holds activations of another run ({diff})"
                )
        if require_complete and not self.manifest["complete"]:
            raise DataError(
                f"harvest.cache_dir: the cache in {str(folder)!r} is incomplete "
                f"({self.manifest['tokens']} tokens); rerun the harvest to finish it"
            )
        cached = self.manifest["identity"]["hooks"]
        self.hooks = hooks or cached
        missing = [h for h in self.hooks if h not in cached]
        if missing:
            raise ConfigError(
                f"hooks: {missing[0]!r} is not in the cache at {str(folder)!r}; it has {', '.join(cached)}"
            )
        damaged = first_damaged(self.folder, self.manifest["shards"])
        if damaged is not None:
            raise damaged_shard(
                self.folder, self.manifest["shards"][damaged[0]]["file"], damaged[1]
            )
        self.item_start: dict = {"contexts": None, "rows_before_contexts": None}

    def _restart_points(self) -> list[dict]:
        """Per shard, the harvest restart point that reproduces it (epoch 1 only)."""
        points, rows, contexts = [], 0, 0
        for shard in self.manifest["shards"]:
            points.append(
                {
                    "contexts": contexts,
                    "rows_before_contexts": rows if contexts is not None else None,
                }
            )
            rows += shard["tokens"]
            contexts = shard.get("contexts_done")  # None in caches written before it was recorded
        return points

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        shards = self.manifest["shards"]
        epoch_rows = sum(s["tokens"] for s in shards)
        restart = self._restart_points()
        row = 0  # stream row of the next shard's first row
        for epoch in range(1, self.epochs + 1):
            if row + epoch_rows <= self.start_row:
                row += epoch_rows  # the whole epoch lies before the start: no shard is opened
                continue
            for i in shard_order(len(shards), self.seed, epoch):
                n = shards[i]["tokens"]
                drop = max(0, self.start_row - row)
                row += n
                if drop >= n:
                    continue
                tensors = read_shard(self.folder, shards[i])
                self.item_start = (
                    restart[i] if epoch == 1 else {"contexts": None, "rows_before_contexts": None}
                )
                yield {h: tensors[h][drop:] for h in self.hooks}
