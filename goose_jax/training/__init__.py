"""Training: the train config, programs and steps, the loop and its checkpoints.

Imports every package above it, up to ``evaluation``.
"""
