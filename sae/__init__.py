"""sae: sparse autoencoders on the activations of local language models.

Start at ``sae.config`` (what a run is), ``sae.models.loading`` (loading a model) and
``sae.data.text`` (loading and packing text). The analyzer's functions are importable from
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
    "open_target": "sae.analysis.target",
    "cached_feature_stats": "sae.analysis.target",
    "StatsSettings": "sae.analysis.feature_stats",
    "FeatureStats": "sae.analysis.feature_stats",
    "compute_feature_stats": "sae.analysis.feature_stats",
    "load_feature_stats": "sae.analysis.feature_stats",
    "feature_record": "sae.analysis.feature_stats",
    "logit_effects": "sae.analysis.logit_effects",
    "nearest_features": "sae.analysis.logit_effects",
    "contrast_search": "sae.analysis.feature_search",
    "features_in_text": "sae.analysis.feature_search",
    "read_prompts": "sae.analysis.feature_search",
    "build_report": "sae.analysis.report",
    "run_summary": "sae.analysis.report",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'sae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
