"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (docs/design.md §5).

Tensors: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in], and for
jumprelu threshold [d_sae]: the layouts our own files use, so no tensor is transposed.

    architecture   encode (x' = x - b_dec if apply_b_dec_to_input else x)
    standard       z = ReLU(x' W_enc + b_enc)                           -> our relu
    topk           z = ReLU(TopK_k(x' W_enc + b_enc))                   -> our topk
    jumprelu       z = ReLU(pre) * (pre > threshold), pre = x' W_enc + b_enc -> our jumprelu
    decode         x_hat = z W_dec + b_dec

Fields that change the computation are folded into the weights when read, so the SAE we
build computes the same latents and reconstruction:

* ``normalize_activations: expected_average_only_in`` (the SAE reads x * s): s from the
  ``activation_scaler.json`` SAELens writes beside it; W_enc * s, W_dec / s, b_dec / s.
* ``rescale_acts_by_decoder_norm`` (topk; pre-activations times |W_dec,i|, decoded with
  W_dec,i / |W_dec,i|): W_enc and b_enc times the row norms, W_dec rows made unit.
* a ``scaling_factor`` tensor (old files: latents times it before decoding): folded into W_dec.

Pre-6.0 files keep the metadata keys at the top level and may say architecture
``standard`` with ``activation_fn_str: topk`` and ``activation_fn_kwargs: {k: ...}``;
both are read. Per-token normalisations (``constant_norm_rescale``, ``layer_norm``) and
per-head (``hook_z``) SAEs are refused: our interventions need one fixed linear decoder.

Written files are SAELens >= 6 configs. Our own cfg.json rides along as
``metadata.sae_cfg`` (SAELens keeps unknown metadata keys), so converting back restores the
architecture (batchtopk is written as the jumprelu it computes) and hook name exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sae.architectures import ARCHITECTURES
from sae.architectures.base import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_json,
    read_tensors,
    stored_settings,
    write_sae_folder,
)
from sae.config import sae_config
from sae.errors import ConfigError
from sae.formats.hook_names import to_ours, to_transformer_lens
from sae.formats.stored import StoredSAE, dtype_name, imported_metadata

NAME = "saelens"
SCALER_FILE = "activation_scaler.json"
# SAELens architecture -> ours, and ours -> what it is written as: each architecture says (base.py)
TO_OURS = {theirs: ours for ours, cls in ARCHITECTURES.items() for theirs in cls.saelens_reads}
FROM_OURS = {ours: cls.saelens_writes for ours, cls in ARCHITECTURES.items() if cls.saelens_writes}
# the keys that decide what a file computes: a carried-along sae_cfg is trusted only if it agrees
_CORE = (
    "architecture",
    "d_in",
    "d_sae",
    "k",
    "apply_b_dec_to_input",
    "normalize_activations",
    "rescale_acts_by_decoder_norm",
    "reshape_activations",
)
_NORMALIZE = {
    None: "none",
    False: "none",
    True: "expected_average_only_in",
    "none": "none",
    "expected_average_only_in": "expected_average_only_in",
}


def saelens_cfg(native: dict) -> dict:
    """The SAELens cfg.json for an SAE whose cfg.json in our format is ``native``."""
    arch = FROM_OURS.get(native["architecture"])
    if arch is None:
        raise ConfigError(
            f"architecture {native['architecture']!r} has no SAELens equivalent; "
            f"these do: {', '.join(FROM_OURS)}"
        )
    meta = native.get("metadata") or {}
    hook = meta.get("hook_name")
    # a hook with no name of ours (read from a SAELens file) goes back under its own name
    their_hook = to_transformer_lens(hook) if hook else (meta.get("source") or {}).get("hook_name")
    cfg = {
        "architecture": arch,
        "d_in": native["d_in"],
        "d_sae": native["num_latents"],
        "dtype": native["dtype"],
        "device": "cpu",
        "apply_b_dec_to_input": bool(native["apply_b_dec_to_input"]),
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    cfg.update(ARCHITECTURES[native["architecture"]].saelens_fields(native))
    cfg["metadata"] = {
        "model_name": meta.get("model_name"),
        "hook_name": their_hook,
        "hook_head_index": None,
        "context_size": meta.get("context_size"),
        "prepend_bos": True,
        "dataset_path": meta.get("dataset_path"),
        # SAELens reads configs without a version >= 6 as old flat ones and would drop this block
        "sae_lens_version": "6.0.0",
        "sae_cfg": native,
    }
    return cfg


def write(stored: StoredSAE, folder: Path) -> None:
    cfg = saelens_cfg(stored.cfg)
    cls = ARCHITECTURES[stored.cfg["architecture"]]
    settings = sae_config(
        cls.Config.architecture, **{k: v for k, v in stored.cfg.items() if k in _settings_keys(cls)}
    )
    names = cls.disk_shapes(settings, stored.cfg["d_in"])  # SAELens's names: ours are the same
    write_sae_folder(
        folder, {CONFIG_FILE: cfg}, {WEIGHTS_FILE: {n: stored.tensors[n] for n in names}}
    )


def _settings_keys(cls: type) -> set[str]:
    return set(cls.Config.__dataclass_fields__) - {"architecture", "expansion_factor"}


def read(folder: Path, cfg: dict) -> StoredSAE:
    """The SAELens SAE in ``folder`` (``cfg``: its cfg.json), with our cfg.json; refused in
    one line when it computes something our SAEs cannot."""
    where = folder / CONFIG_FILE
    meta = cfg.get("metadata") or cfg.get("meta") or {}  # "meta" in 6.0 release candidates

    def field(key):  # metadata block (>= 6.0) or top level (older files)
        return meta[key] if key in meta else cfg.get(key)

    arch, norm = _supported(cfg, where, field("hook_head_index"))
    d, M = cfg["d_in"], cfg["d_sae"]
    cls = ARCHITECTURES[TO_OURS[arch]]
    settings = sae_config(
        cls.Config.architecture, num_latents=M, **cls.fields_from_saelens(cfg, str(where))
    )
    tensors, weights, file_tensors = _read_weights(folder, cls.disk_shapes(settings, d), d, M)
    folded = _fold(
        tensors,
        file_tensors.get("scaling_factor"),
        arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"),
        _input_scale(folder, _NORMALIZE[norm]),
    )
    native = {
        **stored_settings(settings, d),
        "d_sae": M,
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
        "dtype": dtype_name(tensors["W_dec"].dtype),
        "metadata": imported_metadata(
            NAME,
            field("hook_name"),
            to_ours(field("hook_name")),
            field("model_name"),
            field("dataset_path"),
            field("context_size"),
        ),
    }
    carried = meta.get("sae_cfg")
    if isinstance(carried, dict) and not folded and _agrees(carried, cfg):
        native = carried  # a file we wrote: restore our cfg exactly
    return StoredSAE(native, tensors, folder, NAME, weights)


def _supported(cfg: dict, where: Path, head_index: int | None) -> tuple[str, str]:
    """(SAELens architecture, normalize_activations) of a cfg.json whose SAE we can read
    (pre-6.0 topk files say standard with activation_fn topk); else one line saying why not."""
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    if arch == "standard" and act == "topk":
        arch = "topk"
    elif act not in (None, "relu", "topk"):
        raise ConfigError(
            f"{where}: activation function {act!r} is not supported; SAEs with relu or topk are"
        )
    if arch not in TO_OURS:
        raise ConfigError(
            f"{where}: architecture {arch!r} is not supported; SAELens SAEs of architecture "
            f"{', '.join(sorted(TO_OURS))} are"
        )
    if cfg.get("reshape_activations") not in (None, "none") or head_index is not None:
        raise ConfigError(
            f"{where}: per-head (hook_z) SAEs are not supported; residual, MLP and attention "
            "output SAEs are"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in _NORMALIZE:
        raise ConfigError(
            f"{where}: normalize_activations {norm!r} (a per-token normalisation) is not supported; "
            "none and expected_average_only_in are"
        )
    missing = [k for k in ("d_in", "d_sae") if not isinstance(cfg.get(k), int)]
    if missing:
        raise ConfigError(
            f"{where}: no integer {', '.join(missing)}; not a complete SAELens config"
        )
    return arch, norm


def _read_weights(
    folder: Path, shapes: dict[str, tuple[int, ...]], d: int, M: int
) -> tuple[dict[str, torch.Tensor], Path, dict[str, torch.Tensor]]:
    """(the SAE's tensors, the weights file, every tensor in it): those of ``shapes`` (our
    architecture's, e.g. W_enc [d, M], W_dec [M, d], b_enc [M], b_dec [d]), each checked."""
    weights = folder / WEIGHTS_FILE
    file_tensors = read_tensors(weights)
    for name, shape in shapes.items():
        got = tuple(file_tensors[name].shape) if name in file_tensors else None
        if got != shape:
            raise ConfigError(
                f"{weights}: {name} has shape {got}, cfg.json says {shape} (d_in {d}, d_sae {M})"
            )
    return {name: file_tensors[name] for name in shapes}, weights, file_tensors


def _agrees(carried: dict, cfg: dict) -> bool:
    try:
        expected = saelens_cfg(carried)
    except (ConfigError, KeyError):
        return False
    return all(expected.get(k) == cfg.get(k) for k in _CORE)


def _input_scale(folder: Path, norm: str) -> float | None:
    """The constant the SAE's inputs were multiplied by, if any."""
    if norm == "none":
        return None
    path = folder / SCALER_FILE
    if not path.is_file():
        raise ConfigError(
            f"{folder / CONFIG_FILE}: normalize_activations is expected_average_only_in, but the "
            f"scale it needs is not stored ({SCALER_FILE} with scaling_factor is missing)"
        )
    s = read_json(path).get("scaling_factor")
    if s is None:  # SAELens writes null when it never scaled the inputs
        return None
    if not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
        raise ConfigError(f"{path}: scaling_factor {s!r} is not a positive number")
    return float(s)


@torch.no_grad()
def _fold(
    t: dict[str, torch.Tensor],
    scaling_factor: torch.Tensor | None,
    rescale_by_decoder_norm: bool,
    input_scale: float | None,
) -> bool:
    """Fold SAELens's extra scalings into W_enc, b_enc, W_dec, b_dec (in float32); True if any."""
    todo = (
        (scaling_factor is not None and not torch.all(scaling_factor == 1))
        or rescale_by_decoder_norm
        or input_scale is not None
    )
    if not todo:
        return False
    for name in list(t):
        t[name] = t[name].float()
    if scaling_factor is not None:  # z * sf decoded by W_dec == z decoded by sf[:, None] * W_dec
        t["W_dec"] = t["W_dec"] * scaling_factor.float()[:, None]
    if rescale_by_decoder_norm:  # latents measured along unit decoder rows
        n = t["W_dec"].norm(dim=1)
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * n, t["b_enc"] * n, t["W_dec"] / n[:, None]
    if input_scale is not None:  # the SAE read x * s and reconstructed x * s
        s = input_scale
        t["W_enc"], t["W_dec"], t["b_dec"] = t["W_enc"] * s, t["W_dec"] / s, t["b_dec"] / s
    return True
