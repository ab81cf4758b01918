"""Stage 8, changing behaviour through features: edits while the model runs, patching,
attribution, and the fix test that measures an edit (docs/design.md §6).

- ``edits``: ablate, clamp, scale, steer, reconstruct.
- ``patching``: activation patching over layers, positions and heads; its heatmap.
- ``attribution``: activation x gradient attribution of a metric to features.
- ``fix_test``, ``scorers``: the fix test and the scorers it can use.

May import every stage below it, ``sae.formats`` and the sides.
"""
