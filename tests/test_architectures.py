"""SAE modules: encode/decode semantics and the on-disk format."""

import json

import pytest
import torch

from sae.architectures import TopKConfig, TopKSAE
from sae.architectures.base import CONFIG_FILE, WEIGHTS_FILE
from sae.errors import ConfigError
from sae.formats import load_sae


def make_sae(d=16, M=64, k=4, seed=0):
    sae = TopKSAE(TopKConfig(num_latents=M, k=k), d)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def test_topk_encode_keeps_at_most_k_nonnegative_latents_and_matches_the_formula():
    sae = make_sae()
    x = torch.randn(20, 16)
    z = sae.encode(x)
    assert ((z > 0).sum(1) <= 4).all() and (z >= 0).all()
    pre = (x - sae.b_dec) @ sae.W_enc.t() + sae.b_enc
    kth = pre.topk(4, dim=1).values[:, -1:]
    torch.testing.assert_close(z, torch.where(pre >= kth, pre.relu(), torch.zeros_like(pre)))
    torch.testing.assert_close(sae(x), z @ sae.W_dec + sae.b_dec)


def test_init_is_unit_decoder_rows_and_transposed_encoder():
    sae = TopKSAE(TopKConfig(num_latents=32, k=2), 8)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(
        sae.W_enc, sae.W_dec / 3**0.5
    )  # same directions, sparsify's encoder scale


def test_save_load_round_trip_in_saelens_layout(tmp_path):
    sae = make_sae()
    sae.save(tmp_path / "sae", metadata={"hook_name": "layers.2"})
    cfg = json.loads((tmp_path / "sae" / CONFIG_FILE).read_text())
    assert (
        cfg["architecture"] == "topk" and cfg["d_in"] == 16 and cfg["d_sae"] == 64 and cfg["k"] == 4
    )
    from safetensors.torch import load_file

    assert load_file(tmp_path / "sae" / WEIGHTS_FILE)["W_enc"].shape == (
        16,
        64,
    )  # SAELens: [d_in, d_sae]
    loaded = load_sae(tmp_path / "sae", dtype=torch.float64)
    assert loaded.W_dec.dtype == torch.float64
    x = torch.randn(5, 16)
    torch.testing.assert_close(loaded(x.double()).float(), sae(x))
    sae.save(tmp_path / "sae")  # replacing an existing folder works and leaves nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_saving_over_an_sae_keeps_what_sits_beside_it_and_drops_other_formats(tmp_path):
    folder = tmp_path / "layers.2"
    make_sae(seed=0).save(folder)
    (folder / "report.html").write_text("<p>report</p>")
    (folder / "features").mkdir()
    (folder / "features" / "stats.safetensors").write_bytes(b"cache")
    (folder / "sae.safetensors").write_bytes(b"a sparsify file left by an earlier convert")
    newer = make_sae(seed=1)
    newer.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        CONFIG_FILE,
        "features",
        "report.html",
        WEIGHTS_FILE,
    ]
    assert (folder / "report.html").read_text() == "<p>report</p>"
    assert (folder / "features" / "stats.safetensors").read_bytes() == b"cache"
    x = torch.randn(5, 16)
    torch.testing.assert_close(load_sae(folder)(x), newer(x))


