"""SAELens and sparsify files: built here from the format description in docs/design.md §5
(tensor names, shapes, cfg keys), loaded, and checked against reference encoders written
from that description; round trips ours -> theirs -> ours give back the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_architectures import random_sae

from sae.errors import ConfigError
from sae.formats import convert, find_sae_folder, load_sae, parse_dtype, read_sae
from sae.formats.hook_names import to_module_path, to_ours, to_transformer_lens

D, M = 12, 40


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- reference encoders, from docs/design.md §5 and the projects' documented math ------


def ref_saelens(
    cfg: dict, t: dict, x: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, x_hat) of a SAELens SAE; ``scale``: the factor of expected_average_only_in."""
    arch = cfg.get("architecture", "standard")
    if cfg.get("activation_fn_str") == "topk":
        arch = "topk"
    xs = x * scale
    sae_in = xs - t["b_dec"] if cfg.get("apply_b_dec_to_input", True) else xs
    pre = sae_in @ t["W_enc"] + t.get("b_enc", t.get("b_gate"))
    if arch == "gated":  # SAELens's two-matrix form: W_mag = W_enc * exp(r_mag)
        mag = sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]
        z = (pre > 0) * torch.relu(mag)
    elif arch == "standard":
        z = torch.relu(pre)
    elif arch == "jumprelu":
        z = torch.relu(pre) * (pre > t["threshold"])
    else:
        k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
        norms = t["W_dec"].norm(dim=1) if cfg.get("rescale_acts_by_decoder_norm") else None
        if norms is not None:
            pre = pre * norms
        top = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    zd = z if norms_or_none(arch, cfg) is None else z / t["W_dec"].norm(dim=1)
    if "scaling_factor" in t:
        zd = zd * t["scaling_factor"]
    x_hat = (zd @ t["W_dec"] + t["b_dec"]) / scale
    return z, x_hat


def norms_or_none(arch, cfg):
    return True if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm") else None


def ref_sparsify(cfg: dict, t: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    top = pre.topk(cfg["k"], dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    return z, z @ t["W_dec"] + t["b_dec"]


# ---- files written by hand, as the other tools write them ----------------------------


def saelens_tensors(arch: str, seed: int = 0) -> dict:
    t = {
        "W_enc": rand(D, M, seed=seed) / 3,
        "W_dec": rand(M, D, seed=seed + 1) * 0.5,
        "b_enc": rand(M, seed=seed + 2) * 0.1,
        "b_dec": rand(D, seed=seed + 3) * 0.1,
    }
    if arch == "jumprelu":
        t["threshold"] = rand(M, seed=seed + 4).abs() * 0.3
    if arch == "gated":  # no b_enc: the gate's bias, and the magnitude path's scale and bias
        t["b_gate"] = t.pop("b_enc")
        t["r_mag"] = rand(M, seed=seed + 5) * 0.2
        t["b_mag"] = rand(M, seed=seed + 6) * 0.1
    return t


def write_saelens(folder: Path, cfg: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


def saelens_cfg(
    arch: str, apply: bool = True, hook: str = "blocks.3.hook_resid_post", **extra
) -> dict:
    """A SAELens >= 6 cfg.json."""
    return {
        "architecture": arch,
        "d_in": D,
        "d_sae": M,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "metadata": {
            "model_name": "meta-llama/Llama-3.1-8B",
            "hook_name": hook,
            "hook_head_index": None,
            "context_size": 1024,
            "prepend_bos": True,
            "dataset_path": "some/dataset",
            "sae_lens_version": "6.5.0",
        },
    }


def write_sparsify(folder: Path, k: int = 5, seed: int = 0, **cfg_extra) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "activation": "topk",
        "expansion_factor": 4,
        "normalize_decoder": True,
        "num_latents": M,
        "k": k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D,
        **cfg_extra,
    }
    t = {
        "encoder.weight": rand(M, D, seed=seed) / 3,
        "encoder.bias": rand(M, seed=seed + 1) * 0.1,
        "W_dec": rand(M, D, seed=seed + 2) * 0.5,
        "b_dec": rand(D, seed=seed + 3) * 0.1,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(t, str(folder / "sae.safetensors"))
    return {"cfg": cfg, "tensors": t}


def check_against(sae, ref, x):
    z, x_hat = ref
    torch.testing.assert_close(sae.encode(x), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), x_hat, rtol=1e-5, atol=1e-5)
    assert (z > 0).sum() > 0  # the check is not vacuous


X = rand(64, D, seed=99) * 2


@pytest.mark.parametrize(
    "arch,apply",
    [
        ("standard", True),
        ("standard", False),
        ("topk", True),
        ("topk", False),
        ("jumprelu", False),
        ("jumprelu", True),
        ("gated", True),
    ],
)
def test_saelens_folders_encode_and_decode_like_the_reference(tmp_path, arch, apply):
    cfg = saelens_cfg(
        arch, apply, **({"k": 6, "rescale_acts_by_decoder_norm": False} if arch == "topk" else {})
    )
    t = saelens_tensors(arch)
    sae = load_sae(write_saelens(tmp_path / "s", cfg, t))
    assert sae.architecture == {"standard": "relu"}.get(arch, arch)
    check_against(sae, ref_saelens(cfg, t, X), X)
    stored = read_sae(tmp_path / "s")
    assert stored.format == "saelens" and stored.hook == "layers.3"
    assert (
        stored.metadata["model_name"] == "meta-llama/Llama-3.1-8B"
        and stored.metadata["context_size"] == 1024
    )
    assert stored.metadata["source"] == {
        "format": "saelens",
        "hook_name": "blocks.3.hook_resid_post",
    }


def test_pre_6_saelens_configs_with_flat_keys_and_topk_activation_fn(tmp_path):
    cfg = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": M,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "gpt2",
        "hook_name": "blocks.5.hook_mlp_out",
        "hook_layer": 5,
        "hook_head_index": None,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 7},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "context_size": 128,
        "dataset_path": "openwebtext",
        "normalize_activations": False,
    }
    t = saelens_tensors("topk", seed=5)
    sae = load_sae(write_saelens(tmp_path / "s", cfg, t))
    assert sae.architecture == "topk" and sae.cfg.k == 7
    check_against(sae, ref_saelens(cfg, t, X), X)
    assert read_sae(tmp_path / "s").hook == "layers.5.mlp"


