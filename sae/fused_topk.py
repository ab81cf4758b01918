"""The fused, Triton-free TopK training loss: encoder, sparse decoder, MSE and AuxK in
one ``torch.autograd.Function``.

Notation (DESIGN.md section 2): x [N, d] inputs, M latents, k active, W_enc [M, d],
b_enc [M], W_dec [M, d], b_dec [d].

    pre   = (x - b_dec) @ W_enc.T + b_enc                  [N, M]  (the one dense GEMM)
    z     = ReLU(TopK_k(pre))          as (vals, idx)      [N, k]
    x_hat = sum_j vals[:, j] W_dec[idx[:, j]] + b_dec      [N, d]  (embedding_bag)
    e     = x - x_hat
    L     = |e|^2 / V + alpha * s * |e - e_hat|^2 / V
      V     = sum_n |x_n - mean(x)|^2 (batch total variance)
      e_hat = decode of ReLU(TopK_k_aux(pre restricted to dead latents)), no bias
      s     = min(n_dead / k_aux, 1); e is a constant in the AuxK term

What backward keeps: inputs, the k (and k_aux) indices and values per token, e and
e - e_hat. The N x M pre-activations are freed right after TopK, no N x k x d tensor is
ever made (the gradients of the values are a sampled dense-dense product), and both
weight gradients are one sparse (CSR) x dense product each. AuxK's gradient reaches the
encoder through the dead latents' pre-activations.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

def _counts(ids: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """How often each of 0..n-1 occurs in ids (optionally weighted), int64 [n].

    Unlike bincount (whose output size depends on the data) this never waits for the GPU.
    """
    ones = torch.ones_like(ids) if weights is None else weights.long()
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, ids.reshape(-1), ones.reshape(-1))


def _transpose_csr(idx: torch.Tensor, values: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Sparse [M, N] CSR matrix with ``values[n, j]`` at (idx[n, j], n). idx, values: [N, k]."""
    n, k = idx.shape
    flat = idx.reshape(-1)
    # int32 keys: a stable sort of them is ~7x faster than of int64 on CPU; stable keeps
    # the summation order, hence the gradients, bit-reproducible.
    order = torch.argsort(flat.int(), stable=True)
    rows = torch.arange(n, device=idx.device).repeat_interleave(k)[order]
    counts = _counts(flat, n_latents)
    crow = torch.zeros(n_latents + 1, dtype=torch.long, device=idx.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return torch.sparse_csr_tensor(crow, rows, values.reshape(-1)[order], size=(n_latents, n),
                                   check_invariants=False)  # valid by construction


def _row_dots(grad: torch.Tensor, W: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[n, j] = grad[n] . W[idx[n, j]], as a sampled dense-dense product (SDDMM): only
    the N*k entries of grad @ W.T that are needed are computed, and no [N, k, d] tensor is
    made. grad [N, d], W [M, d], idx [N, k] -> [N, k]."""
    n, k = idx.shape
    cols, order = idx.sort(dim=1)  # CSR wants sorted columns within a row
    crow = torch.arange(0, n * k + 1, k, device=idx.device)
    pattern = torch.sparse_csr_tensor(crow, cols.reshape(-1), torch.zeros(n * k, dtype=grad.dtype, device=grad.device),
                                      size=(n, W.shape[0]), check_invariants=False)
    dots = torch.sparse.sampled_addmm(pattern, grad, W.t(), beta=0.0).values().view(n, k)
    return torch.empty_like(dots).scatter_(1, order, dots)


def _decode(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")


class FusedTopKLoss(torch.autograd.Function):
    """loss, fvu, fires = FusedTopKLoss.apply(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux, aux_alpha, workspace)

    x [N, d]; W_enc, W_dec [M, d]; b_enc [M]; b_dec [d]; dead: bool [M] (latents that
    have not fired for the dead window) or None; workspace: None or a tensor of at least
    N x M elements in x's dtype that receives the pre-activations (reusing it saves
    allocating and page-faulting N x M every step: ~17% of a CPU step at d = 512). Returns the scalar loss (FVU term plus
    alpha times the AuxK term), the batch FVU alone (no gradient) and fires: int64 [M],
    how many tokens each latent was active on (no gradient; for dead-latent tracking and
    L0 = fires.sum() / N).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, k: int, dead, k_aux: int, aux_alpha: float, workspace=None):
        x_c = x - b_dec
        if workspace is None:
            pre = x_c @ W_enc.t()                                # [N, M]
        else:
            pre = torch.mm(x_c, W_enc.t(), out=workspace.view(-1)[: x.shape[0] * W_enc.shape[0]].view(x.shape[0], -1))
        pre.add_(b_enc)
        vals, idx = pre.topk(k, dim=1, sorted=False)
        vals = vals.relu()
        # One host sync per step: top-k needs the number of dead latents as a Python int.
        dead_ids = dead.nonzero().squeeze(1) if dead is not None else None
        use_aux = dead_ids is not None and len(dead_ids) > 0 and aux_alpha > 0
        if use_aux:
            n_dead = len(dead_ids)
            # Gather the dead columns first: far cheaper than masking all M when few are dead.
            aux_vals, local = pre[:, dead_ids].topk(min(k_aux, n_dead), dim=1, sorted=False)
            aux_idx, aux_vals = dead_ids[local], aux_vals.relu()
        del pre

        x_hat = _decode(idx, vals, W_dec) + b_dec
        e = x - x_hat
        var = (x - x.mean(0)).pow(2).sum()
        loss = e.pow(2).sum() / var
        fvu = loss.detach().clone()
        fires = _counts(idx, W_enc.shape[0], weights=vals > 0)
        ctx.mark_non_differentiable(fvu, fires)
        if use_aux:
            scale = min(n_dead / k_aux, 1.0)
            r = e - _decode(aux_idx, aux_vals, W_dec)           # e - e_hat
            loss = loss + aux_alpha * scale * r.pow(2).sum() / var
            ctx.aux_coef = aux_alpha * scale
            ctx.save_for_backward(x_c, W_enc, W_dec, idx, vals, e, var, aux_idx, aux_vals, r)
        else:
            ctx.aux_coef = 0.0
            ctx.save_for_backward(x_c, W_enc, W_dec, idx, vals, e, var)
        return loss, fvu, fires

    @staticmethod
    def backward(ctx, grad_out, _grad_fvu, _grad_fires):
        x_c, W_enc, W_dec, idx, vals, e, var = ctx.saved_tensors[:7]
        M = W_enc.shape[0]
        g_xhat = e * (-2 * grad_out / var)                       # dL/dx_hat   [N, d]
        # Decoder: x_hat = S @ W_dec + b_dec, S sparse [N, M] from (idx, vals).
        g_W_dec = _transpose_csr(idx, vals, M) @ g_xhat           # [M, d]
        g_b_dec = g_xhat.sum(0)
        g_vals = _row_dots(g_xhat, W_dec, idx) * (vals > 0)      # through ReLU   [N, k]
        # Encoder: pre[n, idx[n, j]] receives g_vals[n, j].
        g_W_enc = _transpose_csr(idx, g_vals, M) @ x_c            # [M, d]
        g_b_enc = torch.zeros(M, dtype=g_vals.dtype, device=g_vals.device).index_add_(
            0, idx.reshape(-1), g_vals.reshape(-1))
        if ctx.aux_coef:
            aux_idx, aux_vals, r = ctx.saved_tensors[7:]
            g_ehat = r * (-2 * grad_out * ctx.aux_coef / var)     # e is a constant here
            g_W_dec = g_W_dec + _transpose_csr(aux_idx, aux_vals, M) @ g_ehat
            g_aux = _row_dots(g_ehat, W_dec, aux_idx) * (aux_vals > 0)
            g_W_enc = g_W_enc + _transpose_csr(aux_idx, g_aux, M) @ x_c
            g_b_enc.index_add_(0, aux_idx.reshape(-1), g_aux.reshape(-1))
        # x_c = x - b_dec: the encoder path gives -sum_n dL/dx_c[n] = -(g_b_enc @ W_enc).
        g_b_dec = g_b_dec - g_b_enc @ W_enc
        return None, g_W_enc, g_b_enc, g_W_dec, g_b_dec, None, None, None, None, None


