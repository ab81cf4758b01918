"""The run config that describes a saved SAE's model and data: its run's config.yaml when
it is one of our runs, else one made from the metadata its files carry (any format)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sae.config import RunConfig, load_config, saved_config
from sae.formats import NATIVE, StoredSAE


def run_config_of(folder: Path) -> Path | None:
    """The config.yaml of the run an SAE folder belongs to, if any (one or two levels up)."""
    for up in (folder.parent, folder.parent.parent):
        if (up / "config.yaml").is_file():
            return up / "config.yaml"
    return None


def analysis_config(stored: StoredSAE, overrides: Iterable[str] = ()) -> RunConfig:
    """The config whose model and data sections describe the SAE: its run's config.yaml,
    else one built from its metadata (model, dataset, split, text column, context length)."""
    run_config = run_config_of(stored.folder) if stored.format == NATIVE else None
    if run_config is not None:
        return saved_config(run_config, overrides)
    meta = stored.metadata
    keys = {
        "model_name": "model.name_or_path",
        "dataset_path": "data.dataset",
        "dataset_split": "data.split",
        "text_column": "data.text_column",
        "context_size": "data.context_tokens",
    }
    base = [f"{key}={meta[field]}" for field, key in keys.items() if meta.get(field)]
    return load_config(None, [*base, *overrides])
