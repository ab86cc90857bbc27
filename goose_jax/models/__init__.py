"""The base models: the site / adapter protocol, shared layers (``layers``), scan and remat,
checkpoints, base loading and the family registry.

One sub-package per family (``t5``, ``llama``, ``gemma``); families never import each other.
What the decoder-only families share is ``causal``. Imports ``core`` and ``data`` only.
"""
