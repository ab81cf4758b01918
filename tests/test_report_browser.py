"""sae.analysis.report in headless Chromium: the page runs without errors, the index sorts and pages,
cards open (by click and by #f=N), and untrusted text shows as text, never as markup.

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: chromium chromium-driver). Without
them it skips, unless SAE_REQUIRE_BROWSER=1 (CI), where it fails.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from browser import wait
from report_data import M, feature_showing, report_stats, script_text

from sae.analysis.report import build_report

EXAMPLES = 4


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """(file:// URL, stats, tokenizer, index JSON) of a report with every card."""
    stats, tok = report_stats()
    path = tmp_path_factory.mktemp("browser") / "report.html"
    build_report(
        stats,
        tok,
        path,
        title="browser test",
        sae_info={"SAE": "random"},
        examples=EXAMPLES,
        progress=False,
    )
    index = json.loads(script_text(path.read_text(encoding="utf-8"), "index"))
    return path.as_uri(), stats, tok, index


@pytest.fixture(scope="module")
def contrast_page(tmp_path_factory):
    """(file:// URL, effect values) of a report with contrast columns (effect and AUROC, as
    ``analyze.py report --target --baseline`` builds it, and a difference of means: with it
    the index is as wide as a real one's, with 6-digit ids and long tokens)."""
    stats, tok = report_stats()
    g = torch.Generator().manual_seed(1)
    effect = torch.randn(M, generator=g) * 2
    effect[3] = math.nan
    auroc = torch.rand(M, generator=g)
    path = tmp_path_factory.mktemp("contrast") / "report.html"
    build_report(
        stats,
        tok,
        path,
        title="contrast",
        sae_info={"SAE": "random"},
        examples=EXAMPLES,
        columns={"effect": effect, "AUROC": auroc, "diff of means": effect * 3.3},
        column_help={"effect": "Cohen's d", "AUROC": "AUROC of target vs baseline"},
        progress=False,
    )
    return path.as_uri(), effect


def load(driver, url: str) -> None:
    """A fresh load (about:blank first: a hash-only change would not reload the page)."""
    driver.get("about:blank")
    driver.get(url)
    wait(driver, lambda: rows(driver))


def rows(driver) -> list[int]:
    """Feature ids of the index rows on the current page."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#feature-index tbody tr')]"
        ".map(tr => Number(tr.dataset.f))"
    )


def open_card_tokens(driver, f: int) -> list[dict]:
    """Wait for card f to render; its token elements as {text, title, bg}."""
    wait(
        driver,
        lambda: driver.execute_script(
            "const card = document.querySelector('#card'), h = card.querySelector('h2');"
            f"return h && h.textContent === 'Feature {f}' && !card.textContent.includes('loading');"
        ),
    )
    return driver.execute_script(
        "return [...document.querySelectorAll('#card .tok')].map(t => "
        "({text: t.textContent, title: t.title, bg: t.style.backgroundColor}))"
    )


def test_page_loads_without_console_errors(driver, page):
    url, *_ = page
    load(driver, url)
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_index_lists_one_page_of_features(driver, page):
    url, *_ = page
    load(driver, url)
    assert rows(driver) == list(range(min(100, M)))
    assert driver.find_element("id", "page-info").text.startswith(f"page 1 of {-(-M // 100)}")


def test_clicking_a_row_opens_its_card(driver, page):
    url, stats, *_ = page
    load(driver, url)
    f = next(i for i in range(min(100, M)) if stats.fires[i] > 0)
    driver.find_element("css selector", f'#feature-index tbody tr[data-f="{f}"]').click()
    tokens = open_card_tokens(driver, f)
    assert tokens and all(float(t["title"]) >= 0 for t in tokens)  # every token says its activation
    assert any(t["bg"] for t in tokens)  # the firing ones are shaded
    assert driver.execute_script("return location.hash") == f"#f={f}"
    assert driver.find_elements("css selector", "#card .tok.ctr")  # the example token is outlined
    assert driver.find_elements("css selector", "#card svg rect")  # activation histogram


def test_hash_opens_a_card(driver, page):
    url, *_ = page
    load(driver, f"{url}#f={M - 1}")
    open_card_tokens(driver, M - 1)
    driver.execute_script("location.hash = 'f=7'")  # and a later change of the hash too
    open_card_tokens(driver, 7)


def test_sorting_changes_the_first_row(driver, page):
    url, _, _, index = page
    load(driver, url)
    density = index["data"]["density"]
    driver.find_element("css selector", '#feature-index th[data-key="density"]').click()
    densest = density.index(max(density))  # ties keep id order
    assert rows(driver)[0] == densest
    driver.find_element(
        "css selector", '#feature-index th[data-key="density"]'
    ).click()  # ascending
    assert density[rows(driver)[0]] == min(density)


def test_pagination_and_filter(driver, page):
    url, *_ = page
    load(driver, url)
    driver.find_element("id", "next").click()
    assert rows(driver)[0] == 100
    assert driver.find_element("id", "page-info").text.startswith("page 2 of")
    box = driver.find_element("id", "filter")
    box.send_keys("137")
    assert rows(driver)[0] == 137


def open_card_showing(driver, url, stats, tok, text) -> int:
    """Open the card of a feature whose top examples show ``text``; its id."""
    f = feature_showing(stats, tok, text, EXAMPLES)
    assert f >= 0, f"no feature's top examples show {text!r}; change the test texts"
    load(driver, f"{url}#f={f}")
    open_card_tokens(driver, f)
    return f


def test_untrusted_text_shows_as_text(driver, page):
    url, stats, tok, _ = page
    for payload in ("<script>", "onerror"):
        open_card_showing(driver, url, stats, tok, payload)
        examples = driver.execute_script(
            "return [...document.querySelectorAll('#card .ex')].map(e => "
            "[...e.querySelectorAll('.tok')].map(t => t.textContent).join(''))"
        )
        assert any(payload in e for e in examples)
        assert driver.execute_script("return window.__pwned") is None
        assert not driver.find_elements("css selector", "#card img, #card script")


def test_screenshot_is_not_blank(driver, page):
    from PIL import Image

    url, stats, *_ = page
    f = int(stats.fires.argmax())
    load(driver, f"{url}#f={f}")
    open_card_tokens(driver, f)
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    assert len(image.getcolors(maxcolors=1 << 20)) > 20


# Token texts as shown, with the page's visible-whitespace marks turned back into whitespace.
SHOWN_TEXTS = (
    "return [...document.querySelectorAll('#card .ex')].map(e => [...e.querySelectorAll('.tok')]"
    ".map(t => t.textContent.replace(/↵/g, '\\n').replace(/⇥/g, '\\t').replace(/␍/g, '\\r')))"
)


def test_example_tokens_read_as_the_decoded_text(driver, page):
    """Sub-word tokens sit flush ("TypedDict", not "Typ edDict"), and multi-byte characters
    split over tokens come out whole: each example reads exactly as tokenizer.decode."""
    url, stats, tok, _ = page
    for text in ("TypedDict", "日本語"):
        f = open_card_showing(driver, url, stats, tok, text)
        shown = driver.execute_script(SHOWN_TEXTS)[:EXAMPLES]
        windows = [
            [i for i in row if i >= 0] for row in stats.top.window_tokens[f, : len(shown)].tolist()
        ]
        assert ["".join(t) for t in shown] == [tok.decode(w) for w in windows]
        # No spacing between neighbours on a line: each token's glyphs start where the last's end.
        gaps = driver.execute_script(
            "const text = (t) => { const r = document.createRange(); r.selectNodeContents(t);"
            "  return r.getClientRects(); };"
            "const out = []; for (const e of document.querySelectorAll('#card .ex')) {"
            "  const r = [...e.querySelectorAll('.tok')].map(text).filter(x => x.length === 1)"
            "    .map(x => x[0]).filter(x => x.width > 0);"
            "  for (let i = 1; i < r.length; i++)"
            "    if (Math.abs(r[i].top - r[i - 1].top) < 1) out.push(r[i].left - r[i - 1].right);"
            "} return out;"
        )
        assert gaps and max(abs(g) for g in gaps) < 0.5, gaps


def test_contrast_index_starts_sorted_by_effect(driver, contrast_page):
    url, effect = contrast_page
    load(driver, url)
    expected = sorted(range(M), key=lambda f: (math.isnan(effect[f]), -float(effect[f]), f))
    assert rows(driver)[:10] == expected[:10]
    header = driver.find_element("css selector", "#feature-index th.sorted")
    assert header.text.startswith("effect")


@pytest.mark.parametrize("width", [1024, 1280])
def test_index_does_not_draw_over_the_card(driver, contrast_page, width):
    """No index cell shows inside the card's box: the visible part of each cell (its box
    clipped by every scrolling ancestor) stays clear of the card."""
    url, _ = contrast_page
    driver.set_window_size(width, 900)
    try:
        load(driver, f"{url}#f=1")
        open_card_tokens(driver, 1)
        assert abs(driver.execute_script("return window.innerWidth") - width) < 40
        overlaps = driver.execute_script("""
            const card = document.getElementById('card').getBoundingClientRect();
            const visible = (el) => {
              const r = el.getBoundingClientRect();
              let [l, rt, t, b] = [r.left, r.right, r.top, r.bottom];
              for (let a = el.parentElement; a; a = a.parentElement) {
                const s = getComputedStyle(a), q = a.getBoundingClientRect();
                if (s.overflowX !== 'visible') { l = Math.max(l, q.left); rt = Math.min(rt, q.right); }
                if (s.overflowY !== 'visible') { t = Math.max(t, q.top); b = Math.min(b, q.bottom); }
              }
              return [l, rt, t, b];
            };
            return [...document.querySelectorAll('#feature-index th, #feature-index td')].map(visible)
              .filter(([l, r, t, b]) => l < r && t < b && l < card.right && r > card.left
                                        && t < card.bottom && b > card.top).length;""")
        assert overlaps == 0
        # The effect and AUROC columns are still reachable: the index scrolls to them.
        assert driver.execute_script(
            "const h = document.querySelector('#feature-index th[data-key=\"c2\"]');"
            "h.scrollIntoView({block: 'nearest', inline: 'nearest'});"
            "const r = h.getBoundingClientRect(); return r.width > 0 && r.right <= window.innerWidth;"
        )
    finally:
        driver.set_window_size(1400, 1000)