def test_a_failed_sae_write_keeps_the_old_sae_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    from sae import atomic_io

    folder = tmp_path / "layers.2"
    old = make_sae(seed=0)
    old.save(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_io.os, "fsync", full_disk)
    with pytest.raises(ConfigError, match="No space left on device"):
        make_sae(seed=1).save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_bad_folders_are_one_line(tmp_path):
    sae = make_sae()
    sae.save(tmp_path / "s")
    (tmp_path / "s" / WEIGHTS_FILE).write_bytes((tmp_path / "s" / WEIGHTS_FILE).read_bytes()[:100])
    with pytest.raises(ConfigError, match="cannot read SAE weights"):
        load_sae(tmp_path / "s")
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / CONFIG_FILE).read_text())
    (tmp_path / "s" / CONFIG_FILE).write_text(json.dumps({**cfg, "num_latents": 65}))
    with pytest.raises(ConfigError, match=r"W_enc has shape \(16, 64\), cfg.json says \(16, 65\)"):
        load_sae(tmp_path / "s")
    (tmp_path / "s" / CONFIG_FILE).write_text(json.dumps({**cfg, "architecture": "magic"}))
    with pytest.raises(ConfigError, match="architecture 'magic' is not one of topk"):
        load_sae(tmp_path / "s")
    with pytest.raises(ConfigError, match="does not exist"):
        load_sae(tmp_path / "missing")
    (tmp_path / "s" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable SAE config"):
        load_sae(tmp_path / "s")


ALL = ["topk", "batchtopk", "matryoshka", "relu", "jumprelu", "gated"]


def random_sae(arch, d=16, M=64, seed=0):
    """An SAE of ``arch`` with random (not freshly initialized) weights and thresholds."""
    from sae.config import load_config
    from sae.training.trainer import make_sae

    extra = ["sae.k=4"] if arch in ("topk", "batchtopk", "matryoshka") else []
    sae = make_sae(
        load_config(None, [f"sae.architecture={arch}", f"sae.num_latents={M}", *extra]).sae, d
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.05)
        if arch == "jumprelu":
            sae.threshold.abs_()  # training keeps thresholds >= 0 (after_step)
    return sae


@pytest.mark.parametrize("arch", ALL)
def test_every_architecture_round_trips_through_its_folder(tmp_path, arch):
    sae = random_sae(arch)
    sae.save(tmp_path / "s")
    loaded = load_sae(tmp_path / "s")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    x = torch.randn(32, 16)
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x), sae(x))
    cfg = json.loads((tmp_path / "s" / CONFIG_FILE).read_text())
    assert cfg["apply_b_dec_to_input"] == (arch in ("topk", "batchtopk", "matryoshka", "gated"))


@pytest.mark.parametrize("arch", ALL)
def test_folding_the_input_scale_keeps_the_latents_and_divides_the_reconstruction(arch):
    sae = random_sae(arch)
    x, s = torch.randn(32, 16, dtype=torch.float64), 3.7
    sae = sae.double()
    z, x_hat = sae.encode(x * s), sae(x * s)
    sae.fold_input_scale(s)
    torch.testing.assert_close(sae.encode(x), z)
    torch.testing.assert_close(sae(x), x_hat / s)


def test_inference_rules_match_the_formulas():
    x = torch.randn(40, 16)
    relu, jump, btk = random_sae("relu"), random_sae("jumprelu"), random_sae("batchtopk")
    torch.testing.assert_close(
        relu.encode(x), (x @ relu.W_enc.t() + relu.b_enc).relu()
    )  # no b_dec at the input
    pre = x @ jump.W_enc.t() + jump.b_enc
    torch.testing.assert_close(jump.encode(x), torch.where(pre > jump.threshold, pre, 0.0))
    pre = (x - btk.b_dec) @ btk.W_enc.t() + btk.b_enc
    torch.testing.assert_close(btk.encode(x), torch.where(pre > 0.05, pre, 0.0))


def test_jumprelu_threshold_gradients_are_finite_differences_over_the_kernel_width():
    from sae.architectures.jumprelu import JumpReLUFn, StepFn

    g = torch.Generator().manual_seed(0)
    pre = torch.rand(4000, 3, generator=g, dtype=torch.float64) * 2  # uniform on [0, 2]
    theta = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64, requires_grad=True)
    eps = 0.01

    def count(t):  # sum of H(pre - t), and of pre * H(pre - t), per latent
        return (pre > t).sum(0).double(), (pre * (pre > t)).sum(0)

    (lo_h, lo_z), (hi_h, hi_z) = count(theta.detach() - eps / 2), count(theta.detach() + eps / 2)
    StepFn.apply(pre, theta, eps).sum().backward()
    torch.testing.assert_close(
        theta.grad, (hi_h - lo_h) / eps
    )  # exact: the kernel is a window count
    theta.grad = None
    JumpReLUFn.apply(pre, theta, eps).sum().backward()
    torch.testing.assert_close(
        theta.grad, (hi_z - lo_z) / eps, rtol=eps, atol=0
    )  # theta * count ~ sum of pre


