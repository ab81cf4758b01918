"""The fused TopK + AuxK loss against its dense autograd reference."""

import pytest
import torch

from sae.architectures.fused_topk import (
    FusedTopKLoss,
    TopKSpec,
    _row_dots,
    fused_topk_loss,
    per_token_codes,
    topk_loss_reference,
)


def make(N, d, M, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.nn.functional.normalize(
        torch.randn(M, d, generator=g, dtype=torch.float64), dim=1
    )
    params = dict(
        W_enc=W_dec.clone() + 0.1 * torch.randn(M, d, generator=g, dtype=torch.float64),
        b_enc=0.1 * torch.randn(M, generator=g, dtype=torch.float64),
        W_dec=W_dec,
        b_dec=0.1 * torch.randn(d, generator=g, dtype=torch.float64),
    )
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
@pytest.mark.parametrize(
    "multi_topk, batch_topk", [(False, False), (True, False), (False, True), (True, True)]
)
def test_loss_and_every_gradient_match_the_dense_reference(
    dtype, tol, N, d, M, k, n_dead, multi_topk, batch_topk
):
    x, params = make(N, d, M, dtype)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[torch.randperm(M, generator=torch.Generator().manual_seed(1))[: min(n_dead, M)]] = True
    kw = dict(
        k=k, dead=dead, k_aux=12, aux_alpha=1 / 32, multi_topk=multi_topk, batch_topk=batch_topk
    )
    loss_ref, g_ref = grads(topk_loss_reference, x, params, **kw)
    loss, g = grads(fused_topk_loss, x, params, **kw)
    torch.testing.assert_close(loss, loss_ref, rtol=tol, atol=tol)
    for name in params:
        torch.testing.assert_close(
            g[name], g_ref[name], rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("prefixes", [(4,), (1, 10, 50, 127)])
@pytest.mark.parametrize("n_dead", [0, 5])
@pytest.mark.parametrize(
    "multi_topk, batch_topk", [(False, False), (True, False), (False, True), (True, True)]
)
def test_matryoshka_prefix_terms_match_the_dense_reference(
    dtype, tol, prefixes, n_dead, multi_topk, batch_topk
):
    N, d, M, k = 64, 16, 128, 4
    x, params = make(N, d, M, dtype, seed=3)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[torch.randperm(M, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    kw = dict(k=k, dead=dead, k_aux=12, multi_topk=multi_topk, batch_topk=batch_topk)
    loss_ref, g_ref = grads(topk_loss_reference, x, params, **kw, prefixes=prefixes)
    loss, g = grads(fused_topk_loss, x, params, **kw, prefixes=prefixes)
    torch.testing.assert_close(loss, loss_ref, rtol=tol, atol=tol)
    for name in params:
        torch.testing.assert_close(
            g[name], g_ref[name], rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert loss > grads(fused_topk_loss, x, params, **kw)[0]  # the prefix terms add error


def test_aux_gradient_reaches_the_encoder_rows_of_dead_latents():
    x, params = make(128, 16, 64, torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    with_aux = grads(fused_topk_loss, x, params, k=4, dead=dead, k_aux=8)[1]["W_enc"]
    without = grads(fused_topk_loss, x, params, k=4, dead=None)[1]["W_enc"]
    assert (with_aux[:10] - without[:10]).abs().sum() > 0  # dead rows learn from AuxK
    torch.testing.assert_close(with_aux[10:], without[10:])  # AuxK picks dead latents only


def test_row_dots_equal_dense_products_gathered():
    g = torch.Generator().manual_seed(0)
    grad, W = (
        torch.randn(30, 8, generator=g, dtype=torch.float64),
        torch.randn(50, 8, generator=g, dtype=torch.float64),
    )
    idx = (
        torch.randn(30, 50, generator=g).topk(5, dim=1, sorted=False).indices
    )  # unsorted, like topk's output
    codes = per_token_codes(torch.ones(30, 5, dtype=torch.float64), idx)
    torch.testing.assert_close(_row_dots(grad, W, codes), (grad @ W.t())[codes.rows, codes.cols])


def test_workspace_gives_identical_results():
    x, params = make(40, 8, 32, torch.float64)
    loss_a, g_a = grads(fused_topk_loss, x, params, k=4)
    ws = torch.full((40 * 32 + 7,), float("nan"), dtype=torch.float64)  # larger than needed, dirty

    def with_ws(x, **p):
        return FusedTopKLoss.apply(
            x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], TopKSpec(4), None, ws
        )[0]

    loss_b, g_b = grads(with_ws, x, params)
    assert torch.equal(loss_a, loss_b) and all(torch.equal(g_a[n], g_b[n]) for n in g_a)


def test_batch_topk_keeps_n_times_k_latents_over_the_batch_not_k_per_token():
    x, params = make(50, 8, 64, torch.float64)
    params["b_enc"].data[:3] += 5.0  # three latents fire on every token
    spec = TopKSpec(4, batch_topk=True)
    _, _, fires, min_active = FusedTopKLoss.apply(x, *params.values(), spec, None, None)
    pre = (x - params["b_dec"]) @ params["W_enc"].t() + params["b_enc"]
    top = pre.detach().view(-1).topk(50 * 4).values
    assert int(fires.sum()) == int((top > 0).sum())
    assert (fires[:3] == 50).all()  # per-token counts vary: the hot latents take every token
    assert float(min_active) == float(top[top > 0].min())


def test_autocast_runs_only_the_encoder_gemm_in_bfloat16():
    x, params = make(256, 32, 128, torch.float32)
    loss32, g32 = grads(fused_topk_loss, x, params, k=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = fused_topk_loss(x, **params, k=8)
    assert loss16.dtype == torch.float32
    loss16.backward()
    torch.testing.assert_close(loss16.detach(), loss32, rtol=2e-2, atol=0)
    for name, p in params.items():
        assert p.grad.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), g32[name].flatten(), dim=0)
        assert cos > 0.95, (name, cos)
