"""Zero-shot evaluation and validation: the evaluator, metrics, reports and the paper's table.

Imports ``core``, ``data``, ``models``, ``experts``, ``library`` and ``routing``.
"""
