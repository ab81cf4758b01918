"""The explorer page (``analyze.py serve``) in headless Chromium on the demo model: a prompt's
tokens light up, a feature card opens, edits give two continuations whose baseline is plain
generation's, stop ends a generation midway, an XSS payload shows as text, bad input shows
one clear line, the token is needed beyond localhost, and two tabs work at once."""

from __future__ import annotations

import itertools
import time

import pytest
from browser import card_loaded, wait
from explorer_server import call, served

from sae.models.generation import Sampling, continuations, prompt_token_ids
from sae.serve.app import make_app

PROMPT = "If the key is missing, a KeyError is"


@pytest.fixture(scope="module")
def url(explorer):
    with served(make_app(explorer)) as base:
        yield base


@pytest.fixture
def slow_model(explorer, monkeypatch):
    """Each decoding step takes 50 ms more, so a stop or a second tab comes mid-generation."""
    real = explorer._steps

    def slow(*args):
        more = itertools.repeat({"baseline": "x", "edited": "x", "kl": 0.0})
        for step in itertools.chain(real(*args), more):
            time.sleep(0.05)
            yield step

    monkeypatch.setattr(explorer, "_steps", slow)


def open_page(driver, url):
    driver.get("about:blank")
    driver.get(url)
    wait(driver, lambda: driver.execute_script("return document.body.dataset.ready === '1'"))


def js(driver, script, *args):
    return driver.execute_script(script, *args)


def set_prompt(driver, text):
    js(driver, "document.getElementById('prompt').value = arguments[0]", text)


def error_text(driver):
    return js(
        driver, "const e = document.getElementById('error'); return e.hidden ? '' : e.textContent"
    )


def token_texts(driver):
    return js(
        driver, "return [...document.querySelectorAll('#tokens .tok')].map(s => s.textContent)"
    )


def analyze(driver, text):
    set_prompt(driver, text)
    js(driver, "document.getElementById('tokens').replaceChildren()")
    driver.find_element("id", "analyze").click()


def add_edit(driver, feature, kind, value):
    driver.find_element("id", "add-edit").click()
    js(
        driver,
        """const row = [...document.querySelectorAll('#edits tr.edit')].pop();
           row.querySelector('.feature').value = arguments[0];
           row.querySelector('.kind').value = arguments[1];
           row.querySelector('.value').value = arguments[2];""",
        str(feature), kind, str(value),
    )  # fmt: skip


def generated(driver, side):
    return js(driver, f"return document.getElementById('{side}').textContent")


def test_prompt_lights_up_tokens_and_a_card_opens(driver, url, explorer):
    open_page(driver, url)
    analyze(driver, PROMPT)
    n = len(prompt_token_ids(explorer.tokenizer, PROMPT))
    wait(driver, lambda: len(token_texts(driver)) == n)
    shaded = js(
        driver,
        "return [...document.querySelectorAll('#tokens .tok')].filter(s => s.style.backgroundColor).length",
    )
    assert shaded == n - 1  # every token but BOS has an active feature
    driver.find_elements("css selector", "#tokens .tok")[-1].click()
    wait(driver, lambda: driver.find_elements("css selector", "#token-features button.feature"))
    button = driver.find_elements("css selector", "#token-features button.feature")[0]
    f = button.get_attribute("data-f")
    button.click()
    assert wait(driver, lambda: card_loaded(driver)) == f"Feature {f}"
    assert "Top examples" in driver.find_element("id", "card").text
    assert driver.find_elements("css selector", "#card .ex .tok.ctr")
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_edits_give_two_continuations_the_baseline_plain_generations(driver, url, explorer):
    open_page(driver, url)
    set_prompt(driver, PROMPT)
    add_edit(driver, 3, "ablate", 0)
    add_edit(driver, 5, "steer", 40)
    js(
        driver,
        "document.getElementById('seed').value = '3'; document.getElementById('max-new').value = '12'",
    )
    driver.find_element("id", "generate").click()
    wait(driver, lambda: "steps" in driver.find_element("id", "kl-note").text)
    assert error_text(driver) == ""
    sampling = Sampling(max_new_tokens=12, temperature=1.0, seed=3)
    (plain,) = continuations(explorer.model, explorer.tokenizer, [PROMPT], sampling=sampling)[0]
    assert generated(driver, "baseline") == plain
    assert generated(driver, "edited") != plain


def test_stop_ends_a_generation_midway(driver, url, slow_model):
    open_page(driver, url)
    set_prompt(driver, PROMPT)
    before = call(url + "/api/info")[1]["ended"].get("cancelled", 0)
    js(driver, "document.getElementById('max-new').value = '200'")
    driver.find_element("id", "generate").click()
    wait(driver, lambda: len(driver.find_elements("css selector", "#baseline .tok")) >= 3)
    driver.find_element("id", "stop").click()
    wait(driver, lambda: driver.find_element("id", "kl-note").text == "stopped")
    wait(driver, lambda: call(url + "/api/info")[1]["ended"].get("cancelled", 0) > before)
    shown = len(driver.find_elements("css selector", "#baseline .tok"))
    time.sleep(0.3)
    assert len(driver.find_elements("css selector", "#baseline .tok")) == shown < 200


def test_an_xss_payload_shows_as_text(driver, url):
    open_page(driver, url)
    payload = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
    analyze(driver, payload)
    wait(driver, lambda: len(token_texts(driver)) > 3)
    assert "<img" in "".join(token_texts(driver))
    assert js(driver, "return window.__xss === undefined && !document.querySelector('#tokens img')")


