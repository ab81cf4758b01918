"""EleutherAI sparsify folders (docs/design.md §5).

A run is one folder per hook point, named after the module it hooks relative to the
model's base model (``layers.10``: decoder layer 10's output, ``hidden_states[11]``, our
``layers.10``), each holding

    cfg.json          activation, expansion_factor, normalize_decoder, num_latents, k,
                      multi_topk, skip_connection, transcode, d_in
    sae.safetensors   encoder.weight [M, d], encoder.bias [M], W_dec [M, d], b_dec [d]

and the run's ``config.json`` (model, dataset, split, ctx_len, ...) one level up.

    z = TopK_k(ReLU(encoder(x - b_dec))),   x_hat = z W_dec + b_dec

which is our TopK SAE (ReLU before or after the top-k selects the same latents). Only
``activation: topk`` SAEs are read: groupmax, transcoders, skip connections and signed
latents compute something else, and are refused in one line.

Written folders also hold our cfg.json as ``sae_cfg.json``, which sparsify never reads, so
converting back restores it exactly (an extra key in its cfg.json would work too, but
sparsify prints every unknown key it drops).
"""

from __future__ import annotations

from pathlib import Path

from sae.architectures.base import (
    CONFIG_FILE,
    read_json,
    read_tensors,
    stored_settings,
    write_sae_folder,
)
from sae.architectures.topk import TopKConfig
from sae.errors import ConfigError
from sae.formats.hook_names import to_module_path, to_ours
from sae.formats.stored import StoredSAE, dtype_name, imported_metadata

NAME = "sparsify"
WEIGHTS_FILE = "sae.safetensors"
RUN_CONFIG_FILE = "config.json"
CARRIED_FILE = "sae_cfg.json"
_UNSUPPORTED = {
    "transcode": "transcoders",
    "skip_connection": "skip connections",
    "signed": "signed latents",
}


def read(folder: Path, cfg: dict) -> StoredSAE:
    """The sparsify SAE in ``folder`` (``cfg``: its cfg.json), with our cfg.json; refused
    in one line when it is not a plain TopK SAE."""
    d, k, M = _shape(cfg, folder / CONFIG_FILE)
    weights = folder / WEIGHTS_FILE
    t = read_tensors(weights)
    for name, shape in {
        "encoder.weight": (M, d),
        "encoder.bias": (M,),
        "W_dec": (M, d),
        "b_dec": (d,),
    }.items():
        got = tuple(t[name].shape) if name in t else None
        if got != shape:
            raise ConfigError(
                f"{weights}: {name} has shape {got}, cfg.json says {shape} (d_in {d}, {M} latents)"
            )
    tensors = {
        "W_enc": t["encoder.weight"].t(),
        "b_enc": t["encoder.bias"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    }
    carried = read_json(folder / CARRIED_FILE) if (folder / CARRIED_FILE).is_file() else None
    if carried is not None and _agrees(carried, cfg):
        return StoredSAE(carried, tensors, folder, NAME, weights)  # a folder we wrote
    run = _run_config(folder)
    settings = TopKConfig(num_latents=M, k=k, multi_topk=bool(cfg.get("multi_topk")))
    native = {
        **stored_settings(settings, d),
        "d_sae": M,
        "apply_b_dec_to_input": True,
        "dtype": dtype_name(t["W_dec"].dtype),
        "metadata": imported_metadata(
            NAME,
            folder.name,
            to_ours(folder.name),
            run.get("model"),
            run.get("dataset"),
            run.get("ctx_len"),
            dataset_split=run.get("split"),
            text_column=run.get("text_column"),
        ),
    }
    return StoredSAE(native, tensors, folder, NAME, weights)


def _shape(cfg: dict, where: Path) -> tuple[int, int, int]:
    """(d_in, k, latents) of a plain TopK SAE's cfg.json; else one line saying why not."""
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ConfigError(
            f"{where}: activation {activation!r} is not supported; sparsify SAEs with activation "
            "topk are"
        )
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ConfigError(
                f"{where}: {key} is true; {what} are not supported, plain TopK SAEs are"
            )
    d, k = cfg.get("d_in"), cfg.get("k")
    M = cfg.get("num_latents") or (
        d * cfg["expansion_factor"]
        if isinstance(d, int) and isinstance(cfg.get("expansion_factor"), int)
        else None
    )
    missing = [
        name
        for name, v in (("d_in", d), ("k", k), ("num_latents or expansion_factor", M))
        if not isinstance(v, int)
    ]
    if missing:
        raise ConfigError(
            f"{where}: no integer {', '.join(missing)}; not a complete sparsify config"
        )
    return d, k, M


def sparsify_cfg(native: dict) -> dict:
    """sparsify's cfg.json for an SAE whose cfg.json in our format is ``native``."""
    if native["architecture"] != "topk" or not native.get("apply_b_dec_to_input", True):
        raise ConfigError(
            f"sparsify holds TopK SAEs that subtract b_dec from their input; this one is "
            f"{native['architecture']!r}"
            + ("" if native["architecture"] != "topk" else " without apply_b_dec_to_input")
            + " (write it with --format saelens)"
        )
    d, M = native["d_in"], native["num_latents"]
    return {
        "activation": "topk",
        "expansion_factor": max(1, M // d),
        "normalize_decoder": True,
        "num_latents": M,
        "k": native["k"],
        "multi_topk": bool(native.get("multi_topk")),
        "skip_connection": False,
        "transcode": False,
        "d_in": d,
    }


def write(stored: StoredSAE, folder: Path) -> None:
    cfg = sparsify_cfg(stored.cfg)
    t = stored.tensors
    write_sae_folder(
        folder,
        {CONFIG_FILE: cfg, CARRIED_FILE: stored.cfg},
        {
            WEIGHTS_FILE: {
                "encoder.weight": t["W_enc"].t(),
                "encoder.bias": t["b_enc"],
                "W_dec": t["W_dec"],
                "b_dec": t["b_dec"],
            }
        },
    )


def hookpoint_folder(stored: StoredSAE) -> str:
    """The folder name sparsify gives this SAE's hook point."""
    hook = stored.hook
    if not hook:
        raise ConfigError(
            f"{stored.folder}: names no hook point, and sparsify names each SAE's folder after its "
            "hook point; pass --hook"
        )
    return to_module_path(hook)


def run_config(stored: StoredSAE, hookpoints: list[str]) -> dict:
    """The run-level config.json sparsify (and SAELens's sparsify reader) look for."""
    meta = stored.metadata
    doc = {
        "model": meta.get("model_name"),
        "dataset": meta.get("dataset_path"),
        "split": meta.get("dataset_split"),
        "text_column": meta.get("text_column"),
        "ctx_len": meta.get("context_size"),
        "hookpoints": hookpoints,
    }
    return {k: v for k, v in doc.items() if v is not None}


def _agrees(carried: dict, cfg: dict) -> bool:
    try:
        expected = sparsify_cfg(carried)
    except (ConfigError, KeyError):
        return False
    return all(
        expected[k] == cfg.get(k)
        for k in ("activation", "num_latents", "k", "d_in", "transcode", "skip_connection")
    )


def _run_config(folder: Path) -> dict:
    path = folder.parent / RUN_CONFIG_FILE
    return read_json(path) if path.is_file() else {}
