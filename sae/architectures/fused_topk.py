"""The fused, Triton-free loss of the TopK family (TopK, multi-TopK, BatchTopK, Matryoshka
BatchTopK): encoder, sparse decoder, MSE and AuxK in one ``torch.autograd.Function``.

Notation (docs/design.md §2): x [N, d] inputs, M latents, k active, W_enc [M, d],
b_enc [M], W_dec [M, d], b_dec [d].

    pre   = (x - b_dec) @ W_enc.T + b_enc                  [N, M]  (the one dense GEMM)
    S     = ReLU(select(pre))   a sparse code [N, M]: TopK_k per token, or for BatchTopK
                                the N*k largest of the whole batch
    x_hat = S @ W_dec + b_dec                              [N, d]  (embedding_bag)
    e     = x - x_hat
    L     = |e|^2 / V                                      main term
          + sum_m |x - x_hat_m|^2 / V                      Matryoshka only: for each prefix
                                                           size m in spec.prefixes, x_hat_m
                                                           decodes S's latents with index < m
          + w4 |x - x_hat4|^2 / V                          multi-TopK only: x_hat4 from 4k,
                                                           w4 = spec.multi_topk_weight (1/8)
          + alpha * s * |e - e_hat|^2 / V                  AuxK, when latents are dead
      V     = sum_n |x_n - mean(x)|^2 (batch total variance)
      e_hat = decode of ReLU(TopK_k_aux(pre restricted to dead latents)), no bias
      s     = min(n_dead / k_aux, 1); e is a constant in the AuxK term

What backward keeps: inputs, each code's indices and values (nnz = N*k, N*4k, N*k_aux),
and each term's residual [N, d]. The N x M pre-activations are freed right after
selection, no N x k x d tensor is ever made (the gradients of the code values are a
sampled dense-dense product), and each weight gradient is one sparse (CSR) x dense
product per term. AuxK's gradient reaches the encoder through the dead latents'
pre-activations.

A Matryoshka prefix term needs no code of its own: S's columns ascend within each row, and
the prefix's code is S with the values at columns >= m set to zero. It keeps S's sparsity
pattern (so it shares S's index tensors, its transpose, and one encoder-gradient product:
the value gradients of all terms on S are summed first; only its values [nnz] and its
residual [N, d] are new), and a zeroed value gets no gradient, as the ReLU's mask already
does for values that are zero.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sae.architectures.base import total_variance

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@dataclass(frozen=True)
class TopKSpec:
    """How latents are selected and which loss terms are added."""

    k: int
    k_aux: int = 512
    aux_alpha: float = 1 / 32
    multi_topk: bool = False  # add the FVU of the top 4k latents, weighted multi_topk_weight
    batch_topk: bool = False  # select the N*k largest pre-activations of the batch
    # Matryoshka: sizes m (ascending, each < M) of nested prefixes of the latents; each adds
    # the squared error of decoding only the main code's latents with index < m, weight 1
    prefixes: tuple[int, ...] = ()
    multi_topk_weight: float = 1 / 8


class Codes(NamedTuple):
    """A sparse [N, M] code in CSR order: row n holds cols[crow[n]:crow[n + 1]] (ascending)
    with the same slice of vals. rows [nnz] repeats each row index (for transposing)."""

    crow: torch.Tensor  # [N + 1] int64
    rows: torch.Tensor  # [nnz] int64
    cols: torch.Tensor  # [nnz] int64
    vals: torch.Tensor  # [nnz], ReLU applied


def _counts(ids: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """How often each of 0..n-1 occurs in ids (optionally weighted), int64 [n].

    Unlike bincount (whose output size depends on the data) this never waits for the GPU.
    """
    ones = torch.ones_like(ids) if weights is None else weights.long()
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(
        0, ids.reshape(-1), ones.reshape(-1)
    )


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(counts) + 1, dtype=torch.long, device=counts.device)
    torch.cumsum(counts, 0, out=out[1:])
    return out


def per_token_codes(vals: torch.Tensor, idx: torch.Tensor) -> Codes:
    """Codes from k selected (vals, idx) per token, each [N, k]; ReLU applied here."""
    n, k = idx.shape
    cols, order = idx.sort(dim=1)  # CSR wants ascending columns within a row
    return Codes(
        torch.arange(0, n * k + 1, k, device=idx.device),
        torch.arange(n, device=idx.device).repeat_interleave(k),
        cols.reshape(-1),
        vals.gather(1, order).reshape(-1).relu(),
    )


def batch_codes(vals: torch.Tensor, flat_idx: torch.Tensor, n: int, m: int) -> Codes:
    """Codes from entries selected anywhere in an [n, m] matrix: vals, flat_idx [nnz]."""
    flat, order = flat_idx.sort()  # row-major order = CSR order
    rows = flat // m
    return Codes(_offsets(_counts(rows, n)), rows, flat % m, vals[order].relu())


def _select(pre: torch.Tensor, k: int, batch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest per row ([N, k] each), or the N*k largest overall ([N*k] each, flat indices)."""
    if batch:
        return pre.view(-1).topk(pre.shape[0] * k, sorted=False)
    return pre.topk(k, dim=1, sorted=False)


