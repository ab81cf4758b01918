"""The library functions the analyze commands call (sae/cli stays thin over them), on the
cases the command-line tests do not reach: choices the CLI spells out without importing
the library, a report header for SAEs with and without k, and the checks of how a fix
test picks its features."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from sae.architectures import ReLUConfig, ReLUSAE, TopKConfig, TopKSAE
from sae.config import RunConfig
from sae.errors import ConfigError


def test_the_command_lines_copies_of_library_choices_match_the_library():
    """The CLI loads without torch, so it spells these out instead of importing them."""
    from sae.analysis.feature_overview import SORTS
    from sae.analysis.target import TOP_TOKENS_SCAN
    from sae.cli import common
    from sae.cli import features as features_module

    assert features_module.SORTS == tuple(sorted(SORTS))
    assert common.TOP_TOKENS_SCAN == TOP_TOKENS_SCAN


@pytest.mark.parametrize(
    "sae, k",
    [
        (TopKSAE(TopKConfig(num_latents=32, k=3), 8), {"k": 3}),
        (ReLUSAE(ReLUConfig(num_latents=32), 8), {}),
    ],
)
def test_the_report_header_names_k_only_for_architectures_that_have_one(sae, k):
    from sae.analysis.target_report import sae_info

    target = SimpleNamespace(
        sae=sae, folder=Path("runs/r/layers.2"), format="sae", hook="layers.2", cfg=RunConfig()
    )
    info = sae_info(target)
    assert list(info) == [
        "SAE",
        "format",
        "model",
        "hook",
        "architecture",
        "features",
        "d_in",
        *k,
        "data",
    ]
    assert info["features"] == 32 and info["d_in"] == 8 and {key: info[key] for key in k} == k


def test_top_edits_are_checked_against_the_options_that_rank_them():
    from sae.interventions.edit_picks import TopEdits

    assert TopEdits.from_options(5, None, None, " raised", has_edits=False) == TopEdits(ablate=5)
    both = TopEdits.from_options(2, "3:+4", (Path("a"), Path("b")), None, has_edits=True)
    assert both == TopEdits(ablate=2, steer=(3, 4.0)) and both.count == 3
    assert TopEdits.from_options(None, None, None, None, has_edits=True).count == 0
    for args, message in [
        ((3, None, None, None, False), "--contrast TARGET BASELINE or --answer TOKEN"),
        ((None, None, None, " a", True), "give one of them"),
        ((None, None, None, None, False), "no intervention"),
        ((None, "0:+4", None, " a", False), "K must be at least 1"),
        ((None, "2=4", None, " a", False), "is not FEATURE:NUMBER"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TopEdits.from_options(*args[:4], has_edits=args[4])


def test_edits_are_described_as_their_options_write_them():
    from sae.interventions.edits import Ablate, Clamp, Reconstruct, Scale, Steer, describe_edit

    assert [
        describe_edit(e)
        for e in (Ablate([12, 345]), Clamp(7, 10.0), Scale(7, 0.5), Steer(99, 8.0), Reconstruct())
    ] == ["ablate 12,345", "clamp 7=10", "scale 7x0.5", "steer 99+8", "reconstruct"]


def test_prompts_come_inline_or_from_a_file_not_both(tmp_path):
    from sae.analysis.feature_search import given_prompts

    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert given_prompts(("a", "b"), None) == ["a", "b"]
    assert given_prompts((), tmp_path / "p.txt") == ["one", "two"]
    for texts, path in [((), None), (("a",), tmp_path / "p.txt")]:
        with pytest.raises(ConfigError, match="--prompt TEXT .* or --prompts FILE, not both"):
            given_prompts(texts, path)
