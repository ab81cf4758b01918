"""Resampling dead latents (sae/training/resample.py): each dead latent takes the residual
direction of a badly reconstructed row, live latents and their optimizer state are left
exactly as they were, and a ReLU SAE's silent latents fire again after training."""

import torch
from test_resume import small_run
from test_trainer import arch_config, sparse_data

from sae.config import load_config
from sae.training.resample import ENCODER_SCALE, resample_dead
from sae.training.run import train_run
from sae.training.trainer import Trainer


def trained_relu(steps=5):
    """A ReLU SAE after a few steps, so that Adam holds non-zero moments for every row."""
    cfg = load_config(
        None,
        [
            "sae.architecture=relu",
            "sae.num_latents=64",
            "train.batch_tokens=128",
            "sae.resample_dead=false",
        ],
    )
    trainer = Trainer(cfg, {"h": 32}, total_steps=100)
    for step in range(steps):
        trainer.step({"h": sparse_data(128, seed=step)})
    return trainer.saes["h"], trainer.states["h"].optimizer


def test_dead_latents_take_the_worst_rows_residuals_and_live_ones_are_untouched():
    sae, opt = trained_relu()
    x = sparse_data(40, seed=7)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 10, 11, 50]] = True
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {
        n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in sae.named_parameters()
    }
    with torch.no_grad():  # the reference: residuals and their ranking written out row by row
        residual = [x[i] - sae(x[i : i + 1])[0] for i in range(40)]
    worst = sorted(range(40), key=lambda i: -float(residual[i].pow(2).sum()))
    live = ~dead
    enc_norm = before["W_enc"][live].norm(dim=1).mean()
    dec_norm = before["W_dec"][live].norm(dim=1).mean()

    resample_dead(sae, opt, x, dead)

    for j, i in enumerate([3, 10, 11, 50]):
        r = residual[worst[j]] / residual[worst[j]].norm()
        torch.testing.assert_close(sae.W_dec[i], r * dec_norm)
        torch.testing.assert_close(sae.W_enc[i], r * ENCODER_SCALE * enc_norm)
        # it reads x - b_dec, as the encoders of the paper do
        torch.testing.assert_close(sae.b_enc[i], -(sae.W_enc[i] @ before["b_dec"]))
    for n, p in sae.named_parameters():
        rows = live if n != "b_dec" else slice(None)
        assert torch.equal(p[rows], before[n][rows]), n
        for k, v in opt.state[p].items():
            if v.shape == p.shape:
                assert torch.equal(v[rows], moments[n][k][rows]), (n, k)
                if n != "b_dec":
                    assert v[dead].abs().sum() == 0, (n, k)


def test_more_dead_latents_than_rows_cycle_through_the_rows():
    sae, opt = trained_relu()
    x = sparse_data(3, seed=8)
    dead = torch.ones(64, dtype=torch.bool)
    dead[0] = False
    resample_dead(sae, opt, x, dead)
    directions = torch.nn.functional.normalize(sae.W_dec[1:].detach(), dim=1)
    # dead latents 1, 4, 7, ... took the same (worst) row; 1, 2, 3 three different rows
    torch.testing.assert_close(directions[0::3], directions[0].expand(21, -1))
    assert (directions[0] @ directions[1:3].t()).abs().max() < 0.999


def test_resampling_revives_relu_latents_that_never_fire():
    """16 latents start silent on every input (b_enc = -2), the pull switched off: ReLU
    passes them no gradient, so only resampling can bring them back."""
    trainer = Trainer(
        arch_config("relu", "sae.dead_coefficient=0", "sae.resample_dead=true"),
        {"h": 32},
        total_steps=150,
    )
    with torch.no_grad():
        trainer.saes["h"].b_enc[:16] = -2.0
    for step in range(150):
        trainer.step({"h": sparse_data(256, seed=100 + step)})
    fires = (trainer.trained_sae("h").encode(sparse_data(2048, seed=1)) > 0).sum(0)
    assert (fires[:16] > 0).float().mean() >= 0.75, fires[:16]


def test_the_run_says_when_it_resamples_and_when_the_window_leaves_no_room(tmp_path):
    """24 steps of 512 tokens, decay over the last 4: a 2000-token window (3 steps) resamples
    at steps 3, 6, ... before step 20; a 12,288-token window (24 steps) never can."""
    lines = []
    relu = ["sae.architecture=relu", "sae.resample_dead=true"]
    train_run(small_run(tmp_path / "a", *relu), log=lines.append)
    assert any("dead latents resampled every 3 steps before step 20" in s for s in lines), lines
    lines.clear()
    train_run(small_run(tmp_path / "b", *relu, "train.dead_tokens=12288"), log=lines.append)
    assert any("no resampling: the dead window outlasts" in s for s in lines), lines
