"""Editing a model's activations through SAE features, while it runs (docs/design.md §6).

    with intervene(model, [Edit(sae, "layers.2", [Ablate([12, 345]), Steer(99, 8.0)])]):
        out = model.generate(ids, max_new_tokens=40)      # KV cache on: every position edited

Each edit is applied at every position of every forward pass while the context is open:
prompt tokens, and each generated token as the cached decoding step computes it. With
z = sae.encode(h) and d_f = W_dec[f]:

    Ablate(fs)           h - z_f(h) d_f            (the feature removed, SAE error kept)
    Clamp(fs, c)         h + (c - z_f(h)) d_f      (the feature pinned to c)
    Scale(fs, s)         h + (s - 1) z_f(h) d_f    (the feature multiplied by s)
    Steer(f, a)          h + a d_f                 (or a given direction instead of d_f)
    Reconstruct(error)   sae(h), plus h - sae(h) when error=True

Several edits at one hook are computed from the same z (the activation as it arrived),
and their changes add up (on top of the reconstruction, if one is asked for); several
``Edit``s may name several SAEs and hooks (two at one hook run in order, the second
seeing the first's output). The edit
is computed in float32 and cast back to the model's dtype. Hooks are removed when the
context exits, also on an exception. No edits: no hook is attached, so outputs are
bit-identical to the plain model.

``intervene(..., skip_tokens=special_token_ids(tokenizer))`` leaves the positions of those
tokens alone (the context's start token, a chat template's turn markers): the SAE never
saw them in training, and the first position's activation is usually huge (an attention
sink), so the SAE's features there are noise, and editing them changes every later
position. ``compare_continuations`` (generate) and ``fix_test`` always pass the tokenizer's
special tokens.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from sae.activations.hooks import attach, resolve_hook
from sae.architectures import SparseAutoencoder
from sae.errors import ConfigError


@dataclass(frozen=True)
class _OnFeatures:
    """An edit of listed features; ``features`` may be given as one int or a sequence."""

    features: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "features", _as_tuple(self.features))


@dataclass(frozen=True)
class Ablate(_OnFeatures):
    pass


@dataclass(frozen=True)
class Clamp(_OnFeatures):
    value: float


@dataclass(frozen=True)
class Scale(_OnFeatures):
    factor: float


@dataclass(frozen=True)
class Steer:
    """Add ``alpha`` times feature f's decoder row, or times ``direction`` [d] if given."""

    feature: int | None
    alpha: float
    direction: torch.Tensor | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Reconstruct:
    """Replace the activation by the SAE's reconstruction (error=True adds the error term
    back as its own term, which changes nothing numerically but makes it a separate node
    for gradients)."""

    error: bool = False


FeatureEdit = Ablate | Clamp | Scale | Steer | Reconstruct


def _as_tuple(features: Sequence[int] | int) -> tuple[int, ...]:
    return (int(features),) if isinstance(features, int) else tuple(int(f) for f in features)


@dataclass
class Edit:
    """Edits applied through one SAE at one hook point."""

    sae: SparseAutoencoder
    hook: str
    edits: list[FeatureEdit]

    def check(self) -> None:
        M = self.sae.cfg.num_latents
        for e in self.edits:
            feats = (
                e.features
                if isinstance(e, (Ablate, Clamp, Scale))
                else ((e.feature,) if isinstance(e, Steer) and e.feature is not None else ())
            )
            for f in feats:
                if not 0 <= f < M:
                    raise ConfigError(
                        f"feature {f} is out of range; the SAE at {self.hook} has features 0..{M - 1}"
                    )
            if (
                isinstance(e, Steer)
                and e.direction is not None
                and e.direction.shape != (self.sae.d_in,)
            ):
                raise ConfigError(
                    f"steering direction has shape {tuple(e.direction.shape)}; the SAE at {self.hook} "
                    f"needs ({self.sae.d_in},)"
                )
            if isinstance(e, Steer) and (e.feature is None) == (e.direction is None):
                raise ConfigError("Steer: give a feature or a direction, not both or neither")

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """The edited activation for h [..., d] (same shape and dtype)."""
        sae = self.sae
        x = h.reshape(-1, h.shape[-1]).to(sae.W_dec.dtype)
        W = sae.W_dec
        needs_z = any(not isinstance(e, Steer) for e in self.edits)
        z = sae.encode(x) if needs_z else None  # [n, M]
        out = x.float()
        for e in self.edits:  # a reconstruction replaces the base that the other edits change
            if isinstance(e, Reconstruct):
                recon = sae.decode(z)
                out = recon.float() + (x - recon).float() if e.error else recon.float()
        for e in self.edits:
            if isinstance(e, Steer):
                d = W[e.feature] if e.direction is None else e.direction.to(W)
                out = out + e.alpha * d.float()
            elif not isinstance(e, Reconstruct):
                fs = list(e.features)
                zf = z[:, fs].float()  # [n, F]
                if isinstance(e, Ablate):
                    change = -zf
                elif isinstance(e, Clamp):
                    change = e.value - zf
                else:
                    change = (e.factor - 1.0) * zf
                out = out + change @ W[fs].float()
        return out.to(h.dtype).view(h.shape)