@pytest.mark.parametrize("penalty", ["tanh", "step"])
def test_jumprelu_loss_is_the_formula_and_only_tanh_trains_the_encoder_to_be_sparse(penalty):
    """Against the loss written out: the reconstruction, the penalty (Anthropic's tanh or
    Gemma Scope's L0) and the pull on dead latents. The step penalty does not reach W_enc
    at all (H passes no gradient to pre); the tanh penalty does, through z: why a short run
    needs tanh."""
    sae = random_sae("jumprelu").double()
    sae.cfg.sparsity_loss, sae.cfg.dead_coefficient = penalty, 0.5
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(64, dtype=torch.float64) * 0.3)
    x = torch.randn(40, 16, dtype=torch.float64) * 2
    dead = torch.arange(64) % 3 == 0
    loss, fvu, fires = sae.training_loss(x, dead=dead)
    pre = (x @ sae.W_enc.t() + sae.b_enc).detach()
    theta, norms = sae.threshold.detach(), sae.W_dec.norm(dim=1).detach()
    z = pre * (pre > theta)
    rec = (x - z @ sae.W_dec.detach() - sae.b_dec.detach()).pow(2).sum()
    c = sae.cfg.tanh_scale
    pen = torch.tanh(c * z * norms).sum() if penalty == "tanh" else (pre > theta).sum()
    pull = ((theta - pre).relu() * dead * norms).sum()
    reference = (rec + sae.cfg.l0_coefficient * pen + 0.5 * pull) / 40
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(fvu, rec / (x - x.mean(0)).pow(2).sum())
    assert torch.equal(fires, (z != 0).sum(0))

    sae.cfg.dead_coefficient = 0.0
    with_penalty = torch.autograd.grad(sae.training_loss(x)[0], sae.W_enc)[0]
    sae.cfg.l0_coefficient = 0.0
    without = torch.autograd.grad(sae.training_loss(x)[0], sae.W_enc)[0]
    assert torch.equal(with_penalty, without) == (penalty == "step")


def test_relu_loss_is_the_formula_with_the_pull_on_dead_latents_only():
    """Against the loss written out: reconstruction, L1 weighted by decoder norms, and mu
    times ReLU(-pre) on the latents marked dead. A dead latent's encoder gets a gradient
    from the pull alone (ReLU passes none below zero), which raises its pre-activations."""
    sae = random_sae("relu").double()
    sae.cfg.dead_coefficient = 0.5
    with torch.no_grad():
        sae.b_enc[:8] = -100.0  # silent on every input
    x = torch.randn(40, 16, dtype=torch.float64) * 2
    dead = torch.arange(64) < 8
    loss, fvu, fires = sae.training_loss(x, dead=dead, progress=1.0)
    pre = (x @ sae.W_enc.t() + sae.b_enc).detach()
    norms = sae.W_dec.norm(dim=1).detach()
    z = pre.relu()
    rec = (x - z @ sae.W_dec.detach() - sae.b_dec.detach()).pow(2).sum()
    pull = ((-pre).relu() * dead * norms).sum()
    reference = (rec + sae.cfg.l1_coefficient * (z * norms).sum() + 0.5 * pull) / 40
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(fvu, rec / (x - x.mean(0)).pow(2).sum())
    assert torch.equal(fires, (z > 0).sum(0)) and fires[:8].sum() == 0

    grad = torch.autograd.grad(loss, sae.b_enc)[0]
    assert (grad[:8] < 0).all()  # descent raises them
    without = torch.autograd.grad(sae.training_loss(x, dead=None)[0], sae.b_enc)[0]
    assert torch.equal(without[:8], torch.zeros(8, dtype=torch.float64))


def test_jumprelu_thresholds_stay_non_negative_and_old_training_states_load():
    sae = random_sae("jumprelu")
    with torch.no_grad():
        sae.threshold[:5] = -1.0
    sae.after_step()
    assert (sae.threshold >= 0).all() and torch.equal(sae.threshold[:5], torch.zeros(5))
    state = {k: v for k, v in sae.state_dict().items() if k != "threshold"}
    state["log_threshold"] = torch.full((64,), 0.25).log()  # how states were written before
    sae.load_state_dict(state)
    torch.testing.assert_close(sae.threshold, torch.full((64,), 0.25))


def test_sae_settings_for_another_architecture_are_refused():
    from sae.config import load_config

    with pytest.raises(
        ConfigError,
        match="sae.l0_coefficient: applies to jumprelu only, not sae.architecture = topk",
    ):
        load_config(None, ["sae.l0_coefficient=2"])
    with pytest.raises(ConfigError, match="sae.l1_coefficient: applies to relu and gated only"):
        load_config(None, ["sae.l1_coefficient=2"])
    with pytest.raises(ConfigError, match="sae.k: applies to topk, batchtopk and matryoshka only"):
        load_config(None, ["sae.architecture=relu", "sae.k=8"])


