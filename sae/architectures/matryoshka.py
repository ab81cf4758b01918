"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen and Nanda 2025, "Learning
Multi-Level Features with Matryoshka Sparse Autoencoders").

Nested dictionaries: the first m_1 < m_2 < ... < m_n = M latents must each reconstruct x on
their own, so the early latents learn general features and the later ones refine them
instead of absorbing them.

    S       = ReLU(the N*k largest pre-activations of the batch, over all M latents)  [N, M]
    x_hat_i = S[:, :m_i] @ W_dec[:m_i] + b_dec                                        [N, d]
    L       = sum_i |x - x_hat_i|^2 / V  +  AuxK (on the full residual x - x_hat_n)

with V the batch's total variance, as for TopK. Selection, AuxK, the inference threshold
(a running average of the smallest selected value), initialisation, decoder norms and
learning rate are BatchTopK's, and at inference the SAE is a JumpReLU with one threshold
for every latent: it is saved and converted exactly as batchtopk is (SAELens "jumprelu").
The loss is the fused, Triton-free one (``fused_topk``, ``TopKSpec.prefixes``): a prefix's
code is the full code with its columns >= m_i zeroed, so it costs a decode, not a new
selection.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sae.architectures.fused_topk import TopKSpec
from sae.architectures.topk import BatchTopKConfig, BatchTopKSAE
from sae.config import architecture_field, opt
from sae.errors import ConfigError

# The nested sizes that dictionary_learning's demo configuration (Karvonen, a co-author; the
# paper points to that repository's trainer as its implementation) trains with: groups of
# 1/32, 1/16, 1/8, 1/4 and 1/2 + 1/32 of the latents, i.e. prefixes ending at these fractions.
DEFAULT_PREFIX_FRACTIONS = [1 / 32, 3 / 32, 7 / 32, 15 / 32, 1.0]


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    architecture: str = architecture_field("matryoshka")
    prefix_fractions: list[float] = opt(
        DEFAULT_PREFIX_FRACTIONS,
        "Sizes of the nested dictionaries that each reconstruct the input on their own, as "
        "fractions of num_latents (each rounded to a whole number of latents): strictly "
        "increasing, the last 1.0 (all latents). [1.0] is plain batchtopk.",
        gt=0,
        le=1,
    )

    def __post_init__(self) -> None:
        # Refused when the config is read, before any work; sizes are checked in for_width.
        fr = list(self.prefix_fractions)
        if not fr or fr[-1] != 1.0 or any(a >= b for a, b in zip(fr, fr[1:])):
            raise ConfigError(
                f"sae.prefix_fractions: {fr} is not valid; give fractions of num_latents that "
                f"strictly increase and end at 1.0, e.g. {DEFAULT_PREFIX_FRACTIONS}"
            )

    def for_width(self, d_in: int) -> MatryoshkaConfig:
        cfg = super().for_width(d_in)
        sizes = cfg.prefix_sizes()
        M = cfg.num_latents
        for f, prev, m in zip(cfg.prefix_fractions, [0, *sizes], sizes):
            if m <= prev:
                raise ConfigError(
                    f"sae.prefix_fractions: {f} of the {M} latents for width {d_in} is {m} "
                    f"latents, not more than the prefix before it ({prev}); use fewer or larger "
                    "fractions, or more latents"
                )
        return cfg

    def prefix_sizes(self) -> list[int]:
        """The nested sizes m_1 < ... < m_n = num_latents, in latents (num_latents set)."""
        return [round(f * self.num_latents) for f in self.prefix_fractions]


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK with the nested reconstruction terms. The loss weights every prefix 1,
    the sum of the paper's equation and of SAELens's MatryoshkaBatchTopKTrainingSAE
    (dictionary_learning's trainer averages instead: the sum over n levels divided by
    n^2, with its default uniform weights; that rescales the reconstruction against AuxK
    only). With the sum, prefix_fractions [1.0] is exactly batchtopk's loss."""

    Config = MatryoshkaConfig
    # No short-run raise of the learning rate: the late latents die under it. Demo, 427
    # steps, held-out: the published rate FVU 0.136 / 0% dead, x2 0.112 / 2.0%, x4.4
    # 0.094 / 19% (BENCHMARKS.md, TopK family against the peers).
    short_run_lr_cap = 1.0

    def spec(self, progress: float = 1.0) -> TopKSpec:
        # the last size is M, the main term every TopK loss has; the others add terms
        prefixes = tuple(self.cfg.prefix_sizes()[:-1])
        return dataclasses.replace(super().spec(progress), prefixes=prefixes)
