"""PHATGOOSE's T0 held-in setting (PHATGOOSE.md sections 3, 4 and 7).

36 LoRA experts (rank 16, scale 1/16, every attention and FFN site of encoder and decoder) on
T5.1.1 XL LM-adapted, each trained alone for 1000 steps with AdamW (lr 5e-3, no weight decay,
eps 1e-8), 6% linear warm-up then constant, clipping 1.0, effective batch 1024, inputs and targets
truncated to 512 tokens, seed 42, the frozen base in bf16 with bf16 compute and fp32 trainable
weights. Gates: 100 steps with the same optimiser (6 warm-up steps).

Validation is the release's (``validation_rules="release"``,
``goose_jax.evaluation.release_validation``):
each expert's dataset keeps its metric (rank accuracy; SQuAD, BLEU + ROUGE-L or ROUGE-L for the
generation datasets) and its generation length, each value rounded to 3 decimals.

The micro-batch is memory only (the original used 2 to 32 per dataset); 8 x 128 keeps the
effective batch at 1024. ``base_model`` names the checkpoint; pass the local directory with
``--base`` (nothing is downloaded).
"""

from goose_jax.training.program import TrainConfig

EXPERTS = (
    "agnews", "amazon_polarity", "cosmos_qa", "samsum", "quartz", "ropes", "wiki_bio", "paws",
    "wiki_qa", "social_i_qa", "qasc", "quail", "dream", "wiqa", "quarel", "sciq", "quoref",
    "duorc", "rotten_tomatoes", "yelp_review_full", "common_gen", "gigaword", "xsum",
    "glue_mrpc", "glue_qqp", "commonsense_qa", "cos_e", "wiki_hop", "hotpot_qa", "app_reviews",
    "trec", "multi_news", "imdb", "adversarial_qa", "cnn_dailymail", "dbpedia_14",
)


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
        lora_scale=None,  # 1 / rank
        lora_init_std=0.01,
        base_model="google/t5-xl-lm-adapt",
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        tokenizer="base",
        num_experts=len(EXPERTS),
        expert_names=EXPERTS,
        validation_rules="release",
    )
