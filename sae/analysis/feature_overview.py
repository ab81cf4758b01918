"""An SAE's features at a glance, as JSON-able data: the scan's summary, the histogram of
feature density, and the records of some features (those asked for, else the first ones
by density, largest activation or mean activation).

    target, stats = open_target_with_stats("checkpoints/demo", StatsSettings(tokens=500_000))
    overview = feature_overview(target, stats, sort="max", limit=10)
    overview["features_shown"][0]["top_examples"]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sae.analysis.feature_stats import (
    FeatureStats,
    check_feature,
    density_histogram,
    feature_record,
    token_decoder,
)
from sae.analysis.target import Target
from sae.errors import ConfigError

# Orders of the listing without chosen features: each maps the statistics to a score [M],
# largest first.
SORTS: dict[str, Callable[[FeatureStats], torch.Tensor]] = {
    "density": lambda s: s.density,
    "max": lambda s: s.act_max.double(),
    "mean": lambda s: s.mean_act.double(),
}


def feature_overview(
    target: Target,
    stats: FeatureStats,
    features: Sequence[int] = (),
    sort: str = "density",
    limit: int = 20,
) -> dict:
    """What ``stats`` (of ``target``'s SAE) says about its features:

    {"sae", "hook", "model": where the SAE is and what it reads; "features": how many;
    "tokens", "contexts": what was scanned; "density_histogram": ``density_histogram``;
    "sorted_by": ``sort``, or None when ``features`` are given; "features_shown": the
    ``feature_record`` of each of ``features``, else of the ``limit`` first by ``sort``}.
    """
    for f in features:
        check_feature(f, stats.num_features)
    if not features and sort not in SORTS:
        raise ConfigError(f"sort: {sort!r} is not valid; use one of {', '.join(SORTS)}")
    decode = token_decoder(target.tokenizer)
    shown = list(features) or SORTS[sort](stats).argsort(descending=True)[:limit].tolist()
    return {
        "sae": str(target.folder),
        "hook": target.hook,
        "model": target.cfg.model.name_or_path,
        "features": stats.num_features,
        "tokens": stats.tokens,
        "contexts": stats.contexts,
        "density_histogram": density_histogram(stats),
        "sorted_by": None if features else sort,
        "features_shown": [feature_record(stats, f, decode) for f in shown],
    }