def test_saelens_scalings_are_folded_in_exactly(tmp_path):
    # rescale_acts_by_decoder_norm (decoder rows far from unit norm, so it matters)
    cfg = saelens_cfg("topk", k=6, rescale_acts_by_decoder_norm=True)
    t = saelens_tensors("topk", seed=1)
    t["W_dec"] = t["W_dec"] * rand(M, seed=7).abs()[:, None] * 3
    check_against(load_sae(write_saelens(tmp_path / "r", cfg, t)), ref_saelens(cfg, t, X), X)
    # expected_average_only_in with the activation_scaler.json SAELens writes
    cfg = saelens_cfg("jumprelu", False, normalize_activations="expected_average_only_in")
    t = saelens_tensors("jumprelu", seed=2)
    folder = write_saelens(tmp_path / "n", cfg, t)
    (folder / "activation_scaler.json").write_text(
        json.dumps({"scaling_factor": 0.37, "has_whitening": False})
    )
    check_against(load_sae(folder), ref_saelens(cfg, t, X, scale=0.37), X)
    # an old finetuning scaling_factor tensor
    cfg = saelens_cfg("standard")
    t = {**saelens_tensors("standard", seed=3), "scaling_factor": rand(M, seed=8).abs() + 0.5}
    check_against(load_sae(write_saelens(tmp_path / "f", cfg, t)), ref_saelens(cfg, t, X), X)


def test_sparsify_run_of_several_hook_points(tmp_path):
    run = tmp_path / "run"
    a = write_sparsify(run / "layers.1", k=4, seed=0)
    b = write_sparsify(run / "layers.3", k=6, seed=10)
    (run / "config.json").write_text(
        json.dumps(
            {
                "model": "EleutherAI/pythia-70m",
                "dataset": "some/corpus",
                "split": "train",
                "ctx_len": 512,
                "text_column": "body",
            }
        )
    )
    with pytest.raises(ConfigError, match=r"holds 2 SAEs \(layers.1, layers.3\)"):
        find_sae_folder(run)
    for name, files in (("layers.1", a), ("layers.3", b)):
        sae = load_sae(run / name)
        assert sae.architecture == "topk" and sae.cfg.k == files["cfg"]["k"]
        check_against(sae, ref_sparsify(files["cfg"], files["tensors"], X), X)
        stored = read_sae(run / name)
        assert stored.hook == name and stored.format == "sparsify"
        assert (
            stored.metadata["model_name"] == "EleutherAI/pythia-70m"
            and stored.metadata["context_size"] == 512
        )
        assert (
            stored.metadata["text_column"] == "body" and stored.metadata["dataset_split"] == "train"
        )
    out = convert(run, tmp_path / "ours", "sae", log=lambda line: None)  # the whole run at once
    assert sorted(p.name for p in out.values()) == ["layers.1", "layers.3"]
    check_against(
        load_sae(tmp_path / "ours" / "layers.3"), ref_sparsify(b["cfg"], b["tensors"], X), X
    )


