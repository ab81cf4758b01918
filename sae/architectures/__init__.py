"""Stage 4, SAE architectures: one module each, registered here by name (docs/design.md §2).

- ``topk`` (TopK and BatchTopK), ``matryoshka`` (Matryoshka BatchTopK: nested prefixes of
  the latents each reconstruct), ``relu`` (L1 penalty), ``jumprelu``, ``gated``; ``base``: the
  shared module, initialisation and on-disk layout.
- ``fused_topk``: the TopK family's fused loss (one autograd Function) and its dense
  reference; ``sharded_topk``: the same with the latents split over processes.

Adding an architecture: write ``sae/architectures/<name>.py`` with its config (a subclass of
``sae.config.SAEConfig`` holding every setting it reads, with help and bounds: the run
config's ``sae`` section, ``--help`` and the one-line errors come from it) and a
``SparseAutoencoder`` subclass (its recipe, loss, tensors on disk and SAELens names), and add
the class to ``ARCHITECTURES`` below. Loading any SAE folder
(ours, SAELens, sparsify) is ``sae.formats.load_sae``. Imports only the sides (and
``sae.distributed`` for the sharded loss): no stage before it is needed to define an SAE.
"""

from __future__ import annotations

from sae.architectures.base import SparseAutoencoder
from sae.architectures.gated import GatedConfig, GatedSAE
from sae.architectures.jumprelu import JumpReLUConfig, JumpReLUSAE
from sae.architectures.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from sae.architectures.relu import ReLUConfig, ReLUSAE
from sae.architectures.topk import BatchTopKConfig, BatchTopKSAE, TopKConfig, TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.Config.architecture: cls
    for cls in (TopKSAE, BatchTopKSAE, MatryoshkaSAE, ReLUSAE, JumpReLUSAE, GatedSAE)
}


__all__ = [
    "ARCHITECTURES",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "GatedConfig",
    "GatedSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "ReLUConfig",
    "ReLUSAE",
    "SparseAutoencoder",
    "TopKConfig",
    "TopKSAE",
]