def select_codes(pre: torch.Tensor, spec: TopKSpec) -> tuple[Codes, Codes | None]:
    """(main code, the 4k code for multi-TopK or None) from pre-activations [N, M]."""
    n, m = pre.shape
    make = (lambda v, i: batch_codes(v, i, n, m)) if spec.batch_topk else per_token_codes
    if not spec.multi_topk:
        return make(*_select(pre, spec.k, spec.batch_topk)), None
    v4, i4 = _select(pre, min(4 * spec.k, m), spec.batch_topk)
    # The top k are among the top 4k: select them from the 4k, not again from all M.
    v, j = v4.topk(pre.shape[0] * spec.k if spec.batch_topk else spec.k, dim=-1, sorted=False)
    return make(v, i4.gather(-1, j)), make(v4, i4)


def decode(codes: Codes, W_dec: torch.Tensor) -> torch.Tensor:
    """codes @ W_dec without a bias: [N, d]."""
    return F.embedding_bag(
        codes.cols,
        W_dec,
        codes.crow,
        per_sample_weights=codes.vals,
        mode="sum",
        include_last_offset=True,
    )


def _transposer(codes: Codes, n_latents: int):
    """A function values [nnz] -> the sparse [M, N] CSR transpose of the code's pattern
    holding them; the column sort is done once and shared by every use."""
    # int32 keys: a stable sort of them is ~7x faster than of int64 on CPU; stable keeps
    # the summation order, hence the gradients, bit-reproducible.
    order = torch.argsort(codes.cols.int(), stable=True)
    crow, rows = _offsets(_counts(codes.cols, n_latents)), codes.rows[order]
    n = len(codes.crow) - 1
    return lambda values: torch.sparse_csr_tensor(
        crow, rows, values[order], size=(n_latents, n), check_invariants=False
    )  # valid by construction


def _row_dots(grad: torch.Tensor, W: torch.Tensor, codes: Codes) -> torch.Tensor:
    """out[j] = grad[rows[j]] . W[cols[j]] for every code entry j, as a sampled dense-dense
    product (SDDMM): only the nnz needed entries of grad @ W.T are computed, and no
    [nnz, d] tensor is made. grad [N, d], W [M, d] -> [nnz]."""
    pattern = torch.sparse_csr_tensor(
        codes.crow,
        codes.cols,
        torch.zeros_like(codes.vals, dtype=grad.dtype),
        size=(grad.shape[0], W.shape[0]),
        check_invariants=False,
    )
    return torch.sparse.sampled_addmm(pattern, grad, W.t(), beta=0.0).values()


