"""PHATGOOSE's FLAN setting: 166 experts on T5.1.1 XL LM-adapted (PHATGOOSE.md section 7).

The optimiser, schedule, batch, lengths, rank and precision are those of the T0 held-in setting
(``t0_heldin.py``, which explains each value). The 166 datasets are the 36 T0 held-in ones, 36
Flan 2021 tasks, 75 Natural Instructions v2 task categories and 19 more from the Open-Orca/FLAN
release (zero-shot templates only); their names come with the FLAN data module, so
``expert_names`` is empty here and experts are named after their data files.
``num_experts`` checks that all 166 are given.
"""

from goose_jax.training import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        steps=1000,
        gate_steps=100,
        lr=5e-3,
        weight_decay=0.0,
        eps=1e-8,
        b1=0.9,
        b2=0.999,
        warmup_ratio=0.06,
        clip=1.0,
        micro_batch=8,
        grad_accum=128,
        seed=42,
        max_input_length=512,
        max_target_length=512,
        eval_every=100,
        checkpoint_every=100,
        log_every=10,
        lora_rank=16,
        lora_scale=None,
        lora_init_std=0.01,
        base_model="google/t5-xl-lm-adapt",
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        tokenizer="base",
        num_experts=166,
    )
