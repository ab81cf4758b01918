"""The trainer: schedule, init, constraints, dead latents, and that it actually learns."""

import math

import pytest
import torch

from sae.architectures import TopKSAE
from sae.config import load_config
from sae.errors import ConfigError
from sae.evaluation.metrics import evaluate
from sae.training.trainer import Trainer, geometric_median, learning_rate

default_lr = TopKSAE.default_lr  # Gao et al.'s scaling rule


def test_learning_rate_warmup_flat_and_linear_decay_to_zero():
    lrs = [learning_rate(s, 100, 1.0, warmup_steps=10, decay_fraction=0.2) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80])
    assert lrs[80] == pytest.approx(1.0) and lrs[99] == pytest.approx(1 / 20)
    assert default_lr(2**14) == pytest.approx(2e-4) and default_lr(2**16) == pytest.approx(1e-4)


def test_geometric_median_is_robust_where_the_mean_is_not():
    pts = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1], [1000, 1000]])
    med = geometric_median(pts)
    assert med.norm() < 0.5 < pts.mean(0).norm()
    sym = torch.randn(50, 3) + 7.0
    sym = torch.cat([sym, 14.0 - sym])  # symmetric around (7, 7, 7)
    torch.testing.assert_close(
        geometric_median(sym).float(), torch.full((3,), 7.0), atol=1e-4, rtol=0
    )


def sparse_data(n, d=32, atoms=64, k_true=3, seed=0):
    """x = sparse non-negative codes @ a fixed random dictionary: an SAE can fit this exactly."""
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(
        torch.randn(atoms, d, generator=torch.Generator().manual_seed(99)), dim=1
    )
    idx = torch.stack([torch.randperm(atoms, generator=g)[:k_true] for _ in range(n)])
    codes = torch.zeros(n, atoms).scatter_(1, idx, torch.rand(n, k_true, generator=g) + 0.5)
    return codes @ D


def config(**train):
    args = [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, ["sae.num_latents=128", "sae.k=6", "train.batch_tokens=256", *args])


def test_trainer_learns_a_sparse_dictionary_and_keeps_decoder_rows_unit():
    cfg = config(lr=3e-3, warmup_steps=20, dead_tokens=5000)
    trainer = Trainer(cfg, {"h": 32}, total_steps=400)
    held_out = sparse_data(2048, seed=1)
    before = evaluate(trainer.saes["h"], [held_out])["fvu"]
    for step in range(400):
        trainer.step({"h": sparse_data(256, seed=100 + step)})
    after = evaluate(trainer.saes["h"], [held_out])
    assert before > 0.5 and after["fvu"] < 0.1, (before, after)
    assert after["l0"] <= 6
    torch.testing.assert_close(trainer.saes["h"].W_dec.norm(dim=1), torch.ones(128))
    assert trainer.step_count == 400 and trainer.tokens_seen == 400 * 256


def test_b_dec_starts_at_the_geometric_median_of_the_first_batch():
    trainer = Trainer(config(), {"h": 32}, total_steps=10)
    x = sparse_data(256)
    b_before = geometric_median(x).float()
    trainer.step({"h": x})
    # Adam moves each coordinate by at most ~lr in the first step
    assert (trainer.saes["h"].b_dec.detach() - b_before).abs().max() < 2 * trainer.states[
        "h"
    ].peak_lr


def test_latents_silent_for_the_window_count_as_dead():
    trainer = Trainer(config(dead_tokens=512), {"h": 32}, total_steps=10)
    sae = trainer.saes["h"]
    with torch.no_grad():
        sae.b_enc[:10] = -1e6  # these can never win the top-k
    stats = [trainer.step({"h": sparse_data(256, seed=s)}) for s in range(3)]
    assert stats[0]["h"]["silent_fraction"] == 0  # nothing has been silent for 512 tokens yet
    since = trainer.states["h"].since_fired
    assert (since[:10] == 768).all()
    assert stats[2]["h"]["silent_fraction"] >= 10 / 128


