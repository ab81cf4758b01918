"""Feature statistics against brute force on known latents, and on a real model pass."""

import math

import pytest
import torch

from sae.activations.capture import special_token_ids
from sae.activations.hooks import ActivationCapture, resolve_hook
from sae.analysis.feature_stats import (
    HIST_BINS,
    HIST_BINS_PER_OCTAVE,
    HIST_LOG2_MIN,
    StatsAccumulator,
    StatsSettings,
    compute_feature_stats,
    density_histogram,
    feature_record,
    load_feature_stats,
    save_feature_stats,
    token_decoder,
)
from sae.config import sae_config
from sae.errors import ConfigError
from sae.training.trainer import make_sae


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
    z = torch.cat(
        [torch.where(k[..., None], z, 0.0).reshape(-1, z.shape[-1]) for z, _, k in stream]
    )
    assert stats.tokens == sum(int(k.sum()) for _, _, k in stream) and stats.contexts == 8
    assert torch.equal(stats.fires, (z > 0).sum(0))
    torch.testing.assert_close(stats.act_sum, z.double().sum(0))
    assert torch.equal(stats.act_max, z.max(0).values)
    for f in range(z.shape[1]):
        vals = z[:, f][z[:, f] > 0]
        bins = (
            ((torch.log2(vals) - HIST_LOG2_MIN) * HIST_BINS_PER_OCTAVE)
            .floor()
            .long()
            .clamp(0, HIST_BINS - 1)
        )
        assert torch.equal(stats.hist[f], torch.bincount(bins, minlength=HIST_BINS))


