"""Training and evaluation data: examples and batching, task sources, the miniature world, and the
builders of P3, FLAN and BIG-bench.

Imports ``core``.
"""
