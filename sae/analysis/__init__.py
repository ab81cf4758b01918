"""Stage 7, what the features mean: statistics, logit effects, search, the report
(docs/design.md §6).

- ``target``: the SAE under analysis with its model, hook and data; cached statistics.
- ``feature_stats``: streamed per-feature statistics, on disk.
- ``logit_effects``: promoted and suppressed tokens; nearest features.
- ``feature_search``: contrast search and search by text.
- ``report`` (+ ``report_assets/``): the self-contained HTML report.

May import stages 1-6, ``sae.formats`` and the sides.
"""
