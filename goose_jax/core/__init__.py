"""The foundation: errors, tensor files, trees, sharding rules, distributed runtime, output rules
and the tool wrapper.

Imports nothing else of goose_jax.
"""