def test_sparsify_num_latents_zero_means_expansion_factor(tmp_path):
    files = write_sparsify(tmp_path / "layers.0", num_latents=0, expansion_factor=M // D + 0)
    if M % D:  # M = 40 is not a multiple of D = 12: build a consistent file instead
        t = files["tensors"]
        n = D * 3
        save_file(
            {
                "encoder.weight": t["encoder.weight"][:n],
                "encoder.bias": t["encoder.bias"][:n],
                "W_dec": t["W_dec"][:n],
                "b_dec": t["b_dec"],
            },
            str(tmp_path / "layers.0" / "sae.safetensors"),
        )
    assert load_sae(tmp_path / "layers.0").cfg.num_latents == D * 3


# ---- round trips -------------------------------------------------------------------


def trained_like(arch: str, seed: int = 0):
    """One of our SAEs (d = D, M latents), with random (not freshly initialised) weights."""
    return random_sae(arch, d=D, M=M, seed=seed)


def same_files(a: Path, b: Path) -> None:
    assert json.loads((a / "cfg.json").read_text()) == json.loads((b / "cfg.json").read_text())
    ta, tb = load_file(a / "sae_weights.safetensors"), load_file(b / "sae_weights.safetensors")
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "relu", "jumprelu", "gated"])
def test_ours_to_saelens_and_back_is_exact_and_saelens_computes_the_same(tmp_path, arch):
    sae = trained_like(arch)
    sae.save(
        tmp_path / "ours",
        metadata={"hook_name": "layers.4.mlp", "model_name": "m", "context_size": 64},
    )
    convert(tmp_path / "ours", tmp_path / "theirs", "saelens", log=lambda line: None)
    convert(tmp_path / "theirs", tmp_path / "back", "sae", log=lambda line: None)
    same_files(tmp_path / "ours", tmp_path / "back")
    cfg = json.loads((tmp_path / "theirs" / "cfg.json").read_text())
    written_as = {"relu": "standard", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}
    assert cfg["architecture"] == written_as.get(arch, arch)
    assert cfg["metadata"]["hook_name"] == "blocks.4.hook_mlp_out"
    extra = {"jumprelu": {"b_enc", "threshold"}, "gated": {"b_gate", "r_mag", "b_mag"}}
    assert set(load_file(tmp_path / "theirs" / "sae_weights.safetensors")) == {
        "W_enc",
        "W_dec",
        "b_dec",
    } | extra.get(cfg["architecture"], {"b_enc"})
    # what a SAELens reader computes from the written file is what our SAE computes
    z, x_hat = ref_saelens(cfg, load_file(tmp_path / "theirs" / "sae_weights.safetensors"), X)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(X), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(X), x_hat, rtol=1e-5, atol=1e-5)


def test_ours_to_sparsify_and_back_is_exact_and_sparsify_computes_the_same(tmp_path):
    sae = trained_like("topk")
    sae.save(tmp_path / "ours", metadata={"hook_name": "layers.0.resid_pre", "model_name": "m"})
    out = convert(tmp_path / "ours", tmp_path / "theirs", "sparsify", log=lambda line: None)
    assert out == {".": tmp_path / "theirs" / "embed_tokens"}  # what enters layer 0
    convert(tmp_path / "theirs", tmp_path / "back", "sae", log=lambda line: None)
    same_files(tmp_path / "ours", tmp_path / "back" / "embed_tokens")
    folder = tmp_path / "theirs" / "embed_tokens"
    cfg, t = json.loads((folder / "cfg.json").read_text()), load_file(folder / "sae.safetensors")
    assert set(t) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} and t[
        "encoder.weight"
    ].shape == (M, D)
    z, x_hat = ref_sparsify(cfg, t, X)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(X), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(X), x_hat, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "theirs" / "config.json").read_text())["hookpoints"] == [
        "embed_tokens"
    ]


