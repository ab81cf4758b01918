"""SAE architectures: one module each, registered here by name.

Adding an architecture: write ``sae/architectures/<name>.py`` with a config dataclass and a
``SparseAutoencoder`` subclass, and add it to ``ARCHITECTURES``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sae.architectures.base import CONFIG_FILE, SparseAutoencoder
from sae.architectures.jumprelu import JumpReLUConfig, JumpReLUSAE
from sae.architectures.relu import ReLUConfig, ReLUSAE
from sae.architectures.topk import BatchTopKConfig, BatchTopKSAE, TopKConfig, TopKSAE
from sae.errors import ConfigError

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (TopKSAE, BatchTopKSAE, ReLUSAE, JumpReLUSAE)}


def load_sae(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
    """An SAE saved with ``save``: architecture from cfg.json, weights in ``dtype`` on ``device``."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder / CONFIG_FILE}: not a readable SAE config ({e})") from None
    arch = cfg.get("architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{folder / CONFIG_FILE}: architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch].load_folder(folder, cfg, device, dtype)


__all__ = ["ARCHITECTURES", "BatchTopKConfig", "BatchTopKSAE", "JumpReLUConfig", "JumpReLUSAE", "ReLUConfig",
           "ReLUSAE", "SparseAutoencoder", "TopKConfig", "TopKSAE", "load_sae"]
