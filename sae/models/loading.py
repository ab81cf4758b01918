"""Loading a causal LM and its tokenizer, and finding its decoder layers.

Any model that ``AutoModelForCausalLM`` loads works, by local folder or hub id;
``builtin:demo-llama`` names the small model shipped in ``sae/models/demo_model/``. GGUF
checkpoints (a ``.gguf`` file, a folder or repo plus ``model.gguf_file``, or
``builtin:smollm2-135m-instruct``) are converted once into a plain folder (``sae.models.gguf_source``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from sae.config import ModelConfig
from sae.errors import ConfigError
from sae.hub import looks_like_local_path
from sae.models import demo_model, gguf_source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DECODER_LMS = "use a decoder-only LM such as Llama, Mistral, Qwen or GPT-2"
MODEL_FOLDER = (
    "a model folder (as save_pretrained writes it) holds config.json, the weights (model.safetensors, "
    "pytorch_model.bin or their shards) and the tokenizer (tokenizer.json or tokenizer.model, "
    "with tokenizer_config.json)"
)
# Loose on purpose: a folder with any of these is left to from_pretrained, which knows the exact names.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
)
PROBE_TOKENS = 8

T = TypeVar("T")


def resolve_device(device: str) -> torch.device:
    """auto, cpu, cuda, cuda:N or mps, checked against this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid = "use auto, cpu, cuda, cuda:N or mps"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"model.device: {device!r} is not a device; {valid}") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"model.device: {device!r} is not supported; {valid}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"model.device: {device!r} asked for, but this machine has no CUDA GPU; use cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"model.device: {device!r} does not exist; this machine has cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"model.device: {device!r} asked for, but MPS is not available here; use cpu or auto"
        )
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def resolve_path(name_or_path: str, gguf_file: str | None = None) -> str:
    """``builtin:demo-llama`` -> the shipped folder; a GGUF checkpoint -> its converted folder;
    anything else is passed to from_pretrained."""
    if name_or_path == demo_model.NAME:
        return str(demo_model.DEMO_MODEL_DIR)
    if gguf_source.is_gguf(name_or_path, gguf_file):
        return str(gguf_source.converted_folder(name_or_path, gguf_file))
    if name_or_path.startswith("builtin:"):
        raise ConfigError(
            f"model.name_or_path: unknown built-in model {name_or_path!r}; valid: "
            f"{demo_model.NAME}, {gguf_source.SMOLLM2}"
        )
    looks_like_path = looks_like_local_path(name_or_path)
    if looks_like_path and not Path(name_or_path).expanduser().is_dir():
        raise ConfigError(
            f"model.name_or_path: {name_or_path!r} is not a folder (nor a hub id like org/name)"
        )
    return str(Path(name_or_path).expanduser()) if looks_like_path else name_or_path


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode, on cfg.device in cfg.dtype) and tokenizer (with a pad token).

    Refuses, in one line, what would otherwise train on garbage or fail much later: a folder
    that is no model folder, a model that is not a causal LM (an encoder-decoder, an encoder
    such as BERT that AutoModelForCausalLM loads with random heads), weights left randomly
    initialised, and a tokenizer whose ids run past the embedding matrix.
    """
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    path = resolve_path(cfg.name_or_path, cfg.gguf_file)
    where = f"model.name_or_path: {cfg.name_or_path!r}"
    remote = cfg.trust_remote_code
    if Path(path).is_dir():
        check_model_folder(Path(path), cfg.name_or_path)
    with _log_unless_refused():
        config = _loading(
            lambda: AutoConfig.from_pretrained(path, trust_remote_code=remote), cfg.name_or_path
        )
        check_causal_lm_config(config, where)
        tokenizer = _loading(
            lambda: AutoTokenizer.from_pretrained(path, trust_remote_code=remote),
            cfg.name_or_path,
            lambda: _missing_tokenizer(Path(path)),
        )
        model, info = _loading(
            lambda: AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=remote, output_loading_info=True
            ),
            cfg.name_or_path,
        )
        model = model.to(device).eval()
        check_loaded_model(model, tokenizer, info["missing_keys"], where)
    if tokenizer.pad_token is None:
        # Padding is only used for batching; masked tokens never reach an SAE.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _loading(
    load: Callable[[], T], name: str, explain: Callable[[], str | None] = lambda: None
) -> T:
    """Run one from_pretrained; its file, hub and format errors become one ConfigError line
    (``explain`` may give a clearer reason than transformers' own)."""
    try:
        return load()
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.name_or_path: cannot load {name!r}: {explain() or _first_sentence(e)}"
        ) from None
    except RuntimeError as e:
        if "mismatched_sizes" not in str(e) and "size mismatch" not in str(e):
            raise  # not a loading problem (out of memory, a bug): keep its traceback
        raise ConfigError(
            f"model.name_or_path: cannot load {name!r}: its weights do not fit its config.json "
            "(tensors of other shapes than the config gives them); the folder mixes files of "
            "different models"
        ) from None


