"""LoRA experts and PHATGOOSE gates at a model's sites, stacked on an expert axis.

Imports ``core``, ``data`` and ``models``.
"""
