"""Stage 5, measuring an SAE: FVU, L0, dead and dense fractions, and what splicing it
into the model costs (docs/design.md §3).

- ``metrics``: FVU, L0, dead, dense over an evaluation set.
- ``splice``: CE loss recovered, delta LM loss, KL with the SAE spliced in.
- ``lm_metrics``: next-token loss and unigram entropy.

May import stages 1-4 (data, models, activations, architectures), ``sae.formats`` and the sides.
"""
