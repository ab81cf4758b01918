"""Stage 7, what the features mean: statistics, logit effects, search, the report
(docs/design.md §6).

- ``target``: the SAE under analysis with its model, hook and data; cached statistics;
  the top tokens beside listed feature ids.
- ``feature_stats``: streamed per-feature statistics, on disk.
- ``feature_overview``: the features at a glance (density summary, chosen records).
- ``logit_effects``: promoted and suppressed tokens; nearest features.
- ``feature_search``: contrast search and search by text.
- ``search_results``: their results as JSON-able listings with top tokens.
- ``report`` (+ ``report_assets/``): the self-contained HTML report.
- ``target_report``: what the report of a ``Target`` shows (header, contrast columns, cards).

May import stages 1-6, ``sae.formats`` and the sides.
"""
