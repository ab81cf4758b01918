"""Stage 3, activations: from a model and text to shuffled batches of activation vectors.

- ``hooks``: hook-point names, resolution on any family, capture with an early stop.
- ``capture``: batches of contexts through the model, each with its hook activations and
  the positions that count (not special tokens, optionally not norm outliers); every
  reader of activations (harvest, feature statistics and search, splice metrics) uses it.
- ``harvest``: contexts in, per-hook activation rows of the kept positions out, for training.
- ``cache``: activation shards on disk, with a manifest; resume and repair.
- ``buffer``: the shuffling buffer.
- ``stream``: the wiring, config -> data -> harvester (-> cache) -> buffer.

May import ``sae.data``, ``sae.models`` and the sides.
"""
