"""One wide TopK SAE split by latents over several processes (``distributed.mode: latents``).

Rank r of w owns latents [r M/w, (r+1) M/w): its slice of W_enc [M/w, d], b_enc [M/w] and
W_dec [M/w, d]; b_dec [d] is replicated. Every rank sees the same batch x [N, d].

    pre_r   = (x - b_dec) @ W_enc_r.T + b_enc_r                  [N, M/w]   local GEMM
    top-k   : each rank's k best per token are all-gathered      [N, k w]   values only
              and the k-th best of those is the global cut t_n
    z_r     = ReLU(pre_r) where pre_r >= t_n, else 0              the rank's part of TopK
    x_hat   = sum_r z_r @ W_dec_r + b_dec                          one all-reduce of [N, d]
    L       = |x - x_hat|^2 / V  (+ AuxK: the same with the dead latents' global top k_aux)

which is the unsharded loss of ``sae.architectures.fused_topk`` (its dense reference,
``topk_loss_reference``, is what the tests compare with). Gradients: the loss is the same
on every rank, so the decoder's all-reduce passes gradients straight back
(``_SumOverRanks``), and the encoder input's gradient, which each rank has only part of,
is summed on the way back (``_SharedInput``), so b_dec gets the whole of it. Dense
[N, M/w] codes are fine here: the point of this mode is an SAE too wide for one device,
and each device holds only its share.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from sae.architectures.base import total_variance
from sae.distributed import Dist, collective


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum of every rank's tensor. Backward: the gradient as it is (every rank
    computes the same loss from the sum, so each already holds the whole gradient)."""

    @staticmethod
    def forward(ctx, t):
        out = t.clone()
        collective(tdist.all_reduce, out)
        return out

    @staticmethod
    def backward(ctx, g):
        return g


class _SharedInput(torch.autograd.Function):
    """Forward: the input as it is (the same on every rank). Backward: the sum of every
    rank's gradient (each rank's encoder slice contributes a part)."""

    @staticmethod
    def forward(ctx, t):
        return t

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        collective(tdist.all_reduce, g)
        return g


def _global_topk_code(pre: torch.Tensor, k: int, dist: Dist) -> torch.Tensor:
    """This rank's part [N, M/w] of ReLU(TopK_k over all ranks' latents) of pre [N, M/w]."""
    vals = pre.detach().topk(min(k, pre.shape[1]), dim=1).values  # [N, <=k]
    everyone = dist.gather_rows(vals.t().contiguous()).t()  # [N, w * <=k]
    cut = everyone.topk(k, dim=1).values[:, -1:]  # [N, 1]
    return torch.where(pre >= cut, pre, torch.zeros_like(pre)).relu()


def sharded_topk_loss(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    dist: Dist,
    dead: torch.Tensor | None = None,
    k_aux: int = 512,
    aux_alpha: float = 1 / 32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, fvu, fires) of the latent-sharded TopK SAE; see the module docstring.

    x [N, d] (the same on every rank); W_enc, W_dec [M/w, d], b_enc [M/w]: this rank's
    latents; b_dec [d]; dead: bool [M/w], this rank's dead latents. loss and fvu are the
    whole SAE's (the same on every rank); fires [M/w] counts this rank's latents.
    """
    xc = _SharedInput.apply(x - b_dec)
    pre = xc @ W_enc.t() + b_enc  # [N, M/w]
    z = _global_topk_code(pre, k, dist)
    e = x - (_SumOverRanks.apply(z @ W_dec) + b_dec)
    var = total_variance(x)
    loss = e.pow(2).sum() / var
    fvu = loss.detach().clone()
    n_dead = int(dist.sum_(dead.sum().reshape(1))[0]) if dead is not None else 0
    if n_dead and aux_alpha > 0:
        z_aux = _global_topk_code(pre.masked_fill(~dead, float("-inf")), min(k_aux, n_dead), dist)
        residual = e.detach() - _SumOverRanks.apply(z_aux @ W_dec)
        loss = loss + aux_alpha * min(n_dead / k_aux, 1.0) * residual.pow(2).sum() / var
    return loss, fvu, (z > 0).sum(0)
