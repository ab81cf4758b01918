"""The analyzer commands as a user runs them: features, search and report on a trained
demo SAE, text and --json output, and one-line errors for bad input."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sae import cli

PROMPTS = Path(__file__).resolve().parent.parent / "configs" / "prompts"
FAST = ["--tokens", "20000", "--examples", "5"]


def run(*args):
    result = CliRunner().invoke(cli.analyze, [str(a) for a in args])
    return result


def one_line_error(result, pattern):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def sae_dir(demo_sae_run):
    return demo_sae_run / "layers.2"


@pytest.fixture(scope="module")
def cached_stats(sae_dir):
    """The SAE's cached statistics (a short scan, as `features` caches it): search,
    attribute and fix-test take their top tokens from it instead of scanning."""
    from sae.analysis.feature_stats import load_feature_stats

    assert run("features", sae_dir, *FAST, "--limit", "1", "--json").exit_code == 0
    (path,) = (sae_dir / "features").glob("stats-*.safetensors")
    return load_feature_stats(path)


def expected_tokens(stats, f):
    """What a listing should show beside feature f: the first three distinct tokens its
    cached top examples centre on, decoded by the demo tokenizer."""
    from transformers import AutoTokenizer

    from sae.models.demo_model import DEMO_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    centre = stats.settings.context_before
    ids = stats.top.window_tokens[f, : int(stats.top.count()[f]), centre].tolist()
    return list(dict.fromkeys(tok.decode([i]) for i in ids))[:3]


def tokens_cell(tokens):
    return (
        " ".join(repr(t.replace("\n", "↵").replace("\t", "⇥")) for t in tokens)
        or "(never fired in the scan)"
    )


def assert_rows_show_top_tokens(stdout, features, stats):
    """Each feature's row (the line starting with its id) ends with its top tokens."""
    rows = {}
    for line in stdout.splitlines():
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        if line.startswith("  ") and first.isdigit():
            rows.setdefault(int(first), []).append(line)
    for f in features:
        assert rows[f], (f, stdout)
        for line in rows[f]:
            assert line.endswith("  " + tokens_cell(expected_tokens(stats, f))), (
                line,
                expected_tokens(stats, f),
            )


def test_features_summary_json_and_cache(sae_dir):
    first = run("features", sae_dir, *FAST, "--json", "--limit", "5", "--sort", "max")
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    assert data["features"] == 1024 and data["tokens"] == 20000 and data["sorted_by"] == "max"
    maxes = [r["max"] for r in data["features_shown"]]
    assert maxes == sorted(maxes, reverse=True) and len(maxes) == 5
    assert (
        sum(data["density_histogram"]["counts"]) + data["density_histogram"]["never_fired"] == 1024
    )
    cached = list((sae_dir / "features").glob("stats-*.safetensors"))
    assert len(cached) == 1
    again = run("features", sae_dir, *FAST, "--json", "--limit", "5", "--sort", "max")
    assert "(cached)" in again.stderr and json.loads(again.stdout) == data


def test_feature_in_full_as_text(sae_dir):
    result = run("features", sae_dir, *FAST, "-f", "3", "--show-examples", "2")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "feature 3: fires on" in out and "promoted:" in out and "nearest:" in out
    assert "quantile bin 1 of 4" in out and out.count("[[") >= 1


