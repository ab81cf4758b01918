"""sae.analysis.report without a browser: what the HTML file holds, and that untrusted text stays data."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from report_data import M, decode_block, feature_showing, joined_tokens, report_stats, script_text

from sae.analysis.report import (
    BLOCK,
    StringTable,
    build_report,
    round_sig,
    run_summary,
    script_json,
)
from sae.errors import ConfigError

EXAMPLES = 4
SVG_NAMESPACE = "http://www.w3.org/2000/svg"


@pytest.fixture(scope="module")
def stats_tok():
    return report_stats()


def effect() -> torch.Tensor:
    """A contrast-like column whose largest values are at scattered ids, not the first ones."""
    g = torch.Generator().manual_seed(3)
    values = torch.randn(M, generator=g)
    values[7] = math.nan
    return values


@pytest.fixture(scope="module")
def report(stats_tok, tmp_path_factory):
    """(info, html text) of a report with every card, an extra column and a run summary."""
    stats, tok = stats_tok
    path = (
        tmp_path_factory.mktemp("report") / "new" / "folder" / "report.html"
    )  # parents do not exist yet
    auroc = torch.linspace(0, 1, M)
    auroc[5] = math.nan
    summary = {
        "config_yaml": "model:\n  name: <b>demo</b>\n",
        "metrics": {"fvu": 0.25, "my_new<metric>": 3, "splice": {"kl": 0.125, "ce_clean": 2.5}},
        "curves": {"layers.2/fvu": [[10, 0.5], [20, 0.375]]},
    }
    info = build_report(
        stats,
        tok,
        path,
        title="demo <i>report</i>",
        sae_info={"SAE": "runs/x<y>", "k": 8},
        summary=summary,
        columns={"effect": effect(), "auroc": auroc},
        column_help={"auroc": "area under the ROC"},
        examples=EXAMPLES,
        progress=False,
    )
    return info, path.read_text(encoding="utf-8")


def test_report_is_written_with_its_counts(report, stats_tok):
    info, text = report
    stats, _ = stats_tok
    assert info.path.is_file() and info.bytes == info.path.stat().st_size == len(text.encode())
    assert (info.features, info.cards) == (M, M)
    assert [p.name for p in info.path.parent.iterdir()] == ["report.html"]  # no temp file left


def test_no_external_resources(report):
    _, text = report
    # The only URL is the SVG namespace name the script passes to createElementNS.
    assert set(re.findall(r"https?://[^\s\"'<>)]*", text)) <= {SVG_NAMESPACE}
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(//|https?:)""", text, re.I)
    assert "url(" not in text and "@import" not in text
    assert "fetch(" not in text and "XMLHttpRequest" not in text


def test_untrusted_text_never_becomes_markup(report):
    _, text = report
    assert "<script>window.__pwned" not in text
    assert "<img" not in text and 'onerror="window' not in text
    # Exactly the script elements the builder wrote: no data closed one or opened another.
    blocks = len(re.findall(r'<script type="application/json" id="b-\d+">', text))
    assert text.count("<script") == text.count("</script>") == 3 + blocks + 1
    assert "demo &lt;i&gt;report&lt;/i&gt;" in text and "runs/x&lt;y&gt;" in text
    assert "name: &lt;b&gt;demo&lt;/b&gt;" in text
    assert "my new&lt;metric&gt;" in text and "my_new<metric>" not in text


def test_run_summary_metrics_have_human_labels(report):
    _, text = report
    summary = text[text.index('<section id="summary">') : text.index('<section id="density">')]
    rows = {
        label: key for key, label in re.findall(r'<th(?: title="([^"]*)")?>([^<]*)</th>', summary)
    }
    assert rows["CE loss, clean model"] == "splice.ce_clean"  # the raw key is only the tooltip
    assert rows["FVU (fraction of variance unexplained)"] == "fvu"
    assert rows["KL (clean || SAE spliced in), per token"] == "splice.kl"
    assert (
        rows["my new&lt;metric&gt;"] == "my_new&lt;metric&gt;"
    )  # unknown: readable, still escaped
    assert not any("splice." in label or "_" in label for label in rows)
    assert ">layers.2 / FVU (fraction of variance unexplained)</figcaption>" in summary


def test_index_json(report, stats_tok):
    _, text = report
    stats, tok = stats_tok
    index = json.loads(script_text(text, "index"))
    strings = json.loads(script_text(text, "strings"))
    assert index["M"] == M and index["block"] == BLOCK and index["cards"] is None
    data = index["data"]
    assert all(len(v) == M for v in data.values())
    assert data["density"] == round_sig(stats.density, 3).tolist()
    assert data["max"] == round_sig(stats.act_max, 3).tolist()
    f = int(stats.fires.argmax())  # fires most: its top examples exist
    centre = stats.top.window_tokens[f, :, stats.settings.context_before].tolist()
    assert strings[data["top"][f]] == tok.decode([max(set(centre), key=centre.count)])
    assert data["top"][int(stats.fires.argmin())] is None or stats.fires.min() > 0


