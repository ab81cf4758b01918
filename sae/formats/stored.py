"""The in-memory form every format is read into and written from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class StoredSAE:
    """An SAE as files describe it, before any module is built.

    cfg: a cfg.json in our format: ``architecture``, that architecture's config fields
        (d_in, num_latents, k, ...), d_sae, apply_b_dec_to_input, dtype, and ``metadata``
        (model_name, hook_name in our naming, context_size, dataset_path; ``source`` for
        an SAE read from another format).
    tensors: our names and layouts: W_enc [d, M], W_dec [M, d], b_enc [M], b_dec [d], and
        threshold [M] for jumprelu and batchtopk; in the dtype the file stores them in.
    folder, format: where it was read from and in which format.
    weights: the weights file (its size and mtime identify cached feature statistics).
    """

    cfg: dict
    tensors: dict[str, torch.Tensor]
    folder: Path
    format: str
    weights: Path

    @property
    def metadata(self) -> dict:
        return self.cfg.get("metadata") or {}

    @property
    def hook(self) -> str | None:
        """The hook point in our naming, or None if the files name none we can map."""
        return self.metadata.get("hook_name")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def imported_metadata(
    fmt: str,
    their_hook: str | None,
    our_hook: str | None,
    model: str | None,
    dataset: str | None,
    context_size: int | None,
    **more,
) -> dict:
    """Our metadata block for an SAE read from another format; ``source`` keeps their hook name."""
    meta = {
        "model_name": model,
        "hook_name": our_hook,
        "context_size": context_size,
        "dataset_path": dataset,
        **more,
        "source": {"format": fmt, "hook_name": their_hook},
    }
    return {k: v for k, v in meta.items() if v is not None}