class FusedTopKLoss(torch.autograd.Function):
    """loss, fvu, fires, min_active = FusedTopKLoss.apply(x, W_enc, b_enc, W_dec, b_dec, spec, dead, workspace, var)

    x [N, d]; W_enc, W_dec [M, d]; b_enc [M]; b_dec [d]; spec: TopKSpec; dead: bool [M]
    (latents that have not fired for the dead window) or None; workspace: None or a
    tensor of at least N x M elements in x's dtype that receives the pre-activations
    (reusing it saves allocating and page-faulting N x M every step: ~17% of a CPU step at
    d = 512). Returns the scalar loss (module docstring), the batch FVU of the main code
    alone, fires: int64 [M], how many tokens each latent was active on (for dead-latent
    tracking and L0 = fires.sum() / N), and min_active: the smallest positive selected
    value (BatchTopK's threshold estimate; inf if none). Only the loss has a gradient.
    var: the total variance V to divide by, when x is one process's share of a batch (then
    loss and fvu are that share's part of the whole batch's, and sum over processes).
    """

    @staticmethod
    def forward(
        ctx, x, W_enc, b_enc, W_dec, b_dec, spec: TopKSpec, dead=None, workspace=None, var=None
    ):
        device_type = x.device.type
        # Under autocast only the encoder GEMM runs in the low-precision dtype; selection
        # values, decoding, the loss and every gradient stay in x's dtype.
        gemm_dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else x.dtype
        )
        with torch.autocast(device_type, enabled=False):
            return FusedTopKLoss._forward(
                ctx, x, W_enc, b_enc, W_dec, b_dec, spec, dead, workspace, gemm_dtype, var
            )

    @staticmethod
    def _forward(ctx, x, W_enc, b_enc, W_dec, b_dec, spec, dead, workspace, gemm_dtype, var=None):
        n, m = x.shape[0], W_enc.shape[0]
        x_c = x - b_dec
        a, b = x_c.to(gemm_dtype), W_enc.t().to(gemm_dtype)
        if workspace is None:
            pre = a @ b  # [N, M]
        else:
            pre = torch.mm(a, b, out=workspace.view(-1)[: n * m].view(n, m))
        pre.add_(b_enc)
        codes, codes4 = select_codes(pre, spec)
        codes = codes._replace(vals=codes.vals.to(x.dtype))
        codes4 = codes4 and codes4._replace(vals=codes4.vals.to(x.dtype))
        # One host sync per step: top-k needs the number of dead latents as a Python int.
        dead_ids = dead.nonzero().squeeze(1) if dead is not None else None
        aux = None
        if dead_ids is not None and len(dead_ids) > 0 and spec.aux_alpha > 0:
            n_dead = len(dead_ids)
            # Gather the dead columns first: far cheaper than masking all M when few are dead.
            v, local = pre[:, dead_ids].topk(min(spec.k_aux, n_dead), dim=1, sorted=False)
            aux = per_token_codes(v.to(x.dtype), dead_ids[local])
            ctx.aux_coef = spec.aux_alpha * min(n_dead / spec.k_aux, 1.0)
        del pre

        e = x - decode(codes, W_dec) - b_dec
        if var is None:  # given when the batch is split over processes: the whole batch's
            var = total_variance(x)
        loss = e.pow(2).sum() / var
        fvu = loss.detach().clone()
        # (code, residual, weight, b_dec in the decoder, the term whose pattern it shares)
        terms = [(codes, e, 1.0, True, 0)]
        for size in spec.prefixes:  # Matryoshka: S's columns < size only (module docstring)
            prefix = codes._replace(vals=codes.vals.masked_fill(codes.cols >= size, 0))
            e_m = x - decode(prefix, W_dec) - b_dec
            loss = loss + e_m.pow(2).sum() / var
            terms.append((prefix, e_m, 1.0, True, 0))
        if codes4 is not None:
            e4 = x - decode(codes4, W_dec) - b_dec
            loss = loss + spec.multi_topk_weight * e4.pow(2).sum() / var
            terms.append((codes4, e4, spec.multi_topk_weight, True, len(terms)))
        if aux is not None:
            r = e - decode(aux, W_dec)  # e - e_hat
            loss = loss + ctx.aux_coef * r.pow(2).sum() / var
            terms.append((aux, r, ctx.aux_coef, False, len(terms)))
        fires = _counts(codes.cols, m, weights=codes.vals > 0)
        min_active = codes.vals.masked_fill(codes.vals <= 0, float("inf")).min()
        ctx.mark_non_differentiable(fvu, fires, min_active)
        ctx.terms = [(weight, with_bias, pattern) for _, _, weight, with_bias, pattern in terms]
        ctx.save_for_backward(x_c, W_enc, W_dec, var, *[t for c, r, *_ in terms for t in (*c, r)])
        return loss, fvu, fires, min_active

    @staticmethod
    def backward(ctx, grad_out, _grad_fvu, _grad_fires, _grad_min):
        x_c, W_enc, W_dec, var = ctx.saved_tensors[:4]
        m = W_enc.shape[0]
        g_W_enc = torch.zeros_like(W_enc)
        g_W_dec = torch.zeros_like(W_dec)
        g_b_enc = torch.zeros(m, dtype=W_enc.dtype, device=W_enc.device)
        g_b_dec = torch.zeros(W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
        saved = ctx.saved_tensors[4:]
        # Per sparsity pattern: its code, transpose and summed value gradients [nnz], so
        # terms that share one (Matryoshka's prefixes) share the encoder's product too.
        patterns: dict[int, list] = {}
        for i, (weight, with_bias, pattern) in enumerate(ctx.terms):
            codes, r = Codes(*saved[5 * i : 5 * i + 4]), saved[5 * i + 4]
            g_rec = r * (-2 * weight * grad_out / var)  # dL/d(reconstruction)   [N, d]
            if pattern not in patterns:
                patterns[pattern] = [codes, _transposer(codes, m), 0]
            transpose = patterns[pattern][1]
            g_W_dec += transpose(codes.vals) @ g_rec
            if with_bias:
                g_b_dec += g_rec.sum(0)
            g_vals = _row_dots(g_rec, W_dec, codes) * (codes.vals > 0)  # through ReLU  [nnz]
            patterns[pattern][2] = patterns[pattern][2] + g_vals
        for codes, transpose, g_vals in patterns.values():
            # Encoder: pre[rows[j], cols[j]] receives g_vals[j].
            g_W_enc += transpose(g_vals) @ x_c
            g_b_enc.index_add_(0, codes.cols, g_vals)
        # x_c = x - b_dec: the encoder path gives -sum_n dL/dx_c[n] = -(g_b_enc @ W_enc).
        g_b_dec -= g_b_enc @ W_enc
        return None, g_W_enc, g_b_enc, g_W_dec, g_b_dec, None, None, None, None


def fused_topk_loss(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    dead: torch.Tensor | None = None,
    k_aux: int = 512,
    aux_alpha: float = 1 / 32,
    multi_topk: bool = False,
    batch_topk: bool = False,
    prefixes: tuple[int, ...] = (),
    multi_topk_weight: float = 1 / 8,
) -> torch.Tensor:
    """Scalar TopK-family loss (see module docstring) with the fused backward."""
    spec = TopKSpec(k, k_aux, aux_alpha, multi_topk, batch_topk, tuple(prefixes), multi_topk_weight)
    return FusedTopKLoss.apply(x, W_enc, b_enc, W_dec, b_dec, spec, dead)[0]


def topk_loss_reference(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    dead: torch.Tensor | None = None,
    k_aux: int = 512,
    aux_alpha: float = 1 / 32,
    multi_topk: bool = False,
    batch_topk: bool = False,
    prefixes: tuple[int, ...] = (),
    multi_topk_weight: float = 1 / 8,
) -> torch.Tensor:
    """The same loss written densely and differentiated by autograd: the reference the fused
    version is tested against. Materializes [N, M]; for tests and small shapes only."""
    pre = (x - b_dec) @ W_enc.t() + b_enc

    def dense_code(kk: int) -> torch.Tensor:
        if batch_topk:
            keep = torch.zeros(pre.numel(), dtype=torch.bool).index_fill_(
                0, pre.view(-1).topk(x.shape[0] * kk).indices, True
            )
            return pre.relu() * keep.view_as(pre)
        vals, idx = pre.topk(kk, dim=1)
        return torch.zeros_like(pre).scatter(1, idx, vals.relu())

    var = (x - x.mean(0)).pow(2).sum()
    e = x - (dense_code(k) @ W_dec + b_dec)
    loss = e.pow(2).sum() / var
    z = dense_code(k)
    for m in prefixes:  # Matryoshka: the first m latents of the same code, and their decoder rows
        loss = loss + (x - (z[:, :m] @ W_dec[:m] + b_dec)).pow(2).sum() / var
    if multi_topk:
        x_hat4 = dense_code(min(4 * k, pre.shape[1])) @ W_dec + b_dec
        loss = loss + multi_topk_weight * (x - x_hat4).pow(2).sum() / var
    n_dead = int(dead.sum()) if dead is not None else 0
    if n_dead and aux_alpha > 0:
        aux_vals, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=1)
        z_aux = torch.zeros_like(pre).scatter(1, aux_idx, aux_vals.relu())
        residual = e.detach() - z_aux @ W_dec
        loss = loss + aux_alpha * min(n_dead / k_aux, 1.0) * residual.pow(2).sum() / var
    return loss
