"""The explorer's API (sae.serve), served for real on the demo model: each endpoint against
an independent computation (the model's own hidden states, plain `generate`, the CLI reading
the export back), bad input as one clear line, the token and host checks, stop, and a
second tab served while a generation runs."""

from __future__ import annotations

import itertools
import json
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from explorer_server import call, ndjson, read_card, served

from sae import cli
from sae.interventions.edits import Ablate, Clamp, Scale, Steer, read_edits_file
from sae.models.generation import prompt_token_ids
from sae.serve.app import MAX_BODY_BYTES, make_app

PROMPT = "If the key is missing, a KeyError is"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def url(explorer):
    with served(make_app(explorer)) as base:
        yield base


def test_info_names_the_model_and_its_sae(url, explorer):
    status, info = call(url + "/api/info")
    assert status == 200
    (sae,) = info["saes"]
    assert sae["hook"] == "layers.2" and sae["features"] == explorer.targets[0].sae.cfg.num_latents


def test_prompt_features_are_the_sae_code_of_the_models_hidden_state(url, explorer):
    status, got = call(url + "/api/features", {"prompt": PROMPT, "top": 3})
    assert status == 200, got
    target = explorer.targets[0]
    ids = prompt_token_ids(target.tokenizer, PROMPT)
    with torch.no_grad():  # layers.2's output is hidden state 3 (0 is the embeddings)
        h = target.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[3][0]
        z = target.sae.encode(h)
    assert "".join(got["tokens"][1:]) == target.tokenizer.decode(ids[1:])
    assert got["special"] == [True] + [False] * (len(ids) - 1)
    rows = got["saes"][0]["top"]
    assert rows[0] == []  # BOS: the SAE never saw it
    for i in range(1, len(ids)):
        vals, feats = z[i].topk(3)
        want = [f for f, v in zip(feats.tolist(), vals.tolist()) if v > 0]
        assert [f for f, _ in rows[i]] == want
        torch.testing.assert_close(
            torch.tensor([v for _, v in rows[i]]), vals[: len(want)], rtol=2e-3, atol=1e-4
        )


def test_card_shows_the_features_strongest_examples(url, explorer):
    _, got = call(url + "/api/features", {"prompt": PROMPT})
    f = got["saes"][0]["top"][-1][0][0]  # the last token's strongest feature
    status, card = read_card(url, 0, f)
    assert status == 200, card
    stats = explorer.stats(0)
    top = card["card"]["ex"]
    assert top and top[0][0] == pytest.approx(float(stats.act_max[f]), rel=1e-2)
    assert [ex[0] for ex in top] == sorted((ex[0] for ex in top), reverse=True)
    v, centre, strings, acts = top[0]
    assert acts[centre] == v and all(0 <= s < len(card["strings"]) for s in strings)
    assert card["stats"]["density"] == pytest.approx(float(stats.density[f]))


def test_search_by_text_is_the_largest_code_over_the_focus_tokens(url, explorer):
    status, got = call(url + "/api/search/text", {"prompt": PROMPT, "focus": "KeyError", "top": 5})
    assert status == 200, got
    target = explorer.targets[0]
    ids = prompt_token_ids(target.tokenizer, PROMPT)
    with torch.no_grad():
        h = target.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[3][0]
        z = target.sae.encode(h)
    pieces = [target.tokenizer.decode([i]) for i in ids]
    focus = [i for i, p in enumerate(pieces) if p.strip() and p.strip() in "KeyError"][-2:]
    assert got["focus"] == focus  # the tokens of "KeyError"
    vals, feats = z[focus].max(0).values.topk(5)
    assert [f for f, _ in got["ranking"]] == feats.tolist()


