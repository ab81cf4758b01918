"""Feature statistics against brute force on known latents, and on a real model pass."""

import math

import pytest
import torch

from sae.config import SAEConfig
from sae.errors import ConfigError
from sae.feature_stats import (HIST_BINS, HIST_BINS_PER_OCTAVE, HIST_LOG2_MIN, StatsAccumulator, StatsSettings,
                               compute_feature_stats, density_histogram, feature_record, load_feature_stats,
                               save_feature_stats, token_decoder)
from sae.harvest import special_token_ids
from sae.hooks import ActivationCapture, resolve_hook
from sae.trainer import make_sae


def sparse_latents(B, T, M, seed, density=0.2):
    """Random nonnegative latents [B, T, M] with about ``density`` of them nonzero, and
    distinct values (so the top-k is unambiguous)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(B, T, M, generator=g) * 10
    return torch.where(torch.rand(B, T, M, generator=g) < density, z, 0.0)


@pytest.fixture(scope="module")
def stream():
    """Four chunks of latents [2, 16, 6] with token ids and a keep mask (column 0 = BOS)."""
    chunks = []
    for c in range(4):
        z = sparse_latents(2, 16, 6, seed=c)
        ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(100 + c))
        keep = torch.ones(2, 16, dtype=torch.bool)
        keep[:, 0] = False
        chunks.append((z, ids, keep))
    return chunks


def accumulate(chunks, settings):
    acc = StatsAccumulator(chunks[0][0].shape[-1], settings, "cpu")
    for z, ids, keep in chunks:
        acc.update(z.clone(), ids, keep)
    return acc.result({})


def test_counts_sums_max_and_histogram_match_brute_force(stream):
    stats = accumulate(stream, StatsSettings(top_examples=3, quantile_bins=2, samples_per_bin=2))
    z = torch.cat([torch.where(k[..., None], z, 0.0).reshape(-1, z.shape[-1]) for z, _, k in stream])
    assert stats.tokens == sum(int(k.sum()) for _, _, k in stream) and stats.contexts == 8
    assert torch.equal(stats.fires, (z > 0).sum(0))
    torch.testing.assert_close(stats.act_sum, z.double().sum(0))
    assert torch.equal(stats.act_max, z.max(0).values)
    for f in range(z.shape[1]):
        vals = z[:, f][z[:, f] > 0]
        bins = ((torch.log2(vals) - HIST_LOG2_MIN) * HIST_BINS_PER_OCTAVE).floor().long().clamp(0, HIST_BINS - 1)
        assert torch.equal(stats.hist[f], torch.bincount(bins, minlength=HIST_BINS))


def test_top_examples_are_the_largest_with_their_windows(stream):
    s = StatsSettings(top_examples=4, context_before=3, context_after=2)
    stats = accumulate(stream, s)
    T = 16
    for f in range(6):
        entries = []  # (value, context index, position) of every kept firing
        for c, (z, ids, keep) in enumerate(stream):
            for b in range(2):
                for t in range(T):
                    if keep[b, t] and z[b, t, f] > 0:
                        entries.append((z[b, t, f].item(), 2 * c + b, t))
        entries.sort(reverse=True)
        assert stats.top.values[f].tolist() == pytest.approx([v for v, _, _ in entries[:4]])
        for slot, (value, ctx, pos) in enumerate(entries[:4]):
            assert (stats.top.context[f, slot].item(), stats.top.position[f, slot].item()) == (ctx, pos)
            z, ids, _ = stream[ctx // 2]
            for w, offset in enumerate(range(-3, 3)):
                t = pos + offset
                if 0 <= t < T:
                    assert stats.top.window_tokens[f, slot, w] == ids[ctx % 2, t]
                    expected = z[ctx % 2, t, f] if t != 0 else 0.0  # BOS (not kept) reads 0
                    assert stats.top.window_acts[f, slot, w] == pytest.approx(float(expected), rel=1e-3)
                else:
                    assert stats.top.window_tokens[f, slot, w] == -1


def test_reservoir_samples_firing_positions_uniformly(stream):
    """Every firing position of a feature is kept with the same probability S / fires."""
    S = 4
    counts, n = {}, 300
    for seed in range(n):
        stats = accumulate(stream, StatsSettings(quantile_bins=2, samples_per_bin=2, seed=seed))
        assert int(stats.reservoir.count()[0]) == S
        for ctx, pos, v in zip(stats.reservoir.context[0].tolist(), stats.reservoir.position[0].tolist(),
                               stats.reservoir.values[0].tolist()):
            z = stream[ctx // 2][0]
            assert z[ctx % 2, pos, 0].item() == pytest.approx(v) and v > 0
            counts[(ctx, pos)] = counts.get((ctx, pos), 0) + 1
    fires = int(stats.fires[0])
    assert len(counts) == fires  # every position was sampled at some point
    p = S / fires
    sd = math.sqrt(n * p * (1 - p))
    assert all(abs(c - n * p) < 5 * sd for c in counts.values()), (counts, n * p)


def test_quantile_samples_partition_the_reservoir_by_activation(stream):
    stats = accumulate(stream, StatsSettings(quantile_bins=3, samples_per_bin=2))
    for f in range(6):
        groups = stats.quantile_samples(f)
        assert sorted(s for g in groups for s in g) == list(range(int(stats.reservoir.count()[f])))
        values = [[stats.reservoir.values[f, s].item() for s in g] for g in groups]
        flat = [v for g in values for v in g]
        assert flat == sorted(flat)


def test_save_and_load_round_trip(stream, tmp_path):
    stats = accumulate(stream, StatsSettings(top_examples=3))
    stats.logits = {"top_ids": torch.arange(12).view(6, 2)}
    save_feature_stats(stats, tmp_path / "s.safetensors")
    back = load_feature_stats(tmp_path / "s.safetensors")
    assert back.settings == stats.settings and back.tokens == stats.tokens
    for name in ("fires", "act_sum", "act_max", "hist"):
        assert torch.equal(getattr(back, name), getattr(stats, name))
    assert torch.equal(back.top.values.nan_to_num(), stats.top.values.nan_to_num())
    assert torch.equal(back.top.window_tokens, stats.top.window_tokens)
    assert torch.equal(back.top.window_acts, stats.top.window_acts)
    assert torch.equal(back.logits["top_ids"], stats.logits["top_ids"])


def test_unwritable_cache_is_one_line(stream, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write feature statistics"):
        save_feature_stats(accumulate(stream, StatsSettings()), blocker / "s.safetensors")


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="top_examples"):
        StatsSettings(top_examples=0)


def test_model_pass_matches_the_sae_on_the_hook(tiny_llama):
    """Top examples name positions whose SAE latent, recomputed independently, is the
    recorded value; the token budget is exact; special tokens are never examples."""
    model, tok = tiny_llama
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(architecture="topk", num_latents=32, k=4), 64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 500, (6, 20), generator=g)
    ids[:, 0] = tok.bos_token_id
    batches = [ids[:4], ids[4:]]
    stats = compute_feature_stats(model, tok, sae, "layers.1", batches, StatsSettings(tokens=100, top_examples=3),
                                  progress=False)
    assert stats.tokens == 100
    acts = ActivationCapture(model, [resolve_hook(model, "layers.1")]).run(input_ids=ids)["layers.1"]
    z = sae.encode(acts.reshape(-1, 64)).view(6, 20, -1)
    special = special_token_ids(tok)
    counted = (~torch.isin(ids, special)).view(-1).cumsum(0).view(6, 20) <= 100
    for f in range(32):
        for slot in range(int(stats.top.count()[f])):
            c, p = stats.top.context[f, slot].item(), stats.top.position[f, slot].item()
            assert ids[c, p].item() not in special.tolist() and counted[c, p]
            assert stats.top.values[f, slot].item() == pytest.approx(z[c, p, f].item(), rel=1e-5)
    expected_fires = ((z > 0) & counted[..., None] & ~torch.isin(ids, special)[..., None]).sum((0, 1))
    assert torch.equal(stats.fires, expected_fires)
    record = feature_record(stats, int(stats.fires.argmax()), token_decoder(tok))
    first = record["top_examples"][0]
    assert first["acts"][first["centre"]] == pytest.approx(first["activation"], rel=1e-3)
    with pytest.raises(ConfigError, match="out of range; this SAE has features 0..31"):
        feature_record(stats, 32, token_decoder(tok))
    hist = density_histogram(stats)
    assert sum(hist["counts"]) + hist["never_fired"] == 32


def test_width_mismatch_is_one_line(tiny_llama):
    model, tok = tiny_llama
    sae = make_sae(SAEConfig(architecture="topk", num_latents=32, k=4), 48)
    with pytest.raises(ConfigError, match="width 48, but layers.1 of this model has width 64"):
        compute_feature_stats(model, tok, sae, "layers.1", [torch.randint(10, 500, (1, 8))], progress=False)
