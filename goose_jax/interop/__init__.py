"""Experts and checkpoints from elsewhere: PEFT LoRA adapters, the original release's experts and
gates, and the checkpoint conversions of goose-convert.

Imports every package above it, up to ``training``.
"""