def test_every_setting_of_an_architecture_reaches_its_sae():
    """Settings that the old flat config could not express now reach the module."""
    from sae.config import load_config
    from sae.training.trainer import make_sae

    jump = make_sae(
        load_config(None, ["sae.architecture=jumprelu", "sae.init_threshold=0.5"]).sae, 16
    )
    torch.testing.assert_close(jump.threshold, torch.full((128,), 0.5))
    topk = make_sae(
        load_config(None, ["sae.k_aux=5", "sae.aux_alpha=0.5", "sae.num_latents=64"]).sae, 16
    )
    assert (topk.spec().k_aux, topk.spec().aux_alpha) == (5, 0.5)
    btk = load_config(None, ["sae.architecture=batchtopk", "sae.threshold_momentum=0.9"]).sae
    assert make_sae(btk, 16).cfg.threshold_momentum == 0.9
    with pytest.raises(
        ConfigError, match=r"sae.threshold_momentum: 1.0 is out of range; must be < 1"
    ):
        load_config(None, ["sae.architecture=batchtopk", "sae.threshold_momentum=1"])


def test_an_architecture_is_its_file_plus_one_registry_line(tmp_path, monkeypatch):
    """What adding an architecture takes: a config class and a module class (here a ReLU
    SAE whose latents are scaled by a new setting), and its entry in ARCHITECTURES. The run
    config, --help, the sweep and the SAE folder format then know it."""
    from dataclasses import dataclass

    from sae import architectures
    from sae.architectures.relu import ReLUConfig, ReLUSAE
    from sae.config import architecture_field, describe, load_config, opt, sae_variants
    from sae.training.trainer import make_sae

    @dataclass
    class GainConfig(ReLUConfig):
        architecture: str = architecture_field("gain")
        gain: float = opt(1.0, "Latents are multiplied by this.", gt=0)

    class GainSAE(ReLUSAE):
        Config = GainConfig
        saelens_writes, saelens_reads = None, ()

        def activation(self, pre):
            return self.cfg.gain * pre.relu()

    monkeypatch.setitem(architectures.ARCHITECTURES, "gain", GainSAE)
    cfg = load_config(
        None,
        [
            "sae.architecture=gain",
            "sae.gain=3",
            "sae.num_latents=32",
            "sweep=[{gain: 2}, {architecture: relu}]",
        ],
    )
    assert ("sae.gain", "1.0", "gain: Latents are multiplied by this.") in describe()
    variants = sae_variants(cfg)
    assert (variants["gain2"].gain, variants["gain2"].l1_coefficient) == (2, 5.0)
    assert type(variants["architecturerelu"]).__name__ == "ReLUConfig"  # gain is not carried over
    sae = make_sae(cfg.sae, 8)
    x = torch.randn(5, 8)
    torch.testing.assert_close(sae.encode(x), 3 * (x @ sae.W_enc.t() + sae.b_enc).relu())
    sae.save(tmp_path / "gain")
    loaded = load_sae(tmp_path / "gain")
    assert (
        type(loaded) is GainSAE
        and loaded.cfg == sae.cfg
        and torch.equal(loaded.encode(x), sae.encode(x))
    )
    with pytest.raises(
        ConfigError, match="sae.gain: applies to gain only, not sae.architecture = relu"
    ):
        load_config(None, ["sae.architecture=relu", "sae.gain=2"])


