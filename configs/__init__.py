"""Experiment configs for ``goose-train --config configs/NAME.py``.

Each file defines ``get_config()`` returning a ``goose_jax.training.program.TrainConfig``; override
any
field on the command line with ``--set key=value``.

    t0_heldin.py   the paper's T0 held-in setting: 36 experts on T5-XL LM-adapted
    flan.py        the paper's FLAN setting: 166 experts on T5-XL LM-adapted
    tiny.py        a few steps of a tiny random model, for tests and smoke runs
"""