def test_bfloat16_files_convert_without_a_float32_detour(tmp_path):
    cfg = saelens_cfg("standard", dtype="bfloat16")
    t = {k: v.bfloat16() for k, v in saelens_tensors("standard").items()}
    write_saelens(tmp_path / "s", cfg, t)
    convert(tmp_path / "s", tmp_path / "ours", "sae", log=lambda line: None)
    back = load_file(tmp_path / "ours" / "sae_weights.safetensors")
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], t[k]) for k in t)
    assert json.loads((tmp_path / "ours" / "cfg.json").read_text())["dtype"] == "bfloat16"
    assert load_sae(tmp_path / "ours", dtype=torch.float32).W_dec.dtype == torch.float32


# ---- hook names --------------------------------------------------------------------


def test_hook_names_map_both_ways():
    pairs = {
        "blocks.7.hook_resid_post": "layers.7",
        "blocks.7.hook_resid_pre": "layers.7.resid_pre",
        "blocks.7.hook_mlp_out": "layers.7.mlp",
        "blocks.7.hook_attn_out": "layers.7.attn",
    }
    for theirs, ours in pairs.items():
        assert to_ours(theirs) == ours and to_transformer_lens(ours) == theirs
    for module_path, ours in {
        "layers.10": "layers.10",
        "h.3": "layers.3",
        "model.layers.5.mlp": "layers.5.mlp",
        "embed_tokens": "layers.0.resid_pre",
    }.items():
        assert to_ours(module_path) == ours
    assert (
        to_module_path("layers.4.resid_pre") == "layers.3"
        and to_module_path("layers.4.attn") == "layers.4.self_attn"
    )
    for unmappable in (
        "blocks.3.attn.hook_z",
        "blocks.3.hook_resid_mid",
        "hook_embed",
        "blocks.3.mlp.hook_post",
    ):
        assert to_ours(unmappable) is None


# ---- one-line errors ---------------------------------------------------------------


def test_bad_folders_and_files_are_refused_in_one_line(tmp_path):
    def refused(path, pattern):
        with pytest.raises(ConfigError, match=pattern) as e:
            load_sae(path)
        assert "\n" not in str(e.value)

    (tmp_path / "empty").mkdir()
    refused(
        tmp_path / "empty",
        r"no SAE in .*expected cfg.json with sae_weights.safetensors .* or with sae.safetensors",
    )
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "cfg.json").write_text("{}")
    with pytest.raises(ConfigError, match="in no known SAE format: expected cfg.json with"):
        read_sae(tmp_path / "cfg_only")
    write_saelens(tmp_path / "temporal", saelens_cfg("temporal"), saelens_tensors("standard"))
    refused(
        tmp_path / "temporal",
        "architecture 'temporal' is not supported; SAELens SAEs of architecture gated, jumprelu, "
        "standard, topk",
    )
    write_saelens(
        tmp_path / "shape",
        saelens_cfg("standard"),
        {**saelens_tensors("standard"), "b_enc": torch.zeros(M + 1)},
    )
    refused(tmp_path / "shape", r"b_enc has shape \(41,\), cfg.json says \(40,\)")
    write_saelens(
        tmp_path / "ints",
        saelens_cfg("standard"),
        {**saelens_tensors("standard"), "b_dec": torch.zeros(D, dtype=torch.int32)},
    )
    refused(tmp_path / "ints", "b_dec holds int32; SAE weights must be float32")
    nan = saelens_tensors("jumprelu")
    nan["threshold"][3] = float("nan")
    write_saelens(tmp_path / "nan", saelens_cfg("jumprelu"), nan)
    refused(tmp_path / "nan", "threshold holds NaN or inf; the file is damaged")
    write_saelens(
        tmp_path / "ln",
        saelens_cfg("standard", normalize_activations="layer_norm"),
        saelens_tensors("standard"),
    )
    refused(tmp_path / "ln", "normalize_activations 'layer_norm' .* is not supported")
    write_saelens(
        tmp_path / "avg",
        saelens_cfg("standard", normalize_activations="expected_average_only_in"),
        saelens_tensors("standard"),
    )
    refused(tmp_path / "avg", "activation_scaler.json with scaling_factor is missing")
    write_saelens(
        tmp_path / "z",
        saelens_cfg("standard", reshape_activations="hook_z"),
        saelens_tensors("standard"),
    )
    refused(tmp_path / "z", r"per-head \(hook_z\) SAEs are not supported")
    write_sparsify(tmp_path / "gm" / "layers.1", activation="groupmax")
    refused(tmp_path / "gm" / "layers.1", "activation 'groupmax' is not supported")
    write_sparsify(tmp_path / "tc" / "layers.1", transcode=True)
    refused(tmp_path / "tc" / "layers.1", "transcode is true; transcoders are not supported")
    with pytest.raises(ConfigError, match="--sae-dtype: 'float8' is not one of float32"):
        parse_dtype("float8")
    write_saelens(tmp_path / "ok", saelens_cfg("standard"), saelens_tensors("standard"))
    with pytest.raises(ConfigError, match="SAE dtype int8 is not supported; use one of float32"):
        load_sae(tmp_path / "ok", dtype=torch.int8)


