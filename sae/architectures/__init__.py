"""SAE architectures: one module each, registered here by name.

Adding an architecture: write ``sae/architectures/<name>.py`` with a config dataclass and a
``SparseAutoencoder`` subclass, and add it to ``ARCHITECTURES``. Loading any SAE folder
(ours, SAELens, sparsify) is ``sae.formats.load_sae``.
"""

from __future__ import annotations

from sae.architectures.base import SparseAutoencoder
from sae.architectures.jumprelu import JumpReLUConfig, JumpReLUSAE
from sae.architectures.relu import ReLUConfig, ReLUSAE
from sae.architectures.topk import BatchTopKConfig, BatchTopKSAE, TopKConfig, TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (TopKSAE, BatchTopKSAE, ReLUSAE, JumpReLUSAE)}


__all__ = ["ARCHITECTURES", "BatchTopKConfig", "BatchTopKSAE", "JumpReLUConfig", "JumpReLUSAE", "ReLUConfig",
           "ReLUSAE", "SparseAutoencoder", "TopKConfig", "TopKSAE"]
