"""The fused TopK + AuxK loss against its dense autograd reference."""

import pytest
import torch

from sae.fused_topk import FusedTopKLoss, _row_dots, fused_topk_loss, topk_loss_reference


def make(N, d, M, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.nn.functional.normalize(torch.randn(M, d, generator=g, dtype=torch.float64), dim=1)
    params = dict(W_enc=W_dec.clone() + 0.1 * torch.randn(M, d, generator=g, dtype=torch.float64),
                  b_enc=0.1 * torch.randn(M, generator=g, dtype=torch.float64), W_dec=W_dec,
                  b_dec=0.1 * torch.randn(d, generator=g, dtype=torch.float64))
    params = {n: p.to(dtype).requires_grad_() for n, p in params.items()}
    x = torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype)
    return x, params


def grads(loss_fn, x, params, **kw):
    loss = loss_fn(x, **params, **kw)
    loss.backward()
    out = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return loss.detach(), out


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("N, d, M, k", [(64, 16, 128, 4), (200, 32, 256, 16), (33, 8, 40, 8)])
@pytest.mark.parametrize("n_dead", [0, 5, 100])
def test_loss_and_every_gradient_match_the_dense_reference(dtype, tol, N, d, M, k, n_dead):
    x, params = make(N, d, M, dtype)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[torch.randperm(M, generator=torch.Generator().manual_seed(1))[: min(n_dead, M)]] = True
    kw = dict(k=k, dead=dead, k_aux=12, aux_alpha=1 / 32)
    loss_ref, g_ref = grads(topk_loss_reference, x, params, **kw)
    loss, g = grads(fused_topk_loss, x, params, **kw)
    torch.testing.assert_close(loss, loss_ref, rtol=tol, atol=tol)
    for name in params:
        torch.testing.assert_close(g[name], g_ref[name], rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_aux_gradient_reaches_the_encoder_rows_of_dead_latents():
    x, params = make(128, 16, 64, torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    with_aux = grads(fused_topk_loss, x, params, k=4, dead=dead, k_aux=8)[1]["W_enc"]
    without = grads(fused_topk_loss, x, params, k=4, dead=None)[1]["W_enc"]
    assert (with_aux[:10] - without[:10]).abs().sum() > 0      # dead rows learn from AuxK
    torch.testing.assert_close(with_aux[10:], without[10:])   # AuxK picks dead latents only


def test_row_dots_equal_dense_products_gathered():
    g = torch.Generator().manual_seed(0)
    grad, W = torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randn(50, 8, generator=g, dtype=torch.float64)
    idx = torch.randn(30, 50, generator=g).topk(5, dim=1, sorted=False).indices  # unsorted, like topk's output
    torch.testing.assert_close(_row_dots(grad, W, idx), (grad @ W.t()).gather(1, idx))


def test_workspace_gives_identical_results():
    x, params = make(40, 8, 32, torch.float64)
    loss_a, g_a = grads(fused_topk_loss, x, params, k=4)
    ws = torch.full((40 * 32 + 7,), float("nan"), dtype=torch.float64)  # larger than needed, dirty

    def with_ws(x, **p):
        return FusedTopKLoss.apply(x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], 4, None, 512, 1 / 32, ws)[0]

    loss_b, g_b = grads(with_ws, x, params)
    assert torch.equal(loss_a, loss_b) and all(torch.equal(g_a[n], g_b[n]) for n in g_a)