def test_a_run_config_written_with_every_architectures_settings_still_reads(tmp_path):
    """config.yaml files of earlier versions hold every architecture's settings at their
    defaults; the run they describe ignored the others, and so does reading them now."""
    import yaml

    from sae.config import load_config, saved_config, to_dict

    old = to_dict(load_config(None, []))
    old["sae"].update(
        l1_coefficient=5.0, l0_coefficient=1.0, sparsity_warmup_fraction=0.05, bandwidth=0.05
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert saved_config(tmp_path / "config.yaml") == load_config(None, [])
    with pytest.raises(ConfigError, match=r"sae.\w+: applies to (relu|jumprelu)"):
        load_config(tmp_path / "config.yaml")  # a config the user writes is still checked


def test_gated_loss_is_the_papers_with_the_decoder_frozen_in_the_gate_term():
    """The loss against Rajamanoharan et al.'s form written with a separate magnitude
    matrix W_mag = exp(r_mag) W_enc (ours uses one product), and the gate's auxiliary
    reconstruction sends no gradient into the decoder."""
    sae = random_sae("gated").double()
    x = torch.randn(40, 16, dtype=torch.float64)
    loss, fvu, fires = sae.training_loss(x)
    loss.backward()

    W_enc, b_gate, W_dec, b_dec = (
        t.detach().clone().requires_grad_() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    )
    r_mag, b_mag = sae.r_mag.detach(), sae.b_mag.detach()
    pi_gate = (x - b_dec) @ W_enc.t() + b_gate
    pi_mag = (x - b_dec) @ (W_enc * r_mag.exp()[:, None]).t() + b_mag
    z = (pi_gate > 0) * pi_mag.relu()
    rec = (x - z @ W_dec - b_dec).pow(2).sum()
    l1 = (pi_gate.relu() * W_dec.norm(dim=1)).sum()
    aux = (x - pi_gate.relu() @ W_dec.detach() - b_dec.detach()).pow(2).sum()
    reference = (rec + sae.cfg.l1_coefficient * l1 + aux) / x.shape[0]
    reference.backward()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(fvu, rec.detach() / (x - x.mean(0)).pow(2).sum())
    assert torch.equal(fires, (z > 0).sum(0))
    for mine, theirs in (
        (sae.W_enc, W_enc),
        (sae.b_enc, b_gate),
        (sae.W_dec, W_dec),
        (sae.b_dec, b_dec),
    ):
        torch.testing.assert_close(mine.grad, theirs.grad)
    # without the aux term's freeze the decoder's gradient would differ
    frozen_free = torch.autograd.grad((x - pi_gate.relu() @ W_dec - b_dec).pow(2).sum(), W_dec)[0]
    assert frozen_free.abs().sum() > 0


def test_matryoshka_loss_is_each_prefixs_error_summed_plus_auxk_on_the_full_residual():
    """Against the paper's loss written densely: the batch's N*k largest pre-activations over
    all latents are selected once; prefix m decodes the selected latents below m with
    W_dec[:m]; AuxK reconstructs the whole code's residual from dead latents."""
    sae = random_sae("matryoshka").double()  # d 16, M 64, k 4
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:50] = True
    loss, fvu, fires = sae.training_loss(x, dead)
    loss.backward()

    W_enc, b_enc, W_dec, b_dec = (
        t.detach().clone().requires_grad_() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    )
    pre = (x - b_dec) @ W_enc.t() + b_enc
    smallest_kept = pre.detach().flatten().sort(descending=True).values[40 * 4 - 1]
    z = pre.relu() * (pre >= smallest_kept)
    V = (x - x.mean(0)).pow(2).sum()
    sizes = (2, 6, 14, 30, 64)  # 64 x (1/32, 3/32, 7/32, 15/32, 1): the default prefixes
    errors = [(x - z[:, :m] @ W_dec[:m] - b_dec).pow(2).sum() / V for m in sizes]
    aux_vals, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(8, dim=1)  # k_aux = d / 2
    z_aux = torch.zeros_like(pre).scatter(1, aux_idx, aux_vals.relu())
    residual = (x - z @ W_dec - b_dec).detach()
    aux = (1 / 32) * min(10 / 8, 1.0) * (residual - z_aux @ W_dec).pow(2).sum() / V
    reference = sum(errors) + aux
    reference.backward()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(fvu, errors[-1].detach())  # the FVU is the whole SAE's
    assert torch.equal(fires, (z > 0).sum(0)) and errors[0] > errors[-1]
    first_threshold = float(z.detach()[z > 0].min())  # the first update takes the batch's value
    assert float(sae.threshold[0]) == first_threshold
    for mine, theirs in ((sae.W_enc, W_enc), (sae.b_enc, b_enc), (sae.W_dec, W_dec)):
        torch.testing.assert_close(mine.grad, theirs.grad)
    torch.testing.assert_close(sae.b_dec.grad, b_dec.grad)