def test_search_by_output_token_is_the_decoder_rows_logit_effect(url, explorer):
    model, target = explorer.model, explorer.targets[0]
    t = prompt_token_ids(target.tokenizer, PROMPT)[-1]
    text = target.tokenizer.decode([t])
    assert target.tokenizer.encode(text, add_special_tokens=False) == [t]  # one token
    status, got = call(url + "/api/search/token", {"token": text, "top": 5})
    assert status == 200, got
    with torch.no_grad():  # RMSNorm: its gain, then the unembedding row of the token
        effect = (target.sae.W_dec * model.model.norm.weight) @ model.lm_head.weight[t]
    vals, feats = effect.topk(5)
    assert got["token_id"] == t and [f for f, _ in got["ranking"]] == feats.tolist()
    torch.testing.assert_close(
        torch.tensor([v for _, v in got["ranking"]]), vals, atol=1e-3, rtol=1e-3
    )


def test_search_by_contrast_ranks_by_effect(url, explorer):
    from sae.analysis.feature_search import contrast_search

    a = ["If the key is missing, a KeyError is raised", "a KeyError means no such key"]
    b = ["The list is sorted in place", "Open the file for reading"]
    status, got = call(url + "/api/search/contrast", {"a": "\n".join(a), "b": b, "top": 5})
    assert status == 200, got
    want = contrast_search(explorer.targets[0], a, b, progress=False)
    assert [r[0] for r in got["ranking"]] == want.ranking("effect")[:5]
    effects = [r[1] for r in got["ranking"]]
    assert effects == sorted(effects, reverse=True) and got["ranking"][0][3] > got["ranking"][0][4]


def test_uploaded_prompt_files_read_as_the_cli_reads_them(url, tmp_path):
    from sae.analysis.feature_search import read_prompts

    files = {
        "a.jsonl": ('{"text": "If the key is missing,\\nKeyError"}\n\n{"text": "no such key"}\n'),
        "b.txt": "  The list is sorted  \n\nOpen the file\n",
    }
    want = {
        "a.jsonl": ["If the key is missing,\nKeyError", "no such key"],
        "b.txt": ["The list is sorted", "Open the file"],
    }
    for name, text in files.items():
        status, got = call(url + "/api/prompts", {"name": name, "text": text})
        assert status == 200, got
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert got["prompts"] == want[name] == read_prompts(tmp_path / name)


def test_first_card_scans_step_by_step_while_the_model_serves_others(
    fresh_explorer, held_scan, tmp_path
):
    from conftest import EXPLORER_STATS_TOKENS

    from sae.analysis.target import cached_feature_stats

    with served(make_app(fresh_explorer)) as base:
        status, got = call(base + "/api/card?sae=0&feature=3")
        assert status == 202 and got["scanning"]["total"] == EXPLORER_STATS_TOKENS
        while got["scanning"]["scanned"] == 0:  # until the first batch is in; then it holds
            status, got = call(base + "/api/card?sae=0&feature=3")
            assert status == 202, got
        assert 0 < got["scanning"]["scanned"] < EXPLORER_STATS_TOKENS
        status, found = call(base + "/api/features", {"prompt": PROMPT})
        assert status == 200 and not fresh_explorer.has_stats(0)  # answered mid-scan
        held_scan.release()
        status, card = read_card(base, 0, 3)
        assert status == 200 and card["stats"]["tokens"] == EXPLORER_STATS_TOKENS
        assert call(base + "/api/info")[1]["jobs"] == 0
    # In steps or in one go, the same statistics.
    target, settings = fresh_explorer.targets[0], fresh_explorer.settings
    whole = cached_feature_stats(target, settings, tmp_path / "whole", progress=False, log=print)
    stepped = fresh_explorer.stats(0)
    assert torch.equal(stepped.fires, whole.fires)
    torch.testing.assert_close(stepped.act_max, whole.act_max)
    torch.testing.assert_close(stepped.top.values, whole.top.values, equal_nan=True)
    assert not stepped.act_max.requires_grad


