"""PHATGOOSE's FLAN setting: 166 experts on T5.1.1 XL LM-adapted (PHATGOOSE.md section 7).

The optimiser, schedule, batch, lengths, rank and precision are those of the T0 held-in setting
(``t0_heldin.py``, which explains each value). The 166 experts are the release's pool
(``goose_jax/assets/flan_pool.json``, built by ``goose-data flan --pool release``): 43 P3
datasets (the 36 T0 held-in ones and seven more), 44 Flan 2021 and 4 Dialog tasks, and 75
Natural Instructions v2 task categories; their names come with the data, so ``expert_names`` is
empty here and experts are named after their data files.
``num_experts`` checks that all 166 are given. Validation is the release's, as in the T0
setting: every FLAN expert by ROUGE-L at its dataset's generation length, the P3 ones by theirs.
"""

import dataclasses
import importlib.util
import os

from goose_jax.training.program import TrainConfig


def _t0_heldin():
    # Loaded by path: config files are read by goose-train from anywhere, not as a package.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "t0_heldin.py")
    spec = importlib.util.spec_from_file_location("goose_config_t0_heldin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> TrainConfig:
    return dataclasses.replace(_t0_heldin().get_config(), num_experts=166, expert_names=())
