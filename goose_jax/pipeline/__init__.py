"""The runs the tools and the paper's scripts share: training runs, zero-shot runs, prototypes and
the demo.

Imports every package above it.
"""
