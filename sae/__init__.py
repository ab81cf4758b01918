"""sae: sparse autoencoders on the activations of local language models.

Start at ``sae.config`` (what a run is), ``sae.models`` (loading a model) and
``sae.data`` (loading and packing text). The analyzer's functions are importable from
here too::

    from sae import open_target, cached_feature_stats, contrast_search, build_report

(loaded on first use, so ``import sae`` stays fast for the command-line tools).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "load_sae": "sae.formats",
    "read_sae": "sae.formats",
    "convert": "sae.formats",
    "open_target": "sae.analysis_target",
    "cached_feature_stats": "sae.analysis_target",
    "StatsSettings": "sae.feature_stats",
    "FeatureStats": "sae.feature_stats",
    "compute_feature_stats": "sae.feature_stats",
    "load_feature_stats": "sae.feature_stats",
    "feature_record": "sae.feature_stats",
    "logit_effects": "sae.logit_effects",
    "nearest_features": "sae.logit_effects",
    "contrast_search": "sae.feature_search",
    "features_in_text": "sae.feature_search",
    "read_prompts": "sae.feature_search",
    "build_report": "sae.report",
    "run_summary": "sae.report",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'sae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
