"""Feature statistics for the report tests: the demo model, a random TopK SAE, and a few
texts that include HTML/JS payloads (dataset text is untrusted)."""

from __future__ import annotations

import base64
import codecs
import functools
import gzip
import json
import re

import torch

PAYLOADS = [
    "<script>window.__pwned=1</script>",
    '<img src=x onerror="window.__pwned=1">',
    "</script><script>window.__pwned=1</script>",
    "fish &amp; chips &lt;b&gt;",
]
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "Lists are mutable sequences, typically used to store collections of items.",
    # sub-word tokens inside words, and characters of several bytes split over tokens
    "TypedDict mechanism: naïve café, 日本語のテキスト → ok",
    *PAYLOADS,
]
M = 512  # features of the random SAE


@functools.lru_cache(maxsize=1)
def report_stats():
    """(stats, tokenizer) computed once per test process: ~1k tokens through the demo model
    and a random 512-feature TopK SAE, with logit effects and nearest features filled."""
    from sae.analysis.feature_stats import StatsSettings, compute_feature_stats
    from sae.analysis.logit_effects import logit_effects, nearest_features
    from sae.config import ModelConfig, sae_config
    from sae.data.text import pack
    from sae.models.loading import load_model
    from sae.training.trainer import make_sae

    model, tok = load_model(ModelConfig())
    ids = tok(TEXTS * 6, add_special_tokens=False)["input_ids"]
    contexts = pack(ids, 48, tok.bos_token_id, tok.eos_token_id)
    torch.manual_seed(0)
    sae = make_sae(sae_config("topk", num_latents=M, k=8), model.config.hidden_size, "cpu")
    settings = StatsSettings(
        tokens=4096,
        top_examples=5,
        quantile_bins=3,
        samples_per_bin=2,
        context_before=8,
        context_after=3,
    )
    stats = compute_feature_stats(
        model, tok, sae, "layers.2", contexts.split(8), settings, progress=False
    )
    stats.logits, rule = logit_effects(model, sae.W_dec, n=5, progress=False)
    stats.info["logit_rule"] = rule
    stats.nearest = nearest_features(sae.W_dec, n=4, progress=False)
    return stats, tok


def feature_showing(stats, tok, text: str, examples: int) -> int:
    """The lowest feature whose top ``examples`` windows, decoded (as the page must show
    them), contain ``text``; -1 if none."""
    windows = stats.top.window_tokens[:, :examples].tolist()  # [M][S][W]
    for f, rows in enumerate(windows):
        if any(text in tok.decode([i for i in row if i >= 0]) for row in rows):
            return f
    return -1


def joined_tokens(strings: list[str], byte_map: dict[str, list[int]], toks: list[int]) -> list[str]:
    """Each token's text in an example as report.js's tokenTexts makes it: strings as they
    are, runs of byte tokens decoded together (incomplete characters as U+FFFD)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    out = []
    for t in toks:
        if str(t) in byte_map:
            out.append(decoder.decode(bytes(byte_map[str(t)])))
        else:
            out.append(decoder.decode(b"", final=True) + strings[t])
            decoder.reset()
    if out:
        out[-1] += decoder.decode(b"", final=True)
    return out


def script_text(html_text: str, element_id: str) -> str:
    """Contents of the <script type="application/json" id=...> element."""
    m = re.search(
        rf'<script type="application/json" id="{re.escape(element_id)}">(.*?)</script>',
        html_text,
        re.S,
    )
    assert m, f"no script element {element_id!r}"
    return m.group(1)


def decode_block(html_text: str, n: int) -> dict:
    """Card block n as the page's script sees it: JSON string -> base64 -> gzip -> JSON."""
    packed = json.loads(script_text(html_text, f"b-{n}"))
    return json.loads(gzip.decompress(base64.b64decode(packed)))