def test_bad_settings_and_bad_activations_are_one_line():
    with pytest.raises(ConfigError, match="sae.k: 500 is larger than the 128 latents for width 32"):
        Trainer(load_config(None, ["sae.num_latents=128", "sae.k=500"]), {"h": 32}, total_steps=1)
    trainer = Trainer(config(), {"h": 32}, total_steps=5)
    x = sparse_data(256)
    x[3, 4] = math.nan
    trainer.step({"h": sparse_data(256)})
    trainer.check_finite()  # clean so far
    trainer.step({"h": x})
    with pytest.raises(ConfigError, match=r"activations at h held NaN or inf in steps 1\.\.1"):
        trainer.check_finite()
    with pytest.raises(ConfigError, match="NaN or inf"):
        Trainer(config(), {"h": 32}, total_steps=5).fit([{"h": x}])


def test_tensorboard_logger_writes_scalars_and_density_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sae.training.trainer import TensorBoardLogger

    trainer = Trainer(config(), {"h": 32}, total_steps=6)
    logger = TensorBoardLogger(tmp_path)
    trainer.fit(
        [{"h": sparse_data(256, seed=s)} for s in range(6)],
        progress=False,
        log_every=3,
        on_log=logger,
    )
    logger.close()
    events = EventAccumulator(str(tmp_path)).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {
        "h/fvu",
        "h/l0",
        "h/loss",
        "h/silent_fraction",
        "h/dense_fraction",
        "h/lr",
        "tokens_per_s",
    } <= scalars
    assert [e.step for e in events.Scalars("h/fvu")] == [3, 6]
    assert events.Tags()["histograms"] == ["h/log10_density"]
    assert (
        events.Histograms("h/log10_density")[0].histogram_value.num == 128
    )  # one value per latent
    # the density window covers exactly the tokens since the last log: 3 steps x 256
    assert trainer.states["h"].window_tokens == 0 and trainer.states["h"].window_fires.sum() == 0


RECIPES = {  # short-run settings for the toy data; the defaults are for real runs
    "topk": ["sae.k=6", "train.lr=3e-3"],
    "batchtopk": ["sae.k=6", "train.lr=3e-3"],
    "matryoshka": ["sae.k=6", "train.lr=3e-3"],
    "relu": ["sae.l1_coefficient=0.5", "train.lr=3e-3"],
    "jumprelu": ["train.lr=3e-3"],
    "gated": ["sae.l1_coefficient=2", "train.lr=3e-3"],
}


def arch_config(arch, *extra):
    return load_config(
        None,
        [
            f"sae.architecture={arch}",
            "sae.num_latents=128",
            "train.batch_tokens=256",
            "train.warmup_steps=20",
            "train.dead_tokens=5000",
            *RECIPES[arch],
            *extra,
        ],
    )


@pytest.mark.parametrize("arch", list(RECIPES))
def test_every_architecture_learns_a_sparse_dictionary(arch):
    trainer = Trainer(arch_config(arch), {"h": 32}, total_steps=300)
    for step in range(300):
        trainer.step({"h": sparse_data(256, seed=100 + step)})
    result = evaluate(trainer.trained_sae("h"), [sparse_data(2048, seed=1)])
    assert result["fvu"] < 0.25 and result["l0"] < 32, result  # 3 true atoms among 128 latents
    if arch in ("batchtopk", "matryoshka"):  # the inference threshold keeps k per token (+-5%)
        assert 0.95 * 6 <= result["l0"] <= 1.05 * 6, result
    norms = trainer.saes["h"].W_dec.norm(dim=1)
    if arch in ("relu", "jumprelu"):  # their penalties weigh rows by their norm; no constraint
        assert norms.std() > 0.01
    else:
        torch.testing.assert_close(norms, torch.ones(128))


