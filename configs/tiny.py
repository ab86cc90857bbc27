"""A tiny random model trained for a few steps: tests and smoke runs, seconds on a CPU.

    goose-train experts --config configs/tiny.py --data a.jsonl b.jsonl \
        --library /tmp/lib --workdir /tmp/run
"""

from goose_jax.training.program import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        steps=6,
        gate_steps=4,
        lr=5e-3,
        warmup_ratio=0.34,  # 2 warm-up steps of 6
        micro_batch=2,
        grad_accum=2,
        seed=42,
        max_input_length=24,
        max_target_length=8,
        eval_every=3,
        checkpoint_every=2,
        log_every=1,
        keep_checkpoints=2,
        lora_rank=4,
        base_model="random:tiny",
        tokenizer="byte",
        fast_compile=True,
    )