def test_convert_refuses_what_the_target_format_cannot_hold(tmp_path):
    trained_like("relu").save(tmp_path / "relu", metadata={"hook_name": "layers.1"})
    with pytest.raises(
        ConfigError, match="sparsify holds TopK SAEs .* this one is 'relu' .*--format saelens"
    ):
        convert(tmp_path / "relu", tmp_path / "out", "sparsify", log=lambda line: None)
    run = tmp_path / "sweep"
    trained_like("topk", 1).save(run / "layers.1" / "k4a", metadata={"hook_name": "layers.1"})
    trained_like("topk", 2).save(run / "layers.1" / "k4b", metadata={"hook_name": "layers.1"})
    with pytest.raises(
        ConfigError,
        match="one SAE per hook point, and layers.1/k4a, layers.1/k4b all read layers.1",
    ):
        convert(run, tmp_path / "out2", "sparsify", log=lambda line: None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConfigError, match="DST: .* exists and is not empty"):
        convert(tmp_path / "relu", tmp_path / "full", "saelens", log=lambda line: None)


# ---- hub ---------------------------------------------------------------------------


def test_hub_sae_is_fetched_once_into_checkpoints_hub(tmp_path, monkeypatch):
    import huggingface_hub

    remote = tmp_path / "remote"
    write_sparsify(remote / "layers.3", k=5)
    write_sparsify(remote / "layers.4", k=5)
    (remote / "config.json").write_text(json.dumps({"model": "org/model"}))
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, local_dir=None, **kw):
        import fnmatch
        import shutil

        calls.append((repo_id, sorted(allow_patterns)))
        for f in remote.rglob("*"):
            rel = f.relative_to(remote).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, Path(local_dir) / rel)
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("SAE_HUB_DIR", str(tmp_path / "hub"))
    stored = read_sae(find_sae_folder("EleutherAI/sae-test/layers.3"))
    assert stored.folder == tmp_path / "hub" / "EleutherAI" / "sae-test" / "layers.3"
    assert stored.hook == "layers.3" and stored.metadata["model_name"] == "org/model"
    assert not (
        tmp_path / "hub" / "EleutherAI" / "sae-test" / "layers.4"
    ).exists()  # only the subfolder
    assert calls[0][0] == "EleutherAI/sae-test" and "layers.3/cfg.json" in calls[0][1]
    find_sae_folder("hf://EleutherAI/sae-test/layers.3")  # second use: no download
    assert len(calls) == 1


def test_hub_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_HUB_DIR", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError, match=r"cannot download nobody/nothing/layers.1 from the Hugging Face hub"
    ) as e:
        find_sae_folder("nobody/nothing/layers.1")
    assert "\n" not in str(e.value)
    (tmp_path / "checkpoints").mkdir()  # an existing first folder: a local path, reported missing
    with pytest.raises(ConfigError, match="does not exist"):
        find_sae_folder("checkpoints/typo")


# ---- against the real tools, where installed (not in CI: they pull in TransformerLens) ----