def test_top_examples_are_the_largest_with_their_windows(stream):
    s = StatsSettings(top_examples=4, context_before=3, context_after=2)
    stats = accumulate(stream, s)
    T = 16
    for f in range(6):
        entries = []  # (value, context index, position) of every kept firing
        for c, (z, _ids, keep) in enumerate(stream):
            for b in range(2):
                for t in range(T):
                    if keep[b, t] and z[b, t, f] > 0:
                        entries.append((z[b, t, f].item(), 2 * c + b, t))
        entries.sort(reverse=True)
        assert stats.top.values[f].tolist() == pytest.approx([v for v, _, _ in entries[:4]])
        for slot, (_value, ctx, pos) in enumerate(entries[:4]):
            assert (stats.top.context[f, slot].item(), stats.top.position[f, slot].item()) == (
                ctx,
                pos,
            )
            z, ids, _ = stream[ctx // 2]
            for w, offset in enumerate(range(-3, 3)):
                t = pos + offset
                if 0 <= t < T:
                    assert stats.top.window_tokens[f, slot, w] == ids[ctx % 2, t]
                    expected = z[ctx % 2, t, f] if t != 0 else 0.0  # BOS (not kept) reads 0
                    assert stats.top.window_acts[f, slot, w] == pytest.approx(
                        float(expected), rel=1e-3
                    )
                else:
                    assert stats.top.window_tokens[f, slot, w] == -1


def test_reservoir_samples_firing_positions_uniformly(stream):
    """Every firing position of a feature is kept with the same probability S / fires."""
    S = 4
    counts, n = {}, 300
    for seed in range(n):
        stats = accumulate(stream, StatsSettings(quantile_bins=2, samples_per_bin=2, seed=seed))
        assert int(stats.reservoir.count()[0]) == S
        for ctx, pos, v in zip(
            stats.reservoir.context[0].tolist(),
            stats.reservoir.position[0].tolist(),
            stats.reservoir.values[0].tolist(),
        ):
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
    sae = make_sae(sae_config("topk", num_latents=32, k=4), 64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 500, (6, 20), generator=g)
    ids[:, 0] = tok.bos_token_id
    batches = [ids[:4], ids[4:]]
    stats = compute_feature_stats(
        model,
        tok,
        sae,
        "layers.1",
        batches,
        StatsSettings(tokens=100, top_examples=3),
        progress=False,
    )
    assert stats.tokens == 100
    acts = ActivationCapture(model, [resolve_hook(model, "layers.1")]).run(input_ids=ids)[
        "layers.1"
    ]
    z = sae.encode(acts.reshape(-1, 64)).view(6, 20, -1)
    special = special_token_ids(tok)
    counted = (~torch.isin(ids, special)).view(-1).cumsum(0).view(6, 20) <= 100
    for f in range(32):
        for slot in range(int(stats.top.count()[f])):
            c, p = stats.top.context[f, slot].item(), stats.top.position[f, slot].item()
            assert ids[c, p].item() not in special.tolist() and counted[c, p]
            assert stats.top.values[f, slot].item() == pytest.approx(z[c, p, f].item(), rel=1e-5)
    expected_fires = ((z > 0) & counted[..., None] & ~torch.isin(ids, special)[..., None]).sum(
        (0, 1)
    )
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
    sae = make_sae(sae_config("topk", num_latents=32, k=4), 48)
    with pytest.raises(ConfigError, match="width 48, but layers.1 of this model has width 64"):
        compute_feature_stats(
            model, tok, sae, "layers.1", [torch.randint(10, 500, (1, 8))], progress=False
        )


def test_progress_bar_ends_at_what_was_scanned_when_the_data_runs_out(tiny_llama, monkeypatch):
    """Asked for more tokens than the contexts hold, the bar's total becomes the tokens
    scanned (it ends at 100%) and the result says the data ran out; otherwise the bar
    keeps the asked-for total and the data did not run out."""
    from sae.analysis import feature_stats

    bars = []

    class Recording(feature_stats.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(feature_stats, "tqdm", Recording)
    model, tok = tiny_llama
    torch.manual_seed(0)
    sae = make_sae(sae_config("topk", num_latents=32, k=4), 64)
    ids = torch.randint(10, 500, (6, 20), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = tok.bos_token_id
    short = compute_feature_stats(
        model, tok, sae, "layers.1", [ids[:4], ids[4:]], StatsSettings(tokens=1000)
    )
    assert short.tokens == 6 * 19 and short.info["data_ran_out"] is True
    assert bars[-1].total == bars[-1].n == short.tokens
    enough = compute_feature_stats(
        model, tok, sae, "layers.1", [ids[:4], ids[4:]], StatsSettings(tokens=50)
    )
    assert enough.tokens == 50 and enough.info["data_ran_out"] is False
    assert bars[-1].total == bars[-1].n == 50


@pytest.fixture()
def small_data_target(tiny_llama, tmp_path):
    """An SAE on the tiny Llama whose data is a local text file of a few hundred tokens."""
    from sae.analysis.target import open_target

    model, tok = tiny_llama
    torch.manual_seed(0)
    folder = tmp_path / "sae" / "layers.1"
    make_sae(sae_config("topk", num_latents=32, k=4), 64).save(
        folder, metadata={"hook_name": "layers.1", "model_name": "tiny"}
    )
    text = tmp_path / "corpus.txt"
    text.write_text(
        "".join(
            f"line {i}: the file was not found, so a KeyError is raised here\n" for i in range(30)
        )
    )
    return open_target(
        folder, [f"data.dataset={text}", "data.context_tokens=32"], model=model, tokenizer=tok
    )


def test_a_scan_of_the_whole_data_serves_larger_requests(small_data_target, monkeypatch):
    """A scan that ran out of data is reused for any request of at least as many tokens
    (a new scan would find the same tokens); a smaller request or other settings rescan."""
    from sae.analysis import target as analysis_target
    from sae.analysis.target import cached_feature_stats

    logs = []
    first = cached_feature_stats(
        small_data_target,
        StatsSettings(tokens=100_000, top_examples=3),
        progress=False,
        log=logs.append,
    )
    assert 0 < first.tokens < 100_000 and first.info["exhausted"] is True
    assert f"the data ran out after {first.tokens:,} tokens (asked for 100,000)" in logs[-1]
    calls = []
    real = analysis_target.feature_stats_steps
    monkeypatch.setattr(
        analysis_target, "feature_stats_steps", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    for tokens in (100_000, 10**9, first.tokens):
        again = cached_feature_stats(
            small_data_target,
            StatsSettings(tokens=tokens, top_examples=3),
            progress=False,
            log=logs.append,
        )
        assert "(cached)" in logs[-1] and not calls
        assert again.tokens == first.tokens and torch.equal(again.fires, first.fires)
    fewer = cached_feature_stats(
        small_data_target,
        StatsSettings(tokens=first.tokens - 1, top_examples=3),
        progress=False,
        log=logs.append,
    )
    assert len(calls) == 1 and fewer.tokens == first.tokens - 1 and not fewer.info["data_ran_out"]
    other = cached_feature_stats(
        small_data_target,
        StatsSettings(tokens=10**9, top_examples=4),
        progress=False,
        log=logs.append,
    )
    assert len(calls) == 2 and other.tokens == first.tokens
    # The same result as a fresh scan of a larger request would give.
    fresh = cached_feature_stats(
        small_data_target,
        StatsSettings(tokens=10**9, top_examples=3),
        recompute=True,
        progress=False,
        log=logs.append,
    )
    assert torch.equal(fresh.fires, first.fires) and torch.equal(
        fresh.top.window_tokens, first.top.window_tokens
    )


def test_top_tokens_come_from_any_cached_scan(small_data_target, monkeypatch):
    """feature_top_tokens reads the cached scan's top examples (the tokens they centre on,
    each once, most activating first) without scanning; with no cache it scans once."""
    from sae.analysis import target as analysis_target
    from sae.analysis.feature_stats import top_tokens
    from sae.analysis.target import cached_feature_stats, feature_top_tokens

    tok = small_data_target.tokenizer
    logs = []
    made = feature_top_tokens(
        small_data_target, range(32), tokens=300, progress=False, log=logs.append
    )
    assert "scanning up to 300 tokens" in "\n".join(logs)
    stats = cached_feature_stats(
        small_data_target, StatsSettings(tokens=300), progress=False, log=logs.append
    )
    fired = [f for f in range(32) if stats.fires[f] > 0]
    assert fired and all(made[f] for f in fired)
    monkeypatch.setattr(
        analysis_target, "feature_stats_steps", lambda *a, **k: pytest.fail("rescanned")
    )
    got = feature_top_tokens(
        small_data_target, fired, tokens=10**6, progress=False, log=logs.append
    )
    assert "(cached)" in logs[-1]
    before = stats.settings.context_before
    for f in fired:
        centres = [
            tok.decode([i])
            for i in stats.top.window_tokens[f, : int(stats.top.count()[f]), before].tolist()
        ]
        assert (
            got[f]
            == made[f]
            == top_tokens(stats, f, token_decoder(tok))
            == list(dict.fromkeys(centres))[:3]
        )
        assert got[f][0] == tok.decode([int(stats.top.window_tokens[f, 0, before])])
