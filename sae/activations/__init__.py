"""Stage 3, activations: from a model and text to shuffled batches of activation vectors.

- ``hooks``: hook-point names, resolution on any family, capture with an early stop.
- ``harvest``: contexts in, per-hook activation rows out (special tokens dropped).
- ``cache``: activation shards on disk, with a manifest; resume and repair.
- ``buffer``: the shuffling buffer.
- ``stream``: the wiring, config -> data -> harvester (-> cache) -> buffer.

May import ``sae.data``, ``sae.models`` and the sides.
"""