def test_extra_columns_appear(report):
    _, text = report
    index = json.loads(script_text(text, "index"))
    col = next(c for c in index["columns"] if c["label"] == "auroc")
    assert col["help"] == "area under the ROC"
    values = index["data"][col["key"]]
    assert values[5] is None  # NaN is not JSON
    assert values[M - 1] == 1.0 and values[0] == 0.0


def test_contrast_columns_sort_the_index_by_effect(report, stats_tok, tmp_path):
    _, text = report
    index = json.loads(script_text(text, "index"))
    key = next(c["key"] for c in index["columns"] if c["label"] == "effect")
    assert index["sort"] == {"key": key, "desc": True}
    stats, tok = stats_tok
    plain = build_report(
        stats, tok, tmp_path / "r.html", title="t", sae_info={}, cards=[], progress=False
    )
    plain_index = json.loads(script_text(plain.path.read_text(encoding="utf-8"), "index"))
    assert plain_index["sort"] == {"key": "id", "desc": False}
    with pytest.raises(ConfigError, match="sort_by"):
        build_report(
            stats,
            tok,
            tmp_path / "r2.html",
            title="t",
            sae_info={},
            columns={"effect": effect()},
            sort_by="nope",
            cards=[],
            progress=False,
        )


def test_blocks_hold_the_card_data(report, stats_tok):
    _, text = report
    stats, tok = stats_tok
    strings = json.loads(script_text(text, "strings"))
    byte_map = json.loads(script_text(text, "bytes"))
    assert byte_map, "no token holds part of a character; the multi-byte test text is missing"
    W = stats.settings.window
    for n in range(M // BLOCK):
        block = decode_block(text, n)
        assert sorted(map(int, block)) == list(range(n * BLOCK, (n + 1) * BLOCK))
        for f in range(n * BLOCK, (n + 1) * BLOCK):
            card = block[str(f)]
            count = min(EXAMPLES, int((stats.top.context[f] >= 0).sum()))
            assert [ex[0] for ex in card["ex"]] == round_sig(
                stats.top.values[f, :count], 3
            ).tolist()
            for i, (value, centre, toks, acts) in enumerate(card["ex"]):
                ids = stats.top.window_tokens[f, i]
                assert len(toks) == len(acts) == int((ids >= 0).sum()) <= W
                # The centre token is the example itself (window activations are kept in fp16).
                assert acts[centre] == pytest.approx(value, rel=1.1e-2)
                # The page's token texts join to exactly the decoded window: no gaps, none lost.
                assert "".join(joined_tokens(strings, byte_map, toks)) == tok.decode(
                    ids[ids >= 0].tolist()
                )
            assert [len(q) for q in card["q"]] == [len(g) for g in stats.quantile_samples(f)]
            first, counts = card["h"]
            assert sum(counts) == stats.hist[f].sum() and (
                not counts or counts[0] == stats.hist[f, first]
            )
            assert [g for g, _ in card["nn"]] == stats.nearest["ids"][f].tolist()
            assert [strings[t] for t, _ in card["lt"]] == [
                tok.decode([t]) for t in stats.logits["top_ids"][f].tolist()
            ]
            assert [v for _, v in card["lb"]] == round_sig(
                stats.logits["bottom_values"][f], 3
            ).tolist()


def test_payload_text_survives_as_data(report, stats_tok):
    """The payloads are in the data, as text the page shows, while the HTML holds no markup of them."""
    _, text = report
    stats, tok = stats_tok
    strings = json.loads(script_text(text, "strings"))
    f = feature_showing(stats, tok, "<script>", EXAMPLES)
    assert f >= 0, "no feature's top examples show the payload; change the test texts"
    shown = [
        "".join(strings[t] for t in ex[2]) for ex in decode_block(text, f // BLOCK)[str(f)]["ex"]
    ]
    assert any("<script>" in s for s in shown)


def test_cards_subset(stats_tok, tmp_path):
    stats, tok = stats_tok
    info = build_report(
        stats,
        tok,
        tmp_path / "r.html",
        title="t",
        sae_info={},
        cards=[300, 3, 300],
        examples=2,
        progress=False,
    )
    text = info.path.read_text(encoding="utf-8")
    assert (info.features, info.cards) == (M, 2)
    index = json.loads(script_text(text, "index"))
    assert index["cards"] == [3, 300] and len(index["data"]["density"]) == M
    assert sorted(decode_block(text, 0)) == ["3"] and sorted(decode_block(text, 1)) == ["300"]
    assert all(len(ex) <= 2 for ex in (decode_block(text, 0)["3"]["ex"],))
    with pytest.raises(ConfigError, match="out of range"):
        build_report(
            stats, tok, tmp_path / "r2.html", title="t", sae_info={}, cards=[M], progress=False
        )


def test_fewer_quantile_samples_are_spread_over_each_bin(stats_tok, tmp_path):
    stats, tok = stats_tok
    info = build_report(
        stats,
        tok,
        tmp_path / "r.html",
        title="t",
        sae_info={},
        cards=[3],
        samples_per_bin=2,
        progress=False,
    )
    card = decode_block(info.path.read_text(encoding="utf-8"), 0)["3"]
    for shown, group in zip(card["q"], stats.quantile_samples(3)):
        values = [stats.reservoir.values[3, s].item() for s in group]
        assert len(shown) == min(2, len(group))
        if len(group) >= 2:  # the bin's lowest and highest sample: its whole range stays visible
            assert [ex[0] for ex in shown] == round_sig(
                torch.tensor([values[0], values[-1]]), 3
            ).tolist()


def test_without_logits_nearest_or_summary(stats_tok, tmp_path):
    stats, tok = stats_tok
    bare = type(stats)(**{**stats.__dict__, "logits": {}, "nearest": {}})
    info = build_report(
        bare, tok, tmp_path / "r.html", title="t", sae_info={}, cards=[0], progress=False
    )
    text = info.path.read_text(encoding="utf-8")
    assert 'id="summary"' not in text
    assert set(decode_block(text, 0)["0"]) == {"ex", "q", "h"}


def test_unwritable_output_is_a_one_line_config_error(stats_tok, tmp_path):
    stats, tok = stats_tok
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for path, reason in (
        (blocker / "report.html", "Not a directory"),
        (tmp_path, "Is a directory"),
    ):
        with pytest.raises(ConfigError) as e:
            build_report(stats, tok, path, title="t", sae_info={}, cards=[], progress=False)
        assert str(e.value) == f"--output: cannot write {str(path)!r}: {reason}"


def test_script_json_cannot_close_its_element():
    text = script_json({"a": "</script><!-- & -->"})
    assert not set("<>&") & set(text)
    assert json.loads(text) == {"a": "</script><!-- & -->"}


def test_round_sig_prints_short():
    x = torch.tensor([0.73449, 123456.0, 0.000123456, -2.5e-7, 0.0, math.nan, 1.0 / 3])
    assert (
        json.dumps(round_sig(x, 3).tolist())
        == "[0.734, 123000.0, 0.000123, -2.5e-07, 0.0, NaN, 0.333]"
    )


def test_run_summary(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    (run / "layers.2").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name: demo\n")
    (run / "layers.2" / "metrics.json").write_text(json.dumps({"fvu": 0.5}))
    writer = SummaryWriter(str(run / "tensorboard"))
    for step in (1, 2, 3):
        writer.add_scalar("layers.2/fvu", 1.0 / step, step)
        writer.add_scalar("tokens_per_s", 100.0 * step, step)
    writer.close()
    summary = run_summary(run / "layers.2", run / "config.yaml")
    assert summary["config_yaml"] == "model:\n  name: demo\n" and summary["metrics"] == {"fvu": 0.5}
    assert summary["curves"]["layers.2/fvu"] == [[1, 1.0], [2, 0.5], [3, pytest.approx(1 / 3)]]
    assert [p[1] for p in summary["curves"]["tokens_per_s"]] == [100.0, 200.0, 300.0]
    json.dumps(summary)  # JSON-able


def test_run_summary_of_a_bare_folder(tmp_path):
    assert run_summary(tmp_path, None) == {"config_yaml": None, "metrics": None, "curves": {}}
    (tmp_path / "config.yaml").write_text("a: 1\n")
    assert run_summary(tmp_path, tmp_path / "config.yaml")["curves"] == {}


def test_token_strings_keep_sentencepiece_spaces_and_split_characters():
    """A SentencePiece-style tokenizer (Metaspace, byte fallback), where decoding a token
    alone drops its leading space: the strings still join to the decoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        "<unk>": 0,
        "\u2581the": 1,
        "\u2581cat": 2,
        "s": 3,
        "\u2581sat": 4,
        "\u2581a": 5,
        "<0xE6>": 6,
        "<0x97>": 7,
        "<0xA5>": 8,
        "\u2581": 9,
    }
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    ids = [1, 2, 3, 4, 9, 6, 7, 8]  # "the cats sat 日", the last character in byte tokens
    table = StringTable(tok)
    table.add(torch.tensor(ids))
    toks = table.lookup(torch.tensor(ids)).tolist()
    texts = joined_tokens(table.strings, {str(k): v for k, v in table.bytes.items()}, toks)
    assert texts[:4] == [" the", " cat", "s", " sat"]  # alone, "\u2581cat" decodes to "cat"
    # The decoder strips the text's first space; everything after the first token matches.
    assert "".join(texts) == " " + tok.decode(ids) == " the cats sat \u65e5"


def test_token_strings_join_multibyte_characters(stats_tok):
    _, tok = stats_tok
    for text in ("naïve café, 日本語のテキスト → ok", "Typ edDict mechanism", "\u00e9\u00e9"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for window in (ids, ids[1:], ids[:-1]):  # a window may cut a character
            table = StringTable(tok)
            table.add(torch.tensor(window))
            toks = table.lookup(torch.tensor(window)).tolist()
            byte_map = {str(k): v for k, v in table.bytes.items()}
            assert "".join(joined_tokens(table.strings, byte_map, toks)) == tok.decode(window)
