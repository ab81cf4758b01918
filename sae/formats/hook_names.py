"""Hook point names: ours, TransformerLens's (SAELens files) and module paths (sparsify files).

Ours are relative to the decoder-layer list (``sae.activations.hooks``): ``layers.N`` (residual stream
after layer N), ``layers.N.resid_pre``, ``layers.N.<sub-module>``.

* SAELens names TransformerLens hook points. For a Llama-family model they map as
  ``blocks.N.hook_resid_post`` -> ``layers.N``, ``blocks.N.hook_resid_pre`` ->
  ``layers.N.resid_pre``, ``blocks.N.hook_mlp_out`` -> ``layers.N.mlp`` and
  ``blocks.N.hook_attn_out`` -> ``layers.N.attn`` (the outputs of the MLP and attention
  modules, before they are added to the residual stream). Some SAELens files name the Hugging
  Face module instead (``model.layers.N``); those map like sparsify's.
* sparsify names modules relative to the model's base model: ``layers.N`` is the output of
  decoder layer N (``hidden_states[N + 1]``), which is our ``layers.N``; GPT-2 calls the list
  ``h`` (``h.N`` -> ``layers.N``); ``embed_tokens`` is what enters layer 0 (``layers.0.resid_pre``).

Hook points with no equivalent here (``hook_z``, ``hook_resid_mid``, per-head hooks, the
embedding) map to None; the caller says so in one line and asks for ``--hook``.
"""

from __future__ import annotations

import re

# TransformerLens hook -> the suffix of ours ("" for the layer's own output)
_TL_TO_OURS = {
    "hook_resid_post": "",
    "hook_resid_pre": ".resid_pre",
    "hook_mlp_out": ".mlp",
    "hook_attn_out": ".attn",
}
_OURS_TO_TL = {
    "": "hook_resid_post",
    "resid_pre": "hook_resid_pre",
    "mlp": "hook_mlp_out",
    "attn": "hook_attn_out",
    "self_attn": "hook_attn_out",
    "attention": "hook_attn_out",
    "self_attention": "hook_attn_out",
}
# What decoder-layer lists are called in Hugging Face models, as a module path from the
# model or its base model: layers (Llama, Mistral, Qwen, Gemma, NeoX), h (GPT-2), blocks.
_LAYER_LIST = r"(?:(?:model|transformer|gpt_neox|base_model)\.)*(?:layers|h|blocks|decoder\.layers)"
_MODULE_PATH = re.compile(rf"{_LAYER_LIST}\.(0|[1-9][0-9]*)((?:\.[A-Za-z_][A-Za-z0-9_]*)*)")
_TL = re.compile(r"blocks\.(0|[1-9][0-9]*)\.(hook_[a-z_]+)")

SUPPORTED = (
    "layers.N[.resid_pre|.mlp|.attn|.<sub-module>] (ours), "
    "blocks.N.hook_resid_post|hook_resid_pre|hook_mlp_out|hook_attn_out (SAELens), "
    "layers.N / h.N / model.layers.N[.<sub-module>] (sparsify, Hugging Face modules)"
)


def to_ours(name: str | None) -> str | None:
    """Our name for a hook point named by us, SAELens or sparsify; None if it has no equivalent."""
    if not name:
        return None
    m = _TL.fullmatch(name)
    if m:
        suffix = _TL_TO_OURS.get(m.group(2))
        return None if suffix is None else f"layers.{m.group(1)}{suffix}"
    if re.fullmatch(r"(?:model\.)?embed_tokens", name):  # the embedding's output enters layer 0
        return "layers.0.resid_pre"
    m = _MODULE_PATH.fullmatch(name)
    if m and ".hook_" not in name:  # other TransformerLens hooks (hook_z, ...) have no module
        return f"layers.{m.group(1)}{m.group(2)}"
    return None


def to_transformer_lens(name: str) -> str:
    """The TransformerLens name SAELens expects for our hook point; ours unchanged where
    TransformerLens has no such hook (a sub-module of the MLP, say)."""
    m = re.fullmatch(r"layers\.(0|[1-9][0-9]*)(?:\.(.+))?", name)
    if m is None:
        return name
    hook = _OURS_TO_TL.get(m.group(2) or "")
    return f"blocks.{m.group(1)}.{hook}" if hook else name


def to_module_path(name: str) -> str:
    """sparsify's folder name for our hook point: the module whose output it is, relative
    to a Llama-family base model (``layers.N.resid_pre`` is layer N-1's output, or the
    embedding's for N = 0)."""
    m = re.fullmatch(r"layers\.(0|[1-9][0-9]*)(?:\.(.+))?", name)
    if m is None:
        return name
    n, rest = int(m.group(1)), m.group(2)
    if rest == "resid_pre":
        return f"layers.{n - 1}" if n > 0 else "embed_tokens"
    if rest == "attn":
        return f"layers.{n}.self_attn"
    return name
