"""SAE folders in three formats, read into one form (``StoredSAE``) and written from it.

    format     folder                                              hook point from
    sae        cfg.json (architecture + its fields) + sae_weights.safetensors   metadata.hook_name
    saelens    cfg.json (d_sae, architecture standard|topk|jumprelu,
               metadata) + sae_weights.safetensors                 metadata.hook_name (TransformerLens)
    sparsify   <hook point>/cfg.json + sae.safetensors             the folder's name

Ours and SAELens's share file names and tensor layouts; a cfg.json with ``num_latents`` is
ours. ``load_sae`` builds the module from any of them, ``convert`` rewrites one SAE or a
whole run in another format; a round trip ours -> theirs -> ours gives back the same files
(tensors bit for bit, the same cfg.json). ``sae.formats.saelens`` and
``sae.formats.sparsify`` say what each field means and how it is honoured;
``sae.formats.run_config`` gives the model and data a saved SAE was trained on.

Beside the stages: it builds SAEs (``sae.architectures``), and every stage from the
architectures on may use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from sae.architectures import ARCHITECTURES, SparseAutoencoder
from sae.architectures.base import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_json,
    read_tensors,
    write_sae_folder,
)
from sae.atomic_io import write_text_atomic
from sae.errors import ConfigError
from sae.formats import saelens, sparsify
from sae.formats.stored import StoredSAE
from sae.hub import resolve_sae_path

NATIVE = "sae"
FORMATS = (NATIVE, saelens.NAME, sparsify.NAME)
EXPECTED = (
    f"{CONFIG_FILE} with {WEIGHTS_FILE} (this framework, SAELens) or with {sparsify.WEIGHTS_FILE} "
    "(sparsify)"
)
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def is_sae_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and any(
        (folder / w).is_file() for w in (WEIGHTS_FILE, sparsify.WEIGHTS_FILE)
    )


def format_of(folder: Path, cfg: dict) -> str:
    if (folder / sparsify.WEIGHTS_FILE).is_file():
        return sparsify.NAME
    if (folder / WEIGHTS_FILE).is_file():
        return NATIVE if "num_latents" in cfg else saelens.NAME
    raise ConfigError(f"{str(folder)!r} is in no known SAE format: expected {EXPECTED}")


def read_sae(folder: str | Path) -> StoredSAE:
    """The SAE in ``folder``, whatever its format; one line naming the problem otherwise."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"{str(folder)!r} is in no known SAE format: expected {EXPECTED}")
    cfg = read_json(folder / CONFIG_FILE)
    fmt = format_of(folder, cfg)
    if fmt == saelens.NAME:
        return saelens.read(folder, cfg)
    if fmt == sparsify.NAME:
        return sparsify.read(folder, cfg)
    if cfg.get("architecture") not in ARCHITECTURES:
        raise ConfigError(
            f"{folder / CONFIG_FILE}: architecture {cfg.get('architecture')!r} is not one of "
            f"{', '.join(ARCHITECTURES)}"
        )
    return StoredSAE(
        cfg, read_tensors(folder / WEIGHTS_FILE), folder, NATIVE, folder / WEIGHTS_FILE
    )


