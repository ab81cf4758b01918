"""Stage 1, text: corpora, datasets and how text becomes token ids.

- ``text``: loading a dataset (built-in, local files, hub), tokenizing, packing contexts.
- ``corpus``, ``english_corpus``: the built-in corpora (``builtin:python-docs``,
  ``builtin:english-prose``), held-out splits by hash.
- ``prompt_format``: prompts to token ids, plain or in a chat model's template.

Imports only the sides (``sae.config``, ``sae.errors``, ``sae.atomic_io``, ``sae.hub``,
``sae.distributed``): no model, no torch module of ours.
"""