def _first_sentence(e: Exception) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    whole = " ".join(lines)
    # Short messages whole: transformers' tokenizer error spreads one sentence and what to
    # install over five lines. Long ones (hub errors, with URLs and request ids): the first
    # line, which says what went wrong.
    return whole if len(whole) <= 400 else lines[0]


def check_model_folder(folder: Path, name: str) -> None:
    """Refuse a local folder that cannot be a model: transformers' own errors for one say
    something else (an empty folder: "Couldn't instantiate the backend tokenizer")."""
    names = {p.name for p in folder.iterdir()}
    if "adapter_config.json" in names:
        return  # a PEFT adapter names its base model; transformers loads both
    if not names:
        problem = "the folder is empty"
    elif "config.json" not in names:
        gguf = sorted(n for n in names if n.lower().endswith(".gguf"))
        if gguf:
            raise ConfigError(
                f"model.name_or_path: cannot load {name!r}: it holds a GGUF file but no config.json; "
                f"name the file with --set model.gguf_file={gguf[0]}"
            )
        problem = "the folder has no config.json"
    elif not any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        problem = "the folder has a config.json but no model weights"
    else:
        return
    raise ConfigError(f"model.name_or_path: cannot load {name!r}: {problem}; {MODEL_FOLDER}")


def _missing_tokenizer(path: Path) -> str | None:
    if path.is_dir() and not any((path / name).exists() for name in TOKENIZER_FILES):
        return (
            "the folder has no tokenizer files (tokenizer.json, or tokenizer.model or vocab.json + merges.txt, "
            "with tokenizer_config.json); save the model's tokenizer there too (tokenizer.save_pretrained)"
        )
    return None


def check_causal_lm_config(config: transformers.PretrainedConfig, where: str) -> None:
    """Refuse what config.json alone shows is no causal LM, before any weights are read."""
    kind = f"{config.model_type!r} model ({type(config).__name__})"
    if getattr(config, "is_encoder_decoder", False):
        # AutoModelForCausalLM loads some (BART) as their decoder alone, which was trained
        # to read an encoder's output: not a language model of its own.
        raise ConfigError(
            f"{where} is an encoder-decoder {kind}, not a causal language model; {DECODER_LMS}"
        )
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if not remote and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(
            f"{where} is a {kind}, which AutoModelForCausalLM cannot load: not a causal "
            f"language model; {DECODER_LMS}"
        )


def check_loaded_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    missing_keys: Iterable[str],
    where: str,
) -> None:
    """Refuse a loaded model that is not causal, has weights the checkpoint did not hold
    (``missing_keys`` after tying: a tied lm_head is not missing), or is too small for its tokenizer."""
    name = type(model).__name__
    embeddings = _embedding_rows(model)
    if not is_causal(model, min(len(tokenizer), embeddings or len(tokenizer))):
        raise ConfigError(
            f"{where} loads as {name}, which is not a causal language model (its output at a "
            f"position changes with later tokens, as in an encoder like BERT); {DECODER_LMS}"
        )
    missing = sorted(missing_keys)
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise ConfigError(
            f"{where} loads as {name}, but {len(missing)} of its weights are not in the checkpoint "
            f"and would be random ({shown}); the checkpoint is incomplete or of another architecture"
        )
    if embeddings is not None and len(tokenizer) > embeddings:
        # More embedding rows than tokens is normal (padded to a multiple of 64 or 128).
        raise ConfigError(
            f"{where}: its tokenizer has {len(tokenizer):,} tokens but the model's embedding matrix "
            f"only {embeddings:,} rows, so token ids from {embeddings:,} up have no embedding; "
            "the tokenizer belongs to another model"
        )


