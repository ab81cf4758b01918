"""Activation cache on disk: harvest once, train many times (several epochs, sweeps).

A cache folder holds safetensors shards (``shard-00000.safetensors``: one tensor per hook
point, [n, d], rows of whole contexts) and ``manifest.json``:

    {"format": 1, "identity": {...what produced it...}, "complete": false,
     "tokens": 123, "contexts_done": 45, "shards": [{"file": ..., "tokens": ...}, ...]}

``identity`` names the model, hook points, dtype, widths, dataset, tokenizer fingerprint
and masking; a run whose identity differs is refused. Shards are written to a temporary
name and renamed, then the manifest is replaced atomically, so a shard is listed only
once it is whole. An interrupted cache run resumes after the last listed shard by skipping
``contexts_done`` contexts of the (deterministic) context stream.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from sae.atomic_io import fsync_dir, write_text_atomic
from sae.errors import ConfigError

MANIFEST = "manifest.json"
FORMAT = 1


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


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            found = _first_difference(a[key], b[key], f"{prefix}{key}.")
            if found:
                return found
        elif a.get(key) != b.get(key):
            return f"{prefix}{key}: cache has {a.get(key)!r}, this run {b.get(key)!r}"
    return ""


class CacheWriter:
    """Appends harvested rows to a cache folder, one shard per ``shard_tokens`` rows (or more).

    ``identity`` is a JSON-able dict describing what produces the activations; an existing
    cache with another identity is refused. ``contexts_done`` after opening says how many
    contexts the listed shards already cover: skip that many when resuming.
    """

    def __init__(self, folder: str | Path, identity: dict, shard_tokens: int = 65536):
        self.folder, self.identity, self.shard_tokens = Path(folder), identity, shard_tokens
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"harvest.cache_dir: cannot create {str(self.folder)!r}: {e.strerror}") from None
        if (self.folder / MANIFEST).exists():
            self.manifest = read_manifest(self.folder)
            diff = _first_difference(self.manifest.get("identity", {}), identity)
            if diff:
                raise ConfigError(f"harvest.cache_dir: {str(self.folder)!r} holds activations of another run "
                                  f"({diff}); use another cache_dir")
        else:
            self.manifest = {"format": FORMAT, "identity": identity, "complete": False, "tokens": 0,
                             "contexts_done": 0, "shards": []}
            try:
                self._write_manifest()  # claims the folder for this run's identity at once
            except OSError as e:
                raise ConfigError(f"harvest.cache_dir: cannot write to {str(self.folder)!r}: {e.strerror}") from None
        # Leftovers of an interrupted write are never listed, so never read: remove them.
        for stale in self.folder.glob(".shard-*"):
            stale.unlink()
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._n_rows = 0

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
        try:
            save_file(tensors, str(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / name)
            fsync_dir(self.folder)  # the shard's rename must be on disk before the manifest lists it
            self.manifest["shards"].append({"file": name, "tokens": self._n_rows})
            self.manifest["tokens"] += self._n_rows
            self.manifest["contexts_done"] = self._contexts_after
            self._write_manifest()
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"harvest.cache_dir: cannot write {name} in {str(self.folder)!r} ({e.strerror}); "
                              f"the cache keeps its {listed} tokens and resumes from there") from None
        self._rows, self._n_rows = {}, 0

    def finish(self) -> None:
        """Flush what is left and mark the cache complete (the token budget or data ran out)."""
        self.flush()
        self.manifest["complete"] = True
        self._write_manifest()

    def _write_manifest(self) -> None:
        write_text_atomic(self.folder / MANIFEST, json.dumps(self.manifest, indent=1) + "\n")


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a cache folder; ConfigError if missing or not one of ours."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ConfigError(f"harvest.cache_dir: {str(folder)!r} holds no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
        ok = (manifest.get("format") == FORMAT and isinstance(manifest.get("identity"), dict)
              and isinstance(manifest.get("shards"), list)
              and all(k in manifest for k in ("complete", "tokens", "contexts_done")))
    except (ValueError, UnicodeDecodeError, AttributeError):
        ok = False
    if not ok:
        raise ConfigError(f"harvest.cache_dir: {str(path)!r} is not a format-{FORMAT} activation cache manifest; "
                          "use another cache_dir")
    return manifest


class CacheReader:
    """Iterable of {hook name: [n, d]} shards of a complete cache, ``epochs`` times, each
    epoch in a new random shard order. Feed it to a ShuffleBuffer to mix across shards.

    ``identity``, if given, must match the cache's (same check as the writer).
    ``require_complete=False`` reads the shards listed so far (resuming a harvest).
    """

    def __init__(self, folder: str | Path, hooks: list[str] | None = None, epochs: int = 1, seed: int = 0,
                 identity: dict | None = None, require_complete: bool = True):
        self.folder, self.epochs = Path(folder), epochs
        self.manifest = read_manifest(folder)
        if identity is not None:
            diff = _first_difference(self.manifest["identity"], identity)
            if diff:
                raise ConfigError(f"harvest.cache_dir: {str(folder)!r} holds activations of another run ({diff})")
        if require_complete and not self.manifest["complete"]:
            raise ConfigError(f"harvest.cache_dir: the cache in {str(folder)!r} is incomplete "
                              f"({self.manifest['tokens']} tokens); rerun the harvest to finish it")
        cached = self.manifest["identity"]["hooks"]
        self.hooks = hooks or cached
        missing = [h for h in self.hooks if h not in cached]
        if missing:
            raise ConfigError(f"hooks: {missing[0]!r} is not in the cache at {str(folder)!r}; it has {', '.join(cached)}")
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        shards = self.manifest["shards"]
        for _ in range(self.epochs):
            for i in torch.randperm(len(shards), generator=self.generator).tolist():
                tensors = load_file(str(self.folder / shards[i]["file"]))
                yield {h: tensors[h] for h in self.hooks}