def test_a_failed_scan_is_shown_once_then_tried_again(fresh_explorer, held_scan):
    from sae.errors import DataError

    with served(make_app(fresh_explorer)) as base:
        assert call(base + "/api/card?sae=0&feature=3")[0] == 202
        held_scan.release(DataError("data: cannot reach dataset 'gone'\nsecond line"))
        status, got = read_card(base, 0, 3)
        assert status == 400
        assert got["error"] == "feature statistics of SAE 0: data: cannot reach dataset 'gone'"
        held_scan.fail = None  # the dataset is back
        status, got = read_card(base, 0, 3)
        assert status == 200 and got["feature"] == 3


def test_saelens_and_sparsify_copies_serve_as_the_original(demo_sae_run, tmp_path):
    from sae.analysis.feature_stats import StatsSettings
    from sae.formats import convert
    from sae.serve.explorer import Explorer

    ours = demo_sae_run / "layers.2"
    saelens = convert(ours, tmp_path / "sl", "saelens", log=lambda line: None)["."]
    sparsify = convert(ours, tmp_path / "sp", "sparsify", log=lambda line: None)["."]
    settings = StatsSettings(tokens=3000, top_examples=3)
    paths = [ours, saelens, sparsify]
    ex = Explorer.open(
        paths, settings=settings, cache_dir=tmp_path / "stats", log=lambda line: None
    )
    with served(make_app(ex)) as base:
        status, info = call(base + "/api/info")
        assert [s["path"] for s in info["saes"]] == [str(ours), str(saelens), str(sparsify)]
        status, got = call(base + "/api/features", {"prompt": PROMPT})
        assert status == 200 and got["saes"][1] == got["saes"][0] == got["saes"][2]
        f = got["saes"][0]["top"][-1][0][0]
        cards = [read_card(base, i, f)[1] for i in range(3)]
        assert cards[1]["card"] == cards[0]["card"] == cards[2]["card"]
        body = {"prompt": PROMPT, "max_new_tokens": 5, "seed": 1}
        steer = [[{"sae": i, "kind": "steer", "feature": f, "value": 30}] for i in range(3)]
        runs = [stream(base, {**body, "edits": e}) for e in steer]
        edited = [joined(steps, "edited") for steps in runs]
        assert edited[1] == edited[0] == edited[2] != joined(runs[0], "baseline")


def stream(url, body):
    status, text = call(url + "/api/generate", body)
    assert status == 200, text
    steps = ndjson(text)
    assert steps[-1] == {"done": True}
    return steps[:-1]


def joined(steps, side):
    return "".join(s[side] for s in steps if s[side] is not None)


