"""SAE modules: encode/decode semantics and the on-disk format."""

import json

import pytest
import torch

from sae.architectures import TopKConfig, TopKSAE, load_sae
from sae.architectures.base import CONFIG_FILE, WEIGHTS_FILE
from sae.errors import ConfigError


def make_sae(d=16, M=64, k=4, seed=0):
    sae = TopKSAE(TopKConfig(d_in=d, num_latents=M, k=k))
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
    sae = TopKSAE(TopKConfig(d_in=8, num_latents=32, k=2))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(sae.W_enc, sae.W_dec)


def test_save_load_round_trip_in_saelens_layout(tmp_path):
    sae = make_sae()
    sae.save(tmp_path / "sae", metadata={"hook_name": "layers.2"})
    cfg = json.loads((tmp_path / "sae" / CONFIG_FILE).read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 16 and cfg["d_sae"] == 64 and cfg["k"] == 4
    from safetensors.torch import load_file

    assert load_file(tmp_path / "sae" / WEIGHTS_FILE)["W_enc"].shape == (16, 64)  # SAELens: [d_in, d_sae]
    loaded = load_sae(tmp_path / "sae", dtype=torch.float64)
    assert loaded.W_dec.dtype == torch.float64
    x = torch.randn(5, 16)
    torch.testing.assert_close(loaded(x.double()).float(), sae(x))
    sae.save(tmp_path / "sae")  # replacing an existing folder works and leaves nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


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
    with pytest.raises(ConfigError, match="not a readable SAE config"):
        load_sae(tmp_path / "missing")