def _embedding_rows(model: PreTrainedModel) -> int | None:
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def is_causal(model: PreTrainedModel, vocab: int) -> bool:
    """Whether the model's logits at a position ignore later tokens, probed on two
    ``PROBE_TOKENS``-token sequences that differ only in the last token: a bidirectional
    model (BERT) changes the logits before it too. A third row repeats the first, to measure
    how much two rows of one batch differ anyway in this dtype and device (nothing, so far)."""
    param = next(model.parameters())
    ids = (
        torch.arange(PROBE_TOKENS, device=param.device) * 7919 + 3
    ) % vocab  # arbitrary, mostly distinct tokens
    other = ids.clone()
    other[-1] = (ids[-1] + 1) % vocab
    with torch.no_grad():
        logits = model(input_ids=torch.stack([ids, ids, other])).logits[:, :-1].float()
    if not torch.isfinite(logits).all():
        return True  # cannot tell; such a model fails visibly at harvest (norm filter, NaN loss)
    noise = (logits[0] - logits[1]).abs().max()
    change = (logits[0] - logits[2]).abs().max()
    # A small random BERT changes its logits by ~0.5% of their largest; rounding in a
    # half-precision dtype is ~0.4% of a value, if two rows of a batch ever differ.
    relative = 1e-5 if param.dtype.itemsize >= 4 else 1e-3
    return bool(change <= max(4 * noise, relative * logits.abs().max()))


@contextlib.contextmanager
def _log_unless_refused() -> Iterator[None]:
    """Hold back transformers' log lines while a model loads, and show them after unless it
    is refused: a refused model's load report (a table of MISSING and UNEXPECTED weights)
    would bury the one line that says why."""
    logger = transformers.utils.logging.get_logger()  # the library's root logger: "transformers"
    held: list[logging.LogRecord] = []
    handlers = logger.handlers[:]
    holder = logging.Handler()
    holder.emit = held.append
    logger.handlers = [holder]
    refused = False
    try:
        yield
    except ConfigError:
        refused = True
        raise
    finally:
        logger.handlers = handlers
        for record in [] if refused else held:
            logger.handle(record)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the model's decoder layers.

    Found generically as the ``nn.ModuleList`` whose length equals
    ``config.num_hidden_layers``, so Llama (``model.layers``), GPT-2
    (``transformer.h``), GPT-NeoX (``gpt_neox.layers``) and others all resolve.
    """
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if n is not None and isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ConfigError(
        f"model.name_or_path: found no list of config.num_hidden_layers = {n} decoder layers in "
        f"{type(model).__name__}; this architecture is not supported"
    )


def model_summary(model: PreTrainedModel) -> str:
    _, layers = decoder_layers(model)
    n_params = sum(p.numel() for p in model.parameters())
    p = next(model.parameters())
    return (
        f"{type(model).__name__}: {n_params / 1e6:.1f}M parameters, {len(layers)} layers, "
        f"width {model.config.hidden_size}, {p.dtype} on {p.device}"
    )


def layer_overview(model: PreTrainedModel) -> dict:
    """The model's hook points, JSON-able: {"summary": ``model_summary``, "layers_module":
    the decoder layers' qualified name, "hook_points": ["layers.0", ...], "sub_modules": the
    names of a layer's children}."""
    name, layers = decoder_layers(model)
    return {
        "summary": model_summary(model),
        "layers_module": name,
        "hook_points": [f"layers.{i}" for i in range(len(layers))],
        "sub_modules": [n for n, _ in layers[0].named_children()],
    }
