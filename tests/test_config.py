"""Run configs: YAML + overrides, type and range checks, one-line errors."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from sae.config import (
    RunConfig,
    architecture_configs,
    config_from_dict,
    describe,
    load_config,
    parse_override,
    to_dict,
    to_yaml,
)
from sae.errors import ConfigError

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_yaml_values_and_overrides_take_precedence_in_order(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  lr: 1.0e-3\n  seed: 7\nhooks: [layers.1]\n")
    cfg = load_config(f, ["train.lr=3e-4", "data.token_budget=2e6", "train.lr=5e-4"])
    assert cfg.train.lr == 5e-4  # last override wins
    assert cfg.train.seed == 7  # file value kept
    assert cfg.data.token_budget == 2_000_000 and isinstance(cfg.data.token_budget, int)
    assert cfg.hooks == ["layers.1"]
    assert cfg.sae.k == RunConfig().sae.k  # untouched default


def test_scientific_notation_without_dot_is_a_float():
    # PyYAML reads '3e-4' as a string; the config must still take it as a number.
    assert load_config(None, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)


def test_list_override_and_single_string_list():
    assert load_config(None, ["hooks=[layers.0, layers.3.mlp]"]).hooks == [
        "layers.0",
        "layers.3.mlp",
    ]
    assert load_config(None, ["hooks=layers.1"]).hooks == ["layers.1"]


def test_null_resets_optional_field():
    assert (
        load_config(None, ["sae.num_latents=4096", "sae.num_latents=null"]).sae.num_latents is None
    )


def test_round_trip_through_yaml_is_lossless(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "hooks=[layers.1,layers.2]", "output.run_name=x"])
    f = tmp_path / "saved.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(f) == cfg


@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("train.lr=abc", ["train.lr", "'abc'", "number"]),
        ("train.lr=-1", ["train.lr", "-1", "> 0"]),
        ("train.lrr=1", ["unknown key 'train.lrr'", "did you mean 'train.lr'"]),
        ("trian.seed=1", ["unknown key 'trian'", "did you mean 'train'"]),
        ("sae.architecture=topq", ["sae.architecture", "'topq'", "choose one of topk"]),
        ("sae.k=0", ["sae.k", "0", ">= 1"]),
        ("sae.k=2.5", ["sae.k", "2.5", "integer"]),
        ("train.decay_fraction=1.5", ["train.decay_fraction", "1.5", "<= 1"]),
        ("data.streaming=maybe", ["data.streaming", "'maybe'", "true or false"]),
        ("hooks=5", ["hooks", "5", "list of strings"]),
        ("train=5", ["train", "mapping"]),
        ("model.dtype=fp8", ["model.dtype", "'fp8'", "bfloat16"]),
        ("nonsense", ["--set 'nonsense'", "KEY=VALUE"]),
        ("train.seed=1e30", ["train.seed", "<= 9223372036854775807"]),
        ("train.lr=" + "9" * 400, ["train.lr", "is not a number"]),
        ("output.run_name=001", ["output.run_name", "quote the value"]),
        ("data.token_budget=1000", ["data.token_budget", "less than one batch"]),
        (
            "harvest.buffer_tokens=100",
            ["harvest.buffer_tokens", "100", "train.batch_tokens = 4096"],
        ),
        ("harvest.buffer_device=gpu", ["harvest.buffer_device", "'gpu'", "cpu, model"]),
        # Values that pass every bound and fail late: inf >= 0, NaN compares false to everything.
        ("train.lr=inf", ["train.lr", "'inf'", "not a finite number"]),
        ("train.lr=.inf", ["train.lr", "inf", "not a finite number"]),
        ("sae.aux_alpha=.nan", ["sae.aux_alpha", "nan", "not a finite number"]),
        # An unset shell variable, or a path: the run would land beside other runs or elsewhere.
        ("output.run_name=", ["output.run_name", "''", "not a folder name"]),
        ("output.run_name=a/b", ["output.run_name", "'a/b'", "plain name"]),
        ("output.run_name=..", ["output.run_name", "'..'", "not a folder name"]),
    ],
)
def test_bad_values_give_one_line_naming_key_value_and_valid_range(override, must_contain):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "\n" not in message
    for part in must_contain:
        assert part in message, f"{part!r} missing from {message!r}"


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: .*batch_tokens.*lr"):
        config_from_dict({"train": {"zzzzzz": 1}})


def test_yaml_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"line \d+: not valid YAML") as err:
        load_config(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path)  # a folder
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


def test_parse_override_nests_dotted_keys():
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}
    assert parse_override("x=") == {"x": ""}


def test_every_field_has_help_and_describe_covers_all_leaves():
    def leaves(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from leaves(value, f"{prefix}{f.name}.")
            else:
                assert f.metadata.get("help"), f"{prefix}{f.name} has no help"
                yield prefix + f.name

    # the sae section: the default architecture's keys, then every other architecture's own
    keys = list(leaves(RunConfig()))
    for cls in architecture_configs().values():
        keys += [f"sae.{key}" for key in leaves(cls()) if f"sae.{key}" not in keys]
    assert sorted(key for key, _, _ in describe()) == sorted(keys)
    assert len({key for key, _, _ in describe()}) == len(describe())


def test_defaults_serialize_to_plain_yaml():
    # Nothing but YAML-native values: the saved config must load without custom tags.
    assert yaml.safe_load(to_yaml(RunConfig())) == to_dict(RunConfig())


def test_several_epochs_without_a_cache_are_refused():
    with pytest.raises(
        ConfigError, match="harvest.cache_epochs: 3 passes need the activation cache"
    ):
        load_config(None, ["harvest.cache_epochs=3"])