def test_search_contrast_json(demo_sae_run, cached_stats):
    result = run(
        "search",
        demo_sae_run,
        "--target",
        PROMPTS / "demo_raised.txt",
        "--baseline",
        PROMPTS / "demo_not_raised.txt",
        "--top",
        "3",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["target_prompts"] == 20 and data["baseline_prompts"] == 20
    top = data["higher_in_target"]
    assert len(top) == 3 and top[0]["effect"] >= top[1]["effect"] >= top[2]["effect"] > 0
    assert data["higher_in_baseline"][0]["effect"] < 0
    for row in top + data["higher_in_baseline"]:
        assert row["top_tokens"] == expected_tokens(cached_stats, row["feature"])
    assert "(cached)" in result.stderr and "scanning" not in result.stderr


def test_search_contrast_text_shows_top_tokens_beside_each_feature(demo_sae_run, cached_stats):
    args = [
        "search",
        demo_sae_run,
        "--target",
        PROMPTS / "demo_raised.txt",
        "--baseline",
        PROMPTS / "demo_not_raised.txt",
        "--top",
        "3",
    ]
    result = run(*args)
    assert result.exit_code == 0, result.output
    data = json.loads(run(*args, "--json").stdout)
    listed = [
        r["feature"] for side in ("higher_in_target", "higher_in_baseline") for r in data[side]
    ]
    assert result.stdout.count("top tokens") == 2
    assert_rows_show_top_tokens(result.stdout, listed, cached_stats)
    off = run(*args, "--no-top-tokens")
    assert (
        off.exit_code == 0
        and "top tokens" not in off.stdout
        and "feature statistics" not in off.stderr
    )
    first_words = lambda out: [line.split()[:1] for line in out.splitlines()]  # noqa: E731
    assert first_words(off.stdout) == first_words(
        result.stdout
    )  # the same rows, without the tokens
    assert "top_tokens" not in run(*args, "--json", "--no-top-tokens").stdout


def test_search_text(demo_sae_run, cached_stats):
    result = run(
        "search", demo_sae_run, "--text", "a KeyError is raised", "--focus", "raised", "--top", "4"
    )
    assert result.exit_code == 0, result.output
    assert "features firing on ' raised'" in result.stdout and "per token" in result.stdout
    ranking = json.loads(
        run(
            "search",
            demo_sae_run,
            "--text",
            "a KeyError is raised",
            "--focus",
            "raised",
            "--top",
            "4",
            "--json",
        ).stdout
    )["ranking"]
    ranked = result.stdout.split("per token")[0]
    assert_rows_show_top_tokens(ranked, [r["feature"] for r in ranking], cached_stats)
    assert all(r["top_tokens"] == expected_tokens(cached_stats, r["feature"]) for r in ranking)


def test_bad_input_is_one_line(sae_dir, demo_sae_run, tmp_path):
    one_line_error(
        run("features", sae_dir, *FAST, "-f", "1024"),
        "feature 1024 is out of range; this SAE has features 0..1023",
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    one_line_error(
        run("search", sae_dir, "--target", empty, "--baseline", PROMPTS / "demo_not_raised.txt"),
        "--target: ",
    )
    one_line_error(
        run("search", sae_dir, "--target", tmp_path / "missing.txt", "--baseline", empty),
        "is not a file",
    )
    one_line_error(run("search", sae_dir, "--target", PROMPTS / "demo_raised.txt"), "needs both")
    one_line_error(run("search", sae_dir), "give either")
    one_line_error(run("features", tmp_path / "nothing"), "does not exist")
    one_line_error(
        run("features", sae_dir, "--hook", "layers.1"),
        "--hook: 'layers.1' contradicts the SAE's own hook point 'layers.2'",
    )
    one_line_error(
        run("features", sae_dir, "--hook", "layers.9", "--override-hook"),
        "layer 9 in 'layers.9' is out of range",
    )
    (tmp_path / "two" / "a").mkdir(parents=True)
    (tmp_path / "two" / "b").mkdir()
    for name in ("a", "b"):
        for f in ("cfg.json", "sae_weights.safetensors"):
            (tmp_path / "two" / name / f).write_bytes((sae_dir / f).read_bytes())
    one_line_error(run("features", tmp_path / "two"), "holds 2 SAEs (a, b)")


def test_every_command_says_which_hook_it_read_and_override_hook_reads_another(sae_dir):
    own = run("search", sae_dir, "--text", "a KeyError is raised", "--top", "2")
    assert own.exit_code == 0 and "at layers.2 of builtin:demo-llama" in own.stderr, own.output
    other = run(
        "search",
        sae_dir,
        "--text",
        "a KeyError is raised",
        "--top",
        "2",
        "--hook",
        "layers.1",
        "--override-hook",
        "--json",
        "--no-top-tokens",
    )  # top tokens would scan layers.1's data
    assert other.exit_code == 0 and "at layers.1 of builtin:demo-llama" in other.stderr, (
        other.output
    )
    assert json.loads(other.stdout) != json.loads(
        run("search", sae_dir, "--text", "a KeyError is raised", "--top", "2", "--json").stdout
    )  # another hook, other activations


def test_report_with_contrast_columns(sae_dir, tmp_path):
    out = tmp_path / "r" / "report.html"
    result = run(
        "report",
        sae_dir,
        *FAST,
        "-o",
        out,
        "--cards",
        "10",
        "--target",
        PROMPTS / "demo_raised.txt",
        "--baseline",
        PROMPTS / "demo_not_raised.txt",
    )
    assert result.exit_code == 0, result.output
    assert f"report: {out}" in result.stdout and "1,024 features in the index" in result.stdout
    html = out.read_text()
    assert (
        "effect" in html
        and "AUROC" in html
        and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    )
    cards = int(result.stdout.split(" cards")[0].rsplit(", ", 1)[1].replace(",", ""))
    assert 10 <= cards <= 20  # the 10 densest and the 10 top of the contrast, overlapping or not
    again = json.loads(run("report", sae_dir, *FAST, "-o", out, "--cards", "3", "--json").stdout)
    assert (
        again["path"] == str(out)
        and again["bytes"] == out.stat().st_size
        and again["features"] == 1024
    )
    assert 3 == again["cards"]


def test_report_bad_output_is_one_line(sae_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(
        run("report", sae_dir, *FAST, "-o", blocker / "report.html"), "--output: cannot write"
    )
    one_line_error(
        run("report", sae_dir, *FAST, "--target", PROMPTS / "demo_raised.txt"), "need both"
    )


def test_generate_side_by_side_json(demo_sae_run):
    args = [
        "--prompt",
        "If the key is missing, a KeyError is",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
    ]
    steered = run("generate", demo_sae_run, *args, "--steer", "5:+40", "--json")
    assert steered.exit_code == 0, steered.output
    (row,) = json.loads(steered.stdout)
    assert row["baseline"] != row["intervened"]  # a strong push changes greedy text
    again = run("generate", demo_sae_run, *args, "--scale", "5:1", "--json")  # a no-op edit
    (same,) = json.loads(again.stdout)
    assert same["baseline"] == same["intervened"] == row["baseline"]
    text = run("generate", demo_sae_run, *args, "--ablate", "1,2")
    assert text.exit_code == 0 and "intervened (ablate 1,2)" in text.stdout


def test_attribute_and_fix_test(demo_sae_run, cached_stats, tmp_path):
    prompts = PROMPTS / "demo_fix.txt"
    attr = run(
        "attribute",
        demo_sae_run,
        "--prompts",
        prompts,
        "--answer",
        " raised",
        "--top",
        "3",
        "--json",
    )
    assert attr.exit_code == 0, attr.output
    data = json.loads(attr.stdout)
    assert data["prompts"] == 20 and len(data["pushes_up"]) == 3
    assert data["pushes_up"][0]["attribution"] >= data["pushes_up"][2]["attribution"] > 0
    for row in data["pushes_up"] + data["pushes_down"]:
        assert row["top_tokens"] == expected_tokens(cached_stats, row["feature"])
    text = run("attribute", demo_sae_run, "--prompts", prompts, "--answer", " raised", "--top", "3")
    assert text.exit_code == 0 and text.stdout.count("top tokens") == 2, text.output
    assert_rows_show_top_tokens(
        text.stdout, [r["feature"] for r in data["pushes_up"] + data["pushes_down"]], cached_stats
    )
    page, neutral = tmp_path / "fix.html", tmp_path / "neutral.txt"
    neutral.write_text(
        "The value is returned when the file is closed.\nIf the key is missing, the default is used.\n"
    )
    three = [a for line in prompts.read_text().splitlines()[:3] for a in ("--prompt", line)]
    fix = run(
        "fix-test",
        demo_sae_run,
        *three,
        "--scorer",
        "words:raised,raise",
        "--answer",
        " raised",
        "--ablate-top",
        "5",
        "--samples",
        "2",
        "--max-new-tokens",
        "6",
        "--neutral",
        neutral,
        "--html",
        page,
        "--json",
    )
    assert fix.exit_code == 0, fix.output
    result = json.loads(fix.stdout)
    assert len(result["prompts"]) == 3 and len(result["prompts"][0]["baseline"]) == 2
    assert result["edits"][0].startswith("ablate ") and len(result["edits"][0].split(",")) == 5
    ablated = [int(f) for f in result["edits"][0].removeprefix("ablate ").split(",")]
    # the attribution's top 5 on the same three prompts (its order on all 20 may differ)
    first3 = tmp_path / "three.txt"
    first3.write_text("\n".join(prompts.read_text().splitlines()[:3]) + "\n")
    top5 = run(
        "attribute",
        demo_sae_run,
        "--prompts",
        first3,
        "--answer",
        " raised",
        "--top",
        "5",
        "--json",
    )
    assert ablated == [r["feature"] for r in json.loads(top5.stdout)["pushes_up"]], top5.output
    assert [r["feature"] for r in result["features"]] == ablated
    assert all(
        r["top_tokens"] == expected_tokens(cached_stats, r["feature"]) for r in result["features"]
    )
    picked = fix.stderr.split("top features by attribution to ' raised': ")[1].splitlines()[0]
    assert picked.startswith(
        f"{ablated[0]} ({tokens_cell(expected_tokens(cached_stats, ablated[0]))}), "
    )
    assert result["summary"]["kl"]["value"] > 0 and page.read_text().startswith("<!doctype html>")


def test_fix_test_steers_the_top_contrast_features(demo_sae_run, cached_stats):
    result = run(
        "fix-test",
        demo_sae_run,
        "--prompt",
        "The worker thread",
        "--prompt",
        "The file",
        "--scorer",
        f"words:{PROMPTS / 'demo_thread_words.txt'}",
        "--contrast",
        PROMPTS / "demo_threads.txt",
        PROMPTS / "demo_files.txt",
        "--steer-top",
        "2:+4",
        "--samples",
        "2",
        "--max-new-tokens",
        "5",
        "--neutral-tokens",
        "0",
        "--json",
    )
    assert result.exit_code == 0, result.output
    contrast = json.loads(
        run(
            "search",
            demo_sae_run,
            "--target",
            PROMPTS / "demo_threads.txt",
            "--baseline",
            PROMPTS / "demo_files.txt",
            "--top",
            "2",
            "--json",
        ).stdout
    )
    top2 = [r["feature"] for r in contrast["higher_in_target"]]
    assert json.loads(result.stdout)["edits"] == [f"steer {f}+4" for f in top2]


def test_intervention_errors_are_one_line(demo_sae_run, tmp_path):
    p = ["--prompt", "x"]
    one_line_error(run("generate", demo_sae_run, *p), "no intervention")
    one_line_error(
        run("generate", demo_sae_run, *p, "--ablate", "5000"), "feature 5000 is out of range"
    )
    one_line_error(run("generate", demo_sae_run, *p, "--steer", "5"), "is not FEATURE:NUMBER")
    one_line_error(
        run("fix-test", demo_sae_run, *p, "--scorer", "words:a", "--ablate-top", "3"),
        "--contrast TARGET BASELINE or --answer TOKEN",
    )
    one_line_error(
        run("fix-test", demo_sae_run, *p, "--scorer", "words:a", "--steer-top", "2:+4"),
        "--contrast TARGET BASELINE or --answer TOKEN",
    )
    one_line_error(
        run("fix-test", demo_sae_run, *p, "--scorer", "words:a", "--answer", " raised"),
        "give one of them",
    )
    one_line_error(
        run(
            "fix-test",
            demo_sae_run,
            *p,
            "--scorer",
            "words:a",
            "--steer-top",
            "2=4",
            "--answer",
            " a",
        ),
        "is not FEATURE:NUMBER",
    )
    one_line_error(
        run("fix-test", demo_sae_run, *p, "--scorer", "hf:/no/such/model", "--ablate", "1"),
        "is not a folder",
    )
    one_line_error(
        run("attribute", demo_sae_run, *p, "--answer", " KeyErrorxyz"), "must be exactly one token"
    )


def test_fix_test_text_lists_the_edited_features_with_their_top_tokens(demo_sae_run, cached_stats):
    args = [
        "fix-test",
        demo_sae_run,
        "--prompt",
        "The file",
        "--scorer",
        "words:file",
        "--ablate",
        "7,3",
        "--steer",
        "12:+2",
        "--samples",
        "1",
        "--max-new-tokens",
        "3",
        "--neutral-tokens",
        "0",
    ]
    result = run(*args)
    assert result.exit_code == 0, result.output
    block = result.stdout.split("features edited, with their top tokens:\n")[1]
    assert [line.split()[0] for line in block.splitlines()[:3]] == ["7", "3", "12"]
    assert_rows_show_top_tokens(block, [7, 3, 12], cached_stats)
    off = run(*args, "--no-top-tokens")
    assert (
        off.exit_code == 0
        and "top tokens" not in off.stdout
        and "feature statistics" not in off.stderr
    )