def parse_feature_edits(
    ablate: str | None = None,
    clamp: Sequence[str] = (),
    scale: Sequence[str] = (),
    steer: Sequence[str] = (),
) -> list[FeatureEdit]:
    """Edits from command-line text: ``--ablate 12,345``, ``--clamp 7:10``, ``--scale 7:0.5``,
    ``--steer 99:+8`` (each but --ablate repeatable; FEATURE:NUMBER)."""
    edits: list[FeatureEdit] = []
    if ablate:
        if not re.fullmatch(r"\d+(,\d+)*", ablate.replace(" ", "")):
            raise ConfigError(
                f"--ablate: {ablate!r} is not a list of feature numbers; e.g. --ablate 12,345"
            )
        edits.append(Ablate([int(f) for f in ablate.replace(" ", "").split(",")]))
    for option, items, make in (
        ("--clamp", clamp, Clamp),
        ("--scale", scale, Scale),
        ("--steer", steer, lambda f, v: Steer(f, v)),
    ):
        for item in items:
            m = re.fullmatch(r"\s*(\d+)\s*:\s*([+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)\s*", item)
            if m is None:
                raise ConfigError(f"{option}: {item!r} is not FEATURE:NUMBER; e.g. {option} 99:+8")
            edits.append(make(int(m.group(1)), float(m.group(2))))
    return edits


def read_edits_file(path: str | Path | None) -> list[FeatureEdit]:
    """Edits from ``--edits FILE``: YAML {ablate: [F, ...], clamp: {F: C}, scale: {F: S},
    steer: {F: A}}, every key optional (what the explorer exports); None gives none."""
    if path is None:
        return []
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(
            f"--edits: cannot read {str(path)!r}: {(str(e) or type(e).__name__).splitlines()[0]}"
        ) from None
    kinds = {"ablate", "clamp", "scale", "steer"}
    if not isinstance(spec, dict) or not set(spec) <= kinds:
        raise ConfigError(
            f"--edits: {str(path)!r} must map some of {', '.join(sorted(kinds))} to features; "
            "e.g. {ablate: [12], steer: {99: 8}}"
        )
    ablate = spec.get("ablate") or []
    if not isinstance(ablate, list):
        raise ConfigError(f"--edits: ablate in {str(path)!r} must be a list of features")
    pairs: dict[str, list[str]] = {}
    for kind in ("clamp", "scale", "steer"):
        items = spec.get(kind) or {}
        if not isinstance(items, dict):
            raise ConfigError(f"--edits: {kind} in {str(path)!r} must map features to numbers")
        pairs[kind] = [f"{f}:{v}" for f, v in items.items()]
    return parse_feature_edits(
        ",".join(map(str, ablate)) or None, pairs["clamp"], pairs["scale"], pairs["steer"]
    )


@contextlib.contextmanager
def intervene(
    model: nn.Module, edits: Sequence[Edit], skip_tokens: torch.Tensor | None = None
) -> Iterator[None]:
    """Apply ``edits`` in every forward of ``model`` while the context is open, except at
    positions holding one of ``skip_tokens`` (LongTensor of ids; module docstring)."""
    handles = []
    keep: dict[str, torch.Tensor | None] = {"rows": None}  # this context's current forward only
    try:
        if skip_tokens is not None and any(e.edits for e in edits):
            handles.append(
                model.register_forward_pre_hook(
                    functools.partial(_track_ids, keep, skip_tokens), with_kwargs=True
                )
            )
        for e in edits:
            e.check()
            if not e.edits:
                continue
            point = resolve_hook(model, e.hook)
            handles.append(attach(point, functools.partial(_edit_kept_rows, e, keep)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _track_ids(keep: dict, skip_tokens: torch.Tensor, _module, args, kwargs) -> None:
    """Model pre-hook: which positions of this forward's input_ids [B, T] may be edited."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    keep["rows"] = None if ids is None else ~torch.isin(ids, skip_tokens.to(ids.device))  # [B, T]


def _edit_kept_rows(edit: Edit, keep: dict, h: torch.Tensor) -> torch.Tensor:
    """The edited activation h [B, T, d], with skipped positions left as they were."""
    new = edit.apply(h)
    rows = keep["rows"]
    if rows is None or rows.shape != h.shape[:-1]:  # no ids seen (inputs_embeds): edit everywhere
        return new
    return torch.where(rows[..., None], new, h)


def edited_features(edits: Sequence[Edit]) -> list[int]:
    """The features some edits touch, in order, each once."""
    found = []
    for e in edits:
        found += [e.feature] if isinstance(e, Steer) else list(getattr(e, "features", ()))
    return list(dict.fromkeys(f for f in found if f is not None))


def describe_edit(e: FeatureEdit) -> str:
    """An edit in the words of its command-line option: "ablate 12,345", "clamp 7=10",
    "scale 7x0.5", "steer 99+8" (a clamp or scale of several features names the first)."""
    if isinstance(e, Ablate):
        return "ablate " + ",".join(map(str, e.features))
    if isinstance(e, Clamp):
        return f"clamp {e.features[0]}={e.value:g}"
    if isinstance(e, Scale):
        return f"scale {e.features[0]}x{e.factor:g}"
    if isinstance(e, Steer):
        return f"steer {e.feature}{e.alpha:+g}"
    return type(e).__name__.lower()