def test_generation_baseline_is_plain_generate_and_export_reproduces_it(url, tmp_path):
    body = {
        "prompt": PROMPT,
        "edits": [{"sae": 0, "kind": "steer", "feature": 5, "value": 40}],
        "seed": 7,
        "temperature": 0.8,
        "max_new_tokens": 10,
    }
    steps = stream(url, body)
    assert joined(steps, "baseline") != joined(steps, "edited")
    assert all(s["kl"] is None or s["kl"] >= 0 for s in steps) and steps[0]["kl"] > 0
    status, exported = call(url + "/api/export", body)
    assert status == 200, exported
    command = exported["commands"][0]
    args = shlex.split(command)[2:]  # drop "python analyze.py"
    result = CliRunner().invoke(cli.analyze, [*args, "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["baseline"] == [joined(steps, "baseline")]
    assert row["intervened"] == [joined(steps, "edited")]
    edits_file = tmp_path / "edits.yaml"
    edits_file.write_text(exported["yaml"][0])
    assert read_edits_file(edits_file) == [Steer(5, 40.0)]
    i = args.index("--steer")  # the same command with the YAML instead of the option
    from_yaml = [*args[:i], *args[i + 2 :], "--edits", str(edits_file), "--json"]
    result = CliRunner().invoke(cli.analyze, from_yaml)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [row]


def test_every_edit_kind_reads_back_from_the_yaml(url, tmp_path):
    edits = [
        {"sae": 0, "kind": "ablate", "feature": 3},
        {"sae": 0, "kind": "clamp", "feature": 4, "value": 2.5},
        {"sae": 0, "kind": "scale", "feature": 6, "value": 0.5},
        {"sae": 0, "kind": "steer", "feature": 9, "value": -3},
    ]
    status, exported = call(url + "/api/export", {"prompt": PROMPT, "edits": edits})
    assert status == 200, exported
    path = tmp_path / "e.yaml"
    path.write_text(exported["yaml"][0])
    assert read_edits_file(path) == [Ablate([3]), Clamp([4], 2.5), Scale([6], 0.5), Steer(9, -3.0)]


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("/api/features", {"prompt": ""}, 400, "prompt: empty"),
        ("/api/features", {"prompt": "word " * 3000}, 400, "max_position_embeddings"),
        ("/api/features", {"prompt": PROMPT, "top": "many"}, 400, "top: 'many'"),
        ("/api/card?sae=0&feature=99999", None, 400, "feature 99999 is out of range"),
        ("/api/card?sae=3&feature=1", None, 400, "sae: 3 is not an SAE"),
        ("/api/card?sae=0&feature=x", None, 400, "feature: 'x' is not a whole number"),
        (
            "/api/generate",
            {"prompt": PROMPT, "edits": [{"kind": "steer", "feature": 5, "value": "lots"}]},
            400,
            "steer value of feature 5: 'lots' is not a number",
        ),
        (
            "/api/generate",
            {"prompt": PROMPT, "edits": [{"kind": "melt", "feature": 5}]},
            400,
            "edit kind: 'melt'",
        ),
        ("/api/generate", {"prompt": PROMPT, "max_new_tokens": 0}, 400, "max_new_tokens: 0"),
        ("/api/export", {"prompt": PROMPT, "edits": []}, 400, "no edits to export"),
        ("/api/search/token", {"token": "KeyError raised"}, 400, "give exactly one"),
        ("/api/search/contrast", {"a": [], "b": ["x"]}, 400, "a: give a list of prompts"),
        ("/api/search/melt", {"prompt": PROMPT}, 400, "'melt' is not a search"),
        ("/api/prompts", {"name": "p.yaml", "text": "dataset: x"}, 400, "dataset prompt set"),
        (
            "/api/prompts",
            {"name": "p.jsonl", "text": '{"text": "a"}\n[1]'},
            400,
            "line 2 of 'p.jsonl'",
        ),
        ("/api/prompts", {"name": "p.txt", "text": "\n \n"}, 400, "'p.txt' holds no prompts"),
        ("/api/prompts", {"name": "p.txt", "text": 3}, 400, "upload: give"),
        ("/api/prompts", {"name": "p.txt", "text": "x\n" * 501}, 400, "501 prompts; at most 500"),
    ],
)
def test_bad_input_is_one_clear_line(url, path, body, status, words):
    got_status, got = call(url + path, body)
    assert got_status == status and words in got["error"] and "\n" not in got["error"]


def test_bodies_must_be_small_json(url):
    status, got = call(url + "/api/features", raw=b"x" * (MAX_BODY_BYTES + 1))
    assert status == 413 and "at most" in got["error"]
    status, got = call(url + "/api/features", raw=b"{not json")
    assert status == 400 and "not JSON" in got["error"]
    status, got = call(
        url + "/api/features", raw=b'{"prompt": "a"}', headers={"Content-Type": "text/plain"}
    )
    assert status == 400 and "application/json" in got["error"]


def test_only_localhost_names_are_served_on_loopback(url):
    status, got = call(url + "/api/info", headers={"Host": "evil.example:8765"})
    assert status == 403 and "evil.example" in got["error"]


def test_token_is_needed_on_every_request(explorer):
    with served(make_app(explorer, token="s3cret", loopback=False)) as base:
        assert call(base + "/api/info")[0] == 401
        assert call(base + "/")[0] == 401
        assert call(base + "/api/info", headers={"X-SAE-Token": "wrong"})[0] == 401
        assert call(base + "/api/info", headers={"X-SAE-Token": "s3cret"})[0] == 200
        assert call(base + "/?token=s3cret")[0] == 200


