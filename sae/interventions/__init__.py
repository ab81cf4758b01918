"""Stage 8, changing behaviour through features: edits while the model runs, patching,
attribution, and the fix test that measures an edit (docs/design.md §6).

- ``edits``: ablate, clamp, scale, steer, reconstruct.
- ``continuations``: continuations with and without an edit, side by side.
- ``patching``: activation patching over layers, positions and heads; its heatmap.
- ``attribution``: activation x gradient attribution of a metric to features.
- ``fix_test``, ``scorers``: the fix test and the scorers it can use.
- ``edit_picks``: the features a fix test edits (given, or the top of a ranking).

May import every stage below it, ``sae.formats`` and the sides.
"""
