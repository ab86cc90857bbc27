"""The base models: the site / adapter protocol, shared layers, scan and remat, checkpoints, base
loading and the family registry.

One sub-package per family (``t5``, ``llama``); families never import each other.
Imports ``core`` and ``data`` only.
"""
