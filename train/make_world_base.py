"""Pre-trains the miniature world's base T5 and writes it into the package.

    python train/make_world_base.py --overwrite           # about 6 min on 2 idle CPU cores
    python train/make_world_base.py --steps 50 --out DIR  # a quick try

The result (``goose_jax/assets/world_base``: HF-format ``config.json`` + ``model.safetensors``
in bfloat16, under 5 MB) is what ``goose-demo`` loads. The run is deterministic for a given
``--seed`` on a given machine; it resumes from its work directory if interrupted (by default a
folder in the system's temporary directory named after the run's settings).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

GOOSE_TOOL = "train/make_world_base.py"  # core.tool_process: Ctrl-C is one line from the start

import goose_jax as gj
from goose_jax.core.outputs import check_apart
from goose_jax.core.tensorfile import write_atomic
from goose_jax.core.tool import run_tool
from goose_jax.data import world
from goose_jax.data.batching import Batcher
from goose_jax.models.t5.hf import check_hf_folder, save_hf_t5
from goose_jax.training import program as training
from goose_jax.training.loop import train_loop

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "goose_jax", "assets", "world_base")


def base_config(vocab_size: int) -> gj.T5Config:
    """The miniature base: a T5 v1.1-style model, 4+4 blocks of width 128."""
    return gj.T5Config(vocab_size=-(-vocab_size // 64) * 64, d_model=128, d_kv=32, d_ff=256,
                       num_heads=4, num_encoder_layers=4, num_decoder_layers=4,
                       relative_attention_num_buckets=16, relative_attention_max_distance=32,
                       feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                       scale_decoder_outputs=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="train/make_world_base.py",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--workdir", help="checkpoints and metrics (default: a folder in the "
                    "temporary directory named after the settings, so a rerun resumes)")
    ap.add_argument("--fast-compile", action="store_true",
                    help="compile with XLA's backend optimisation off (quick tries, tests)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a model already in --out (the shipped base, by default)")
    ap.set_defaults(run=_run)
    return run_tool("train/make_world_base.py", ap, argv,
                    interrupted_hint="rerun the same command to resume")


def _run(args: argparse.Namespace) -> None:
    import jax
    import numpy as np

    workdir = args.workdir or os.path.join(
        tempfile.gettempdir(), f"goose_world_pretrain_seed{args.seed}_batch{args.batch}_"
        f"lr{args.lr}")
    # Writing the model (--overwrite replaces the folder) must not remove the checkpoints, nor
    # the checkpoints land in the model's folder.
    check_apart({"--out": args.out}, {"--workdir": workdir})
    check_hf_folder(args.out, overwrite=args.overwrite)  # before the pre-training, not after

    tok = world.WorldTokenizer()
    cfg = base_config(tok.vocab_size)
    # Warm-up length and data order do not depend on --steps, so a shorter run is a prefix of a
    # longer one.
    tcfg = training.TrainConfig(steps=args.steps, lr=args.lr,
                                warmup_ratio=min(0.5, 40 / args.steps), clip=1.0,
                                micro_batch=args.batch, grad_accum=1, seed=args.seed,
                                max_input_length=24, max_target_length=24, eval_every=0,
                                checkpoint_every=500, log_every=50, tokenizer="byte",
                                fast_compile=args.fast_compile)
    source = world.PretrainSource(size=1_000_000, seed=args.seed)
    batcher = Batcher.from_config(source, tok, tcfg, vocab_size=cfg.vocab_size)
    program = training.Program("full", cfg, tcfg, args.steps, many=False)
    params = gj.init_params(cfg, args.seed)
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    print(f"world base: {n:,} parameters; {args.steps} steps of {args.batch} documents")
    t0 = time.perf_counter()
    state, history, _ = train_loop(program, None, None, params, [batcher], workdir,
                                   desc="pre-train")
    print(f"pre-training took {time.perf_counter() - t0:.0f}s; last loss "
          f"{history.get('loss')}")
    params16 = jax.tree.map(lambda x: np.asarray(x, dtype=jax.numpy.bfloat16), state.trainable)
    paths = save_hf_t5(cfg.replace(dtype=gj.DTypePolicy("bfloat16")), params16, args.out,
                       overwrite=args.overwrite)
    write_atomic(os.path.join(args.out, "world.json"), json.dumps(
        {"seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
         "final_loss": history.get("loss"), "vocabulary_size": tok.vocab_size}, indent=2) + "\n")
    sizes = sum(os.path.getsize(p) for p in paths)
    print(f"wrote {args.out} ({sizes / 1e6:.2f} MB)")


if __name__ == "__main__":
    raise SystemExit(main())