@pytest.mark.parametrize(
    "setup, words",
    [
        (lambda d: analyze(d, ""), "prompt: empty"),
        (lambda d: analyze(d, "word " * 3000), "max_position_embeddings"),
        (lambda d: (set_prompt(d, PROMPT), add_edit(d, 99999, "ablate", 0), d.find_element("id", "generate").click()), "feature 99999 is out of range"),
        (lambda d: (set_prompt(d, PROMPT), add_edit(d, 5, "steer", ""), d.find_element("id", "generate").click()), "steer value of feature 5: '' is not a number"),
    ],
    ids=["empty-prompt", "too-long", "feature-out-of-range", "non-numeric-slider"],
)  # fmt: skip
def test_bad_input_shows_one_clear_line(driver, url, setup, words):
    open_page(driver, url)
    setup(driver)
    wait(driver, lambda: error_text(driver))
    assert words in error_text(driver)


def test_beyond_localhost_the_page_needs_its_token(driver, explorer):
    with served(make_app(explorer, token="t0ken", loopback=False)) as base:
        driver.get("about:blank")
        driver.get(base + "/api/info")
        assert "needs its token" in driver.find_element("tag name", "body").text
        open_page(driver, base + "/?token=t0ken")  # the page sends it on with every request
        analyze(driver, PROMPT)
        wait(driver, lambda: len(token_texts(driver)) > 3)


def test_two_tabs_at_once(driver, url, slow_model):
    open_page(driver, url)
    first = driver.current_window_handle
    set_prompt(driver, PROMPT)
    js(driver, "document.getElementById('max-new').value = '200'")
    driver.find_element("id", "generate").click()
    wait(driver, lambda: len(driver.find_elements("css selector", "#baseline .tok")) >= 2)
    driver.switch_to.new_window("tab")
    try:
        open_page(driver, url)
        analyze(driver, "A second tab")
        wait(driver, lambda: len(token_texts(driver)) > 2)
        assert call(url + "/api/info")[1]["jobs"] == 1  # the first tab is still generating
    finally:
        driver.close()
        driver.switch_to.window(first)
    driver.find_element("id", "stop").click()
    wait(driver, lambda: driver.find_element("id", "kl-note").text == "stopped")


def test_search_results_open_cards(driver, url, explorer):
    open_page(driver, url)
    t = prompt_token_ids(explorer.tokenizer, PROMPT)[-1]
    js(
        driver,
        "document.getElementById('out-token').value = arguments[0]",
        explorer.tokenizer.decode([t]),
    )
    driver.find_element("id", "search-token").click()
    wait(driver, lambda: driver.find_elements("css selector", "#search-results button.feature"))
    first = driver.find_elements("css selector", "#search-results button.feature")[0]
    f = first.get_attribute("data-f")
    expected = call(url + "/api/search/token", {"token": explorer.tokenizer.decode([t])})[1]
    assert int(f) == expected["ranking"][0][0]
    first.click()
    assert wait(driver, lambda: card_loaded(driver)) == f"Feature {f}"
    set_prompt(driver, PROMPT)
    js(driver, "document.getElementById('focus').value = 'KeyError'")
    driver.find_element("id", "search-text").click()
    wait(
        driver, lambda: "activation on the text" in driver.find_element("id", "search-results").text
    )


def test_contrast_lists_come_from_uploaded_files(driver, url, explorer, tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text(
        '{"text": "If the key is missing,\\na KeyError is raised"}\n{"text": "no such key"}\n'
    )
    b = tmp_path / "b.txt"
    b.write_text("The list is sorted in place\nOpen the file for reading\nClose it\n")
    open_page(driver, url)
    driver.find_element("id", "file-a").send_keys(str(a))
    driver.find_element("id", "file-b").send_keys(str(b))
    wait(driver, lambda: js(driver, "return document.getElementById('file-b-note').textContent"))
    wait(driver, lambda: js(driver, "return document.getElementById('file-a-note').textContent"))
    assert js(driver, "return document.getElementById('file-a-note').textContent") == (
        "2 prompts from a.jsonl"
    )
    driver.find_element("id", "search-contrast").click()
    wait(driver, lambda: driver.find_elements("css selector", "#search-results button.feature"))
    shown = [
        int(b.get_attribute("data-f"))
        for b in driver.find_elements("css selector", "#search-results button.feature")
    ]
    lists = {
        "a": ["If the key is missing,\na KeyError is raised", "no such key"],  # one prompt, 2 lines
        "b": ["The list is sorted in place", "Open the file for reading", "Close it"],
    }
    status, want = call(url + "/api/search/contrast", {**lists, "top": 20})
    assert status == 200 and shown == [r[0] for r in want["ranking"]]
    assert not error_text(driver)


def test_first_card_shows_the_scan_progress_then_the_card(driver, fresh_explorer, held_scan):
    with served(make_app(fresh_explorer)) as base:
        open_page(driver, base)
        js(driver, "document.getElementById('out-token').value = 'Error'")
        driver.find_element("id", "search-token").click()
        wait(driver, lambda: driver.find_elements("css selector", "#search-results button.feature"))
        first = driver.find_elements("css selector", "#search-results button.feature")[0]
        f = first.get_attribute("data-f")
        first.click()
        progress = "const p = document.getElementById('scan-progress'); return p && p.value"
        assert wait(driver, lambda: js(driver, progress)) > 0  # held after its first batch
        assert card_loaded(driver) is None
        held_scan.release()
        assert wait(driver, lambda: card_loaded(driver)) == f"Feature {f}"
        assert not js(driver, "return document.getElementById('scan-progress')")