@pytest.mark.parametrize("mu", [0.0, 1.0])
def test_relus_pull_revives_latents_that_never_fire(mu):
    """16 latents start silent on every input (b_enc = -2), resampling switched off. ReLU
    passes them no gradient, so without the pull they stay as they were; with it they fire
    again on held-out data."""
    trainer = Trainer(
        arch_config("relu", f"sae.dead_coefficient={mu}", "sae.resample_dead=false"),
        {"h": 32},
        total_steps=150,
    )
    sae = trainer.saes["h"]
    with torch.no_grad():
        sae.b_enc[:16] = -2.0
    start = sae.W_enc[:16].clone()
    for step in range(150):
        trainer.step({"h": sparse_data(256, seed=100 + step)})
    fires = (trainer.trained_sae("h").encode(sparse_data(2048, seed=1)) > 0).sum(0)
    if mu == 0:
        assert torch.equal(sae.W_enc[:16], start) and fires[:16].sum() == 0
    else:
        assert (fires[:16] > 0).float().mean() >= 0.75, fires[:16]


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "gated"])
def test_input_scaling_makes_training_blind_to_the_activation_scale(arch):
    """Training on 8x the activations (a power of two: exact in floating point) gives the
    same SAE up to that factor, once the scale is folded in."""
    results = []
    for c in (1.0, 8.0):
        trainer = Trainer(arch_config(arch), {"h": 32}, total_steps=30)
        for step in range(30):
            trainer.step({"h": c * sparse_data(256, seed=100 + step)})
        results.append(trainer.trained_sae("h"))
    x = sparse_data(64, seed=1)
    torch.testing.assert_close(results[1].encode(8 * x), results[0].encode(x))
    torch.testing.assert_close(results[1](8 * x), 8 * results[0](x))


def test_null_warmup_and_dead_window_scale_with_the_run_up_to_the_published_values():
    from sae.training.trainer import run_schedule

    def schedule(steps, *sets):
        return run_schedule(load_config(None, ["train.batch_tokens=4096", *sets]).train, steps)

    # a 1M-token run (244 steps, 999,424 tokens): 5% of the steps, 10% of the tokens
    assert schedule(244) == (12, 99_942)
    # a 1B-token run: the published 1000 steps and 10M tokens
    assert schedule(244_140) == (1000, 10_000_000)
    # set values are kept, whatever the run
    assert schedule(244, "train.warmup_steps=50", "train.dead_tokens=500000") == (50, 500_000)
    assert schedule(3) == (1, 4096)  # at least one step and one batch


def test_a_null_learning_rate_is_the_published_one_for_long_runs_and_larger_for_short_ones():
    def peak(steps, *sets):
        cfg = load_config(None, ["sae.num_latents=2048", *sets])
        return Trainer(cfg, {"h": 32}, total_steps=steps).states["h"].peak_lr

    published = default_lr(2048)
    assert peak(100_000) == pytest.approx(published)  # a long run: Gao et al.'s rule
    assert peak(8192) == pytest.approx(published)
    assert peak(2048) == pytest.approx(2 * published)  # x sqrt(8192 / steps)
    assert peak(10) == pytest.approx(8 * published)  # capped
    assert peak(10, "train.lr=1e-3") == 1e-3  # a set rate is used as given
    # relu (5e-5 published) scales as 8192 / steps, up to x20
    relu = load_config(None, ["sae.architecture=relu", "sae.num_latents=2048"])
    assert Trainer(relu, {"h": 32}, total_steps=2048).states["h"].peak_lr == pytest.approx(2e-4)
    assert Trainer(relu, {"h": 32}, total_steps=100).states["h"].peak_lr == pytest.approx(1e-3)
    assert Trainer(relu, {"h": 32}, total_steps=9000).states["h"].peak_lr == pytest.approx(5e-5)
    # gated: (8192 / steps) ** 0.7, up to x8
    assert peak(2048, "sae.architecture=gated") == pytest.approx(4**0.7 * published)
    assert peak(10, "sae.architecture=gated") == pytest.approx(8 * published)
    # matryoshka keeps its published rate (its late latents die under a raised one)
    assert peak(10, "sae.architecture=matryoshka") == pytest.approx(published)