def build_sae(
    stored: StoredSAE, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> SparseAutoencoder:
    """The module ``stored`` describes, as ``dtype`` on ``device``."""
    check_dtype(dtype, torch.device(device))
    cls = ARCHITECTURES[stored.cfg["architecture"]]
    return cls.from_stored(
        stored.cfg, stored.tensors, str(stored.weights), device=device, dtype=dtype
    )


def load_sae(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> SparseAutoencoder:
    """The SAE at ``path``: an SAE folder in any format, a run folder holding one SAE, or a
    hub repo id with a subfolder (``EleutherAI/sae-llama-3-8b-32x/layers.10``)."""
    return build_sae(read_sae(find_sae_folder(path)), device, dtype)


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """One line if ``dtype`` cannot run on ``device``."""
    if dtype not in _DTYPES.values():
        raise ConfigError(
            f"SAE dtype {dtype_label(dtype)} is not supported; use one of {', '.join(_DTYPES)}"
        )
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"SAE dtype bfloat16 is not supported on {torch.cuda.get_device_name(device)}; "
            "use float32 or float16"
        )
    if device.type == "mps" and dtype == torch.float64:
        raise ConfigError(
            "SAE dtype float64 is not supported on Apple MPS; use float32, float16 or bfloat16"
        )


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"--sae-dtype: {name!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def sae_folders(root: Path) -> dict[str, Path]:
    """{name relative to root: folder} of every SAE folder at or under ``root`` (checkpoint
    state and hidden folders skipped)."""
    root = Path(root)
    if is_sae_folder(root):
        return {".": root}
    found = {}
    for cfg in sorted(root.rglob(CONFIG_FILE)):
        rel = cfg.parent.relative_to(root)
        if any(part == "state" or part.startswith(".") for part in rel.parts) or not is_sae_folder(
            cfg.parent
        ):
            continue
        found[rel.as_posix()] = cfg.parent
    return found


def find_sae_folder(path: str | Path) -> Path:
    """The one SAE folder ``path`` means: itself, or the only SAE under a run folder (a hub
    repo id with a subfolder is downloaded first)."""
    path = resolve_sae_path(path)
    if not path.is_dir():
        raise ConfigError(
            f"SAE: {str(path)!r} does not exist; give an SAE folder, a run folder or a hub repo id "
            "with a subfolder (org/repo/subfolder)"
        )
    found = sae_folders(path)
    if not found:
        raise ConfigError(
            f"SAE: no SAE in {str(path)!r}; expected {EXPECTED}, in it or in a sub-folder"
        )
    if len(found) > 1:
        names = ", ".join(found)
        raise ConfigError(
            f"SAE: {str(path)!r} holds {len(found)} SAEs ({names}); name one, e.g. "
            f"{path / next(iter(found))}"
        )
    return next(iter(found.values()))


def write_sae(stored: StoredSAE, folder: Path, fmt: str) -> None:
    """Write ``stored`` to ``folder`` in format ``fmt`` (its other files are kept)."""
    if fmt == saelens.NAME:
        saelens.write(stored, folder)
    elif fmt == sparsify.NAME:
        sparsify.write(stored, folder)
    elif fmt == NATIVE:
        write_sae_folder(folder, {CONFIG_FILE: stored.cfg}, {WEIGHTS_FILE: stored.tensors})
    else:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")


def convert(
    src: str | Path,
    dst: Path,
    fmt: str,
    hook: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Rewrite the SAE (or every SAE of the run) at ``src`` in format ``fmt`` under ``dst``.

    One SAE goes to ``dst`` itself; a run's SAEs keep their sub-folder names. sparsify names
    folders after hook points, so there each SAE goes to ``dst/<hook point>``. hook: the
    hook point, for SAEs whose files name none. Returns {source name: written folder}.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    src_path = resolve_sae_path(src)
    found = sae_folders(src_path) if src_path.is_dir() else {}
    if not found:
        raise ConfigError(
            f"SRC: no SAE in {str(src)!r}; expected {EXPECTED}, in it or in a sub-folder"
        )
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise ConfigError(
            f"DST: {str(dst)!r} exists and is not empty; choose a new folder or pass --overwrite"
        )
    stored = {name: read_sae(folder) for name, folder in found.items()}
    if hook:
        for s in stored.values():
            s.cfg = {**s.cfg, "metadata": {**s.metadata, "hook_name": hook}}
    if fmt == sparsify.NAME:
        targets = {name: sparsify.hookpoint_folder(s) for name, s in stored.items()}
        clash = sorted({t for t in targets.values() if list(targets.values()).count(t) > 1})
        if clash:
            names = ", ".join(n for n, t in targets.items() if t == clash[0])
            raise ConfigError(
                f"sparsify holds one SAE per hook point, and {names} all read {clash[0]}; "
                "convert them one at a time"
            )
        out = {name: dst / t for name, t in targets.items()}
    else:
        out = {name: dst if name == "." else dst / name for name in stored}
    for (
        s
    ) in stored.values():  # whatever the format cannot hold is refused before anything is written
        if fmt == saelens.NAME:
            saelens.saelens_cfg(s.cfg)
        elif fmt == sparsify.NAME:
            sparsify.sparsify_cfg(s.cfg)
    for name, s in stored.items():
        write_sae(s, out[name], fmt)
        log(
            f"{s.folder} ({s.format}, {s.cfg['architecture']}, hook {s.hook or '?'}) -> {out[name]} ({fmt})"
        )
    if fmt == sparsify.NAME:
        first = next(iter(stored.values()))
        doc = sparsify.run_config(first, sorted(p.name for p in out.values()))
        write_text_atomic(dst / sparsify.RUN_CONFIG_FILE, json.dumps(doc, indent=1) + "\n")
    return out


__all__ = [
    "FORMATS",
    "StoredSAE",
    "build_sae",
    "convert",
    "find_sae_folder",
    "load_sae",
    "read_sae",
    "sae_folders",
    "write_sae",
]