def test_stop_midway_and_a_second_tab_is_served_meanwhile(url, explorer, monkeypatch):
    real = explorer._steps

    def slow(*args):  # a slow model: the stop must come long before the end
        more = itertools.repeat({"baseline": "x", "edited": "x", "kl": 0.0})
        for step in itertools.chain(real(*args), more):
            time.sleep(0.05)
            yield step

    monkeypatch.setattr(explorer, "_steps", slow)
    hooks_before = hooks(explorer.model)  # transformers' own hooks may be there
    before = call(url + "/api/info")[1]["ended"].get("cancelled", 0)
    body = {"prompt": PROMPT, "edits": [{"kind": "steer", "feature": 5, "value": 9}]}
    request = urllib.request.Request(
        url + "/api/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    response = urllib.request.urlopen(request, timeout=60)
    assert "baseline" in json.loads(response.readline())  # the generation is running
    start = time.monotonic()
    status, _ = call(url + "/api/features", {"prompt": "a second tab"})
    assert status == 200 and time.monotonic() - start < 5  # served between decoding steps
    assert "baseline" in json.loads(response.readline())  # and the first tab still streams
    response.close()  # stop: the client leaves
    deadline = time.monotonic() + 30
    while call(url + "/api/info")[1]["ended"].get("cancelled", 0) == before:
        assert time.monotonic() < deadline, "the stopped generation was never cancelled"
        time.sleep(0.05)
    info = call(url + "/api/info")[1]
    assert info["jobs"] == 0
    assert hooks(explorer.model) == hooks_before  # the edit's hooks are gone


def hooks(model) -> dict:
    """Every module's forward hooks, by module name."""
    return {name: list(m._forward_hooks) for name, m in model.named_modules() if m._forward_hooks}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_serve_command_starts_the_page(demo_sae_run, host):
    """`analyze.py serve` as a user starts it: the URL it prints answers; beyond localhost
    it warns and the URL carries the token that every request needs."""
    port = free_port()
    command = [sys.executable, "analyze.py", "serve", str(demo_sae_run), "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--host", host], cwd=REPO, stderr=subprocess.PIPE, text=True
    )  # fmt: skip
    try:
        lines = []
        while not any("explorer: http" in line for line in lines):
            line = proc.stderr.readline()
            assert line, "serve exited early:\n" + "".join(lines)
            lines.append(line)
        url = lines[-1].split()[1]
        assert (host == "0.0.0.0") == any("warning" in line for line in lines)
        deadline = time.monotonic() + 30
        while True:
            try:
                status, page = call(url)
                break
            except OSError:  # listening a moment after it printed the URL
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert status == 200 and "SAE explorer" in page
        if host == "0.0.0.0":
            assert "?token=" in url
            assert call(f"http://127.0.0.1:{port}/api/info")[0] == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_background_job_steps_only_while_no_other_job_waits():
    import asyncio
    import threading

    from sae.serve.model_worker import ModelWorker

    order, started = [], threading.Event()

    def scan():
        for i in range(400):
            order.append("scan")
            started.set()
            time.sleep(0.001)
            yield i

    def generation():
        for i in range(5):
            order.append("gen")
            yield i

    async def run_generation(worker):
        return [step async for step in worker.stream(generation)]

    worker = ModelWorker()
    try:
        worker.background(scan)
        assert started.wait(10)
        assert asyncio.run(run_generation(worker)) == list(range(5))
        first = order.index("gen")
        assert order[first : first + 5] == ["gen"] * 5  # no scan step in between
        deadline = time.monotonic() + 30
        while worker.jobs and time.monotonic() < deadline:
            time.sleep(0.01)
        assert order.count("scan") == 400 and worker.ended == {"done": 2}
    finally:
        worker.stop()
