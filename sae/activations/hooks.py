"""Hook points: what the names mean, how they resolve on any HF decoder model, and how
activations are captured in a forward pass that stops after the deepest hook.

Names follow the model's own modules, relative to its decoder-layer list:

* ``layers.N``            residual stream after decoder layer N (the layer's output)
* ``layers.N.resid_pre``  residual stream entering layer N (a forward pre-hook)
* ``layers.N.<sub>``      output of a sub-module of layer N, e.g. ``layers.N.mlp``,
                          ``layers.N.self_attn``; ``attn`` and ``mlp`` are accepted for
                          whatever the family calls them (GPT-2 ``attn``, NeoX ``attention``,
                          Falcon ``self_attention``).

A layer or sub-module may return a tensor (recent transformers) or a tuple whose first
element is the hidden state (older ones, attention modules); both are handled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sae.errors import ConfigError
from sae.models.loading import decoder_layers

# Generic sub-module names -> what the families call them.
ALIASES = {
    "attn": ("self_attn", "attn", "attention", "self_attention"),
    "mlp": ("mlp", "feed_forward", "ffn"),
}


@dataclass(frozen=True)
class HookPoint:
    name: str  # as written in the config, e.g. "layers.16.mlp"
    layer: int  # decoder layer index
    module: nn.Module  # module whose output (or input, when pre) is captured
    pre: bool = False  # capture the module's input instead of its output


def attach(point: HookPoint, fn) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn(value)`` on the point's activation [B, T, d] in every forward.

    If fn returns a tensor, it replaces the value; a tuple output keeps its other elements
    and a pre-hook keeps the other arguments, so the next module sees the same types as
    without the hook. If fn returns None, the value is left alone.
    """
    if point.pre:

        def pre_hook(_m, args, kwargs):
            new = fn(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_m, _args, output):
        new = fn(output[0] if isinstance(output, (tuple, list)) else output)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return point.module.register_forward_hook(hook)


def _syntax_help(n_layers: int, layer: nn.Module) -> str:
    subs = ", ".join(name for name, _ in layer.named_children())
    return (
        f"valid: layers.N, layers.N.resid_pre or layers.N.<sub-module> with N in 0..{n_layers - 1} "
        f"and sub-modules {subs}"
    )


def resolve_hook(model: nn.Module, name: str) -> HookPoint:
    """The HookPoint that ``name`` means on ``model``; ConfigError naming the valid ones."""
    _, layers = decoder_layers(model)
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != "layers" or not re.fullmatch(r"0|[1-9][0-9]*", parts[1]):
        raise ConfigError(
            f"hooks: {name!r} is not a hook point; {_syntax_help(len(layers), layers[0])}"
        )
    index = int(parts[1])
    if index >= len(layers):
        raise ConfigError(
            f"hooks: layer {index} in {name!r} is out of range; this model has layers 0..{len(layers) - 1}"
        )
    layer, rest = layers[index], parts[2:]
    if not rest:
        return HookPoint(name, index, layer)
    if rest == ["resid_pre"]:
        return HookPoint(name, index, layer, pre=True)
    children = dict(layer.named_children())
    first = next((c for c in (rest[0], *ALIASES.get(rest[0], ())) if c in children), None)
    try:
        if first is None:
            raise AttributeError(rest[0])
        module = layer.get_submodule(".".join([first, *rest[1:]]))
    except AttributeError:
        raise ConfigError(
            f"hooks: {name!r} names no sub-module of layer {index}; "
            f"{_syntax_help(len(layers), layer)}"
        ) from None
    return HookPoint(name, index, module)


def resolve_hooks(model: nn.Module, names: list[str]) -> list[HookPoint]:
    if not names:
        raise ConfigError("hooks: no hook points given; e.g. hooks: [layers.2]")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"hooks: {duplicates[0]!r} is listed twice")
    return [resolve_hook(model, n) for n in names]


class _StopForward(BaseException):
    """Raised by the last hook to fire: the rest of the model never runs. A BaseException,
    so that an ``except Exception`` inside model code cannot swallow it."""


class ActivationCapture:
    """Records each hook point's activation in one forward pass::

        capture = ActivationCapture(model, points)
        acts = capture.run(input_ids=ids)   # {name: [B, T, d]}

    Hooks exist only while ``run`` executes, so the model behaves normally between calls
    (a paused harvester never affects another forward of the same model). With
    ``stop_early`` the hook that completes the set raises a private exception, caught in
    ``run``, so layers after the deepest hook point and the LM head never run.
    """

    def __init__(self, model: nn.Module, points: list[HookPoint], stop_early: bool = True):
        self.model, self.points, self.stop_early = model, points, stop_early

    def run(self, **inputs) -> dict[str, torch.Tensor]:
        """One forward pass; returns {hook name: activation [B, T, d]} in the model's dtype."""
        return self.run_with_output(**inputs)[0]

    @torch.no_grad()
    def run_with_output(self, **inputs) -> tuple[dict[str, torch.Tensor], Any]:
        """``run``, and the model's output (``.logits`` ...): None when the forward stopped early."""
        acts: dict[str, torch.Tensor] = {}
        output = None

        def record(name: str, value: torch.Tensor) -> None:
            done = len(acts) + 1 == len(self.points)
            # Clone unless the forward stops right here: later in-place ops of the model
            # (Falcon adds attention into the MLP output) must not change what was recorded.
            acts[name] = value.detach() if (done and self.stop_early) else value.detach().clone()
            if done and self.stop_early:
                raise _StopForward

        handles = []
        try:
            for p in self.points:
                handles.append(attach(p, lambda value, name=p.name: record(name, value)))
            output = self.model(**inputs, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [p.name for p in self.points if p.name not in acts]
        if missing:
            raise ConfigError(
                f"hooks: {', '.join(missing)} did not run in the forward pass; "
                "choose modules that every forward runs"
            )
        return acts, output


class EditActivation:
    """Context manager: while active, ``fn(activation)`` replaces a hook point's value in
    every forward of the model (the spliced SAE, steering, ablation)::

        with EditActivation(model, point, lambda h: sae(h)):
            logits = model(input_ids=ids).logits

    fn maps [B, T, d] -> [B, T, d]. A tuple output keeps its other elements, so the module
    after the edit sees the same types as without it.
    """

    def __init__(self, model: nn.Module, point: HookPoint, fn):
        self.point, self.fn = point, fn
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> EditActivation:
        self._handle = attach(self.point, self.fn)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
