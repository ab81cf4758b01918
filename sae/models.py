"""Loading a causal LM and its tokenizer, and finding its decoder layers.

Any model that ``AutoModelForCausalLM`` loads works, by local folder or hub id;
``builtin:demo-llama`` names the small model shipped in ``sae/demo_model/``. GGUF
checkpoints (a ``.gguf`` file, a folder or repo plus ``model.gguf_file``, or
``builtin:smollm2-135m-instruct``) are converted once into a plain folder (``sae.gguf_source``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sae import demo_model, gguf_source
from sae.config import ModelConfig
from sae.errors import ConfigError
from sae.hub import looks_like_local_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
            raise ConfigError(f"model.device: {device!r} asked for, but this machine has no CUDA GPU; use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device: {device!r} does not exist; this machine has cuda:0 .. "
                              f"cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.device: {device!r} asked for, but MPS is not available here; use cpu or auto")
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
        raise ConfigError(f"model.name_or_path: unknown built-in model {name_or_path!r}; valid: "
                          f"{demo_model.NAME}, {gguf_source.SMOLLM2}")
    looks_like_path = looks_like_local_path(name_or_path)
    if looks_like_path and not Path(name_or_path).expanduser().is_dir():
        raise ConfigError(f"model.name_or_path: {name_or_path!r} is not a folder (nor a hub id like org/name)")
    return str(Path(name_or_path).expanduser()) if looks_like_path else name_or_path


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode, on cfg.device in cfg.dtype) and tokenizer (with a pad token)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    path = resolve_path(cfg.name_or_path, cfg.gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        # Hub and file errors span many lines; the first says what went wrong.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {first}") from None
    if tokenizer.pad_token is None:
        # Padding is only used for batching; masked tokens never reach an SAE.
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


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
    raise ConfigError(f"model.name_or_path: found no list of config.num_hidden_layers = {n} decoder layers in "
                      f"{type(model).__name__}; this architecture is not supported")


def model_summary(model: PreTrainedModel) -> str:
    _, layers = decoder_layers(model)
    n_params = sum(p.numel() for p in model.parameters())
    p = next(model.parameters())
    return (f"{type(model).__name__}: {n_params / 1e6:.1f}M parameters, {len(layers)} layers, "
            f"width {model.config.hidden_size}, {p.dtype} on {p.device}")

