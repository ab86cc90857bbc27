"""Routing among experts: the top-k formula, its backends, expert parallelism, every method of the
paper and retrieval.

Imports the packages above it: ``core``, ``data``, ``models``, ``experts``, ``library``.
"""
