"""Telling a local path from a Hugging Face hub id, and fetching SAEs from the hub.

An SAE on the hub is named ``org/repo/subfolder`` (``EleutherAI/sae-llama-3-8b-32x/layers.10``),
``org/repo`` when the SAE sits at the repo's root, or with an explicit ``hf://`` prefix.
Only that subfolder (and the repo's top-level ``config.json``, which sparsify runs use for
the model and data) is downloaded, into ``checkpoints/hub/<org>/<repo>/`` (``$SAE_HUB_DIR``
instead of ``checkpoints/hub``), so feature statistics and reports land beside it like a
local SAE's, and a second use works offline.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sae.errors import ConfigError

HUB_DIR = Path("checkpoints/hub")
_SAE_FILES = (
    "cfg.json",
    "sae_weights.safetensors",
    "sae.safetensors",
    "activation_scaler.json",
    "sae_cfg.json",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(?:/[\w.-]+)*")


def looks_like_local_path(name: str) -> bool:
    """True for what can only be a path: hub ids are "name" or "org/name"."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def hub_dir() -> Path:
    return Path(os.environ.get("SAE_HUB_DIR") or HUB_DIR)


def is_hub_spec(spec: str) -> bool:
    """``hf://...``, or ``org/repo[/subfolder]`` when neither it nor its first part is a local
    folder (so a mistyped local path under an existing folder is reported as missing)."""
    if spec.startswith("hf://"):
        return True
    if Path(spec).exists() or spec.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(spec):
        return False
    return not Path(spec.split("/")[0]).exists()


def resolve_sae_path(spec: str | Path) -> Path:
    """A local folder for an SAE argument: the path itself, or the hub SAE downloaded."""
    text = str(spec)
    if text.startswith("hf:/") and not text.startswith(
        "hf://"
    ):  # a pathlib.Path folds the double slash
        text = "hf://" + text[4:]
    if not is_hub_spec(text):
        return Path(spec)
    text = text.removeprefix("hf://")
    parts = text.split("/")
    if len(parts) < 2 or not _HUB_ID.fullmatch(text):
        raise ConfigError(
            f"SAE: {str(spec)!r} is not a hub SAE; write org/repo or org/repo/subfolder"
        )
    return fetch_sae("/".join(parts[:2]), "/".join(parts[2:]))


def fetch_sae(repo_id: str, subfolder: str = "") -> Path:
    """Download one SAE folder of a hub repo (if not already here); its local path."""
    root = hub_dir() / repo_id
    local = root / subfolder if subfolder else root
    if (local / "cfg.json").is_file() and any((local / w).is_file() for w in _SAE_FILES[1:3]):
        return local
    prefix = f"{subfolder}/" if subfolder else ""
    patterns = [prefix + f for f in _SAE_FILES] + ["config.json"]
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, allow_patterns=patterns, local_dir=root)
    except Exception as e:  # offline, no such repo, gated, ...: all mean the same to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"SAE: cannot download {repo_id}{'/' + subfolder if subfolder else ''} from the "
            f"Hugging Face hub ({type(e).__name__}: {reason})"
        ) from None
    if not (local / "cfg.json").is_file():
        raise ConfigError(
            f"SAE: the hub repo {repo_id} has no SAE in {subfolder or 'its top folder'} (no cfg.json); "
            f"name its subfolder, e.g. {repo_id}/layers.10"
        )
    return local
