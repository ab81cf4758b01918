"""sae: sparse autoencoders on the activations of local language models.

Start at ``sae.config`` (what a run is), ``sae.models`` (loading a model) and
``sae.data`` (loading and packing text).
"""

__version__ = "0.1.0"
