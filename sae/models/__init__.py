"""Stage 2, the language model under study: loading it, and letting it write.

- ``loading``: any causal decoder by folder or hub id, checked (causal, complete, its
  tokenizer fits); its decoder layers.
- ``gguf_source``: GGUF checkpoints converted once into a plain folder.
- ``demo_model`` (+ ``demo_model/``): the small Llama shipped for the demo and the tests.
- ``generation``: reproducible, batched sampling.

May import ``sae.data`` and the sides.
"""