def test_the_real_saelens_reads_ours_and_we_read_what_it_writes(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    for arch in ("topk", "relu", "jumprelu", "batchtopk", "matryoshka", "gated"):
        ours = trained_like(arch)
        ours.save(tmp_path / arch, metadata={"hook_name": "layers.2"})
        convert(tmp_path / arch, tmp_path / f"{arch}-sl", "saelens", log=lambda line: None)
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / f"{arch}-sl"))
        assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(X), ours.encode(X), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(theirs(X), ours(X), rtol=1e-5, atol=1e-5)
        theirs.save_model(str(tmp_path / f"{arch}-sl-saved"))  # SAELens's own writer
        back = load_sae(tmp_path / f"{arch}-sl-saved")
        with torch.no_grad():
            torch.testing.assert_close(back.encode(X), theirs.encode(X), rtol=1e-5, atol=1e-5)


def test_the_real_sparsify_reads_ours_and_we_read_what_it_writes(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    ours = trained_like("topk")
    ours.save(tmp_path / "ours", metadata={"hook_name": "layers.2"})
    convert(tmp_path / "ours", tmp_path / "sp", "sparsify", log=lambda line: None)
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "sp" / "layers.2")
    with torch.no_grad():
        out = theirs.encode(X)
        z = torch.zeros(len(X), M).scatter_(1, out.top_indices, out.top_acts)
        torch.testing.assert_close(z, ours.encode(X), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            theirs.decode(out.top_acts, out.top_indices), ours(X), rtol=1e-5, atol=1e-5
        )
        fresh = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=M, k=3))
        fresh.encoder.bias.data.normal_()
        fresh.save_to_disk(tmp_path / "run" / "layers.5")  # sparsify's own writer
        back = load_sae(tmp_path / "run" / "layers.5")
        out = fresh.encode(X)
        z = torch.zeros(len(X), M).scatter_(1, out.top_indices, out.top_acts)
        torch.testing.assert_close(back.encode(X), z, rtol=1e-5, atol=1e-5)


# ---- the analyzer and interventions on SAELens and sparsify copies of a trained SAE ------


def test_every_command_reads_saelens_and_sparsify_copies_of_a_trained_sae(demo_sae_run, tmp_path):
    from click.testing import CliRunner

    from sae import cli

    def analyze(*args):
        result = CliRunner().invoke(cli.analyze, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.stdout

    assert "-> " in analyze("convert", demo_sae_run, tmp_path / "sl", "--format", "saelens")
    analyze("convert", demo_sae_run, tmp_path / "sp", "--format", "sparsify")
    analyze("convert", demo_sae_run, tmp_path / "ours", "--format", "sae")
    copies = {
        "saelens": tmp_path / "sl" / "layers.2",
        "sparsify": tmp_path / "sp" / "layers.2",
        "ours, no run folder": tmp_path / "ours" / "layers.2",
    }

    def features(path):
        data = json.loads(
            analyze(
                "features", path, "--tokens", "3000", "--examples", "3", "--limit", "4", "--json"
            )
        )
        return data["features_shown"], data["density_histogram"]

    native = features(demo_sae_run)
    for name, path in copies.items():
        assert features(path) == native, name
    generate = [
        "--prompt",
        "The function raised",
        "--ablate",
        "1,2,3",
        "--steer",
        "5:+40",
        "--max-new-tokens",
        "6",
        "--json",
    ]
    native = json.loads(analyze("generate", demo_sae_run, *generate))
    assert native[0]["intervened"] != native[0]["baseline"]
    for name, path in copies.items():
        assert json.loads(analyze("generate", path, *generate)) == native, name
    # evaluate reads model, data and hook points from the copies' own files
    evaluated = [
        json.loads((path / "metrics.json").read_text())
        if analyze("evaluate", path.parent, "--set", "data.eval_tokens=2048")
        else None
        for path in copies.values()
    ]
    assert all(
        e["hook"] == "layers.2" and e["fvu"] == pytest.approx(evaluated[0]["fvu"], rel=1e-6)
        for e in evaluated
    )


def test_a_run_that_cannot_be_converted_whole_leaves_nothing_behind(tmp_path):
    run = tmp_path / "mixed"
    trained_like("topk").save(run / "layers.1", metadata={"hook_name": "layers.1"})
    trained_like("relu").save(run / "layers.2", metadata={"hook_name": "layers.2"})
    with pytest.raises(ConfigError, match="sparsify holds TopK SAEs .* this one is 'relu'"):
        convert(run, tmp_path / "out", "sparsify", log=lambda line: None)
    assert not (tmp_path / "out").exists()
