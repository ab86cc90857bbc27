"""The expert library on disk: manifest, files, stacking.

Imports ``core``, ``data``, ``models`` and ``experts``.
"""