def fused_topk_loss(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                    b_dec: torch.Tensor, k: int, dead: torch.Tensor | None = None, k_aux: int = 512,
                    aux_alpha: float = 1 / 32) -> torch.Tensor:
    """Scalar TopK + AuxK loss (see module docstring) with the fused backward."""
    return FusedTopKLoss.apply(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux, aux_alpha)[0]


def topk_loss_reference(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                        b_dec: torch.Tensor, k: int, dead: torch.Tensor | None = None, k_aux: int = 512,
                        aux_alpha: float = 1 / 32) -> torch.Tensor:
    """The same loss written densely and differentiated by autograd: the reference the fused
    version is tested against. Materializes [N, M]; for tests and small shapes only."""
    pre = (x - b_dec) @ W_enc.t() + b_enc
    vals, idx = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    e = x - (z @ W_dec + b_dec)
    var = (x - x.mean(0)).pow(2).sum()
    loss = e.pow(2).sum() / var
    n_dead = int(dead.sum()) if dead is not None else 0
    if n_dead and aux_alpha > 0:
        aux_vals, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=1)
        z_aux = torch.zeros_like(pre).scatter(1, aux_idx, aux_vals.relu())
        residual = e.detach() - z_aux @ W_dec
        loss = loss + aux_alpha * min(n_dead / k_aux, 1.0) * residual.pow(2).sum() / var
    return loss