def test_matryoshka_with_one_prefix_of_all_latents_is_batchtopk():
    from sae.config import load_config
    from sae.training.trainer import make_sae

    btk = random_sae("batchtopk")
    settings = ["sae.architecture=matryoshka", "sae.num_latents=64", "sae.k=4"]
    one = make_sae(load_config(None, [*settings, "sae.prefix_fractions=[1.0]"]).sae, 16)
    nested = make_sae(load_config(None, settings).sae, 16)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(6))
    dead = torch.arange(64) % 7 == 0
    results = []
    for sae in (btk, one, nested):
        sae.load_state_dict(btk.state_dict())
        loss, fvu, fires = sae.training_loss(x, dead)
        loss.backward()
        results.append((loss, fvu, fires, [p.grad for p in sae.parameters()], sae.threshold))
    (loss_b, fvu_b, fires_b, g_b, th_b), (loss_1, fvu_1, fires_1, g_1, th_1) = results[:2]
    assert torch.equal(loss_1, loss_b) and torch.equal(fvu_1, fvu_b)
    assert torch.equal(fires_1, fires_b) and torch.equal(th_1, th_b)
    assert all(torch.equal(a, b) for a, b in zip(g_1, g_b))
    loss_n, fvu_n, fires_n = results[2][:3]  # nested prefixes: same selection, more error
    assert torch.equal(fvu_n, fvu_b) and torch.equal(fires_n, fires_b) and loss_n > loss_b


@pytest.mark.parametrize(
    "value, message",
    [
        ("[0.5, 0.25, 1.0]", r"\[0.5, 0.25, 1.0\] is not valid; give fractions of num_latents"),
        ("[0.25, 0.5]", r"\[0.25, 0.5\] is not valid; .* strictly increase and end at 1.0"),
        ("[0.5, 0.5, 1.0]", r"\[0.5, 0.5, 1.0\] is not valid"),
        ("[]", r"\[\] is not valid"),
        ("[0, 1.0]", r"0.0 is out of range; must be > 0"),
        ("[0.5, 2]", r"2.0 is out of range; must be <= 1"),
        ("0.5", r"0.5 is not a list of numbers"),
    ],
)
def test_matryoshka_refuses_prefixes_that_are_not_nested_in_one_line(value, message):
    from sae.config import load_config

    with pytest.raises(ConfigError, match="sae.prefix_fractions: " + message) as e:
        load_config(None, ["sae.architecture=matryoshka", f"sae.prefix_fractions={value}"])
    assert "\n" not in str(e.value)


def test_matryoshka_refuses_prefixes_that_round_to_no_new_latents_and_lists_its_key():
    from sae.config import describe, load_config
    from sae.training.trainer import make_sae

    small = ["sae.architecture=matryoshka", "sae.num_latents=16", "sae.k=4"]
    cfg = load_config(None, small).sae
    with pytest.raises(
        ConfigError,
        match=r"sae.prefix_fractions: 0.03125 of the 16 latents for width 8 is 0 latents, not "
        r"more than the prefix before it \(0\); use fewer or larger fractions, or more latents",
    ):
        make_sae(cfg, 8)
    cfg = load_config(None, [*small, "sae.prefix_fractions=[0.25, 1]"]).sae
    assert make_sae(cfg, 8).spec().prefixes == (4,)
    rows = {key: (default, help) for key, default, help in describe()}
    default, help = rows["sae.prefix_fractions"]
    assert default == "[0.03125, 0.09375, 0.21875, 0.46875, 1.0]"
    assert help.startswith("matryoshka: ") and "fractions of num_latents" in help
    assert rows["sae.k"][1].startswith("topk, batchtopk, matryoshka: ")


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_multi_topk_term_ramps_in_as_progress_squared_over_eight(progress):
    """The 4k term's weight is progress ** 2 / 8 (Gao et al.'s 1/8 reached at the end; at
    the start the loss is plain TopK's), checked against the dense reference loss."""
    from sae.architectures.fused_topk import topk_loss_reference

    sae = random_sae("topk").double()
    sae.cfg.multi_topk = True
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    loss, fvu, _ = sae.training_loss(x, progress=progress)
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    plain = topk_loss_reference(x, *params, k=4)
    with_4k = topk_loss_reference(x, *params, k=4, multi_topk=True, multi_topk_weight=1.0)
    torch.testing.assert_close(loss, plain + progress**2 * (with_4k - plain) / 8)
    torch.testing.assert_close(fvu, plain.detach())
    sae.cfg.multi_topk_ramp_power = 0.0  # the paper's constant 1/8
    torch.testing.assert_close(
        sae.training_loss(x, progress=progress)[0], plain + (with_4k - plain) / 8
    )
