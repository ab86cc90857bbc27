"""``goose-train``: train LoRA experts, PHATGOOSE gates and multitask baselines.

    goose-train expert    --config C --base B --data task.jsonl --library LIB --workdir W
    goose-train experts   --config C --base B --data a.jsonl b.jsonl ... --library LIB --workdir W
                          [--validation a.validation.jsonl b.validation.jsonl ... | none]
    goose-train gate      --config C --base B --data a.jsonl ... --names a ... --library LIB
                          --workdir W
    goose-train multitask --config C --base B --data a.jsonl b.jsonl ... --workdir W
                          (--library LIB | --set multitask_mode=full --out MODEL_DIR)
    goose-train prototypes --base B --library LIB --data a.jsonl ... --names a ...
                          [--examples 1000] [--pooling example|token]
    goose-train clusters  --library LIB [--clusters C] [--seed S] [--overwrite]

Argument parsing and dispatch only; the runs are ``goose_jax.pipeline.train_runs`` (its docstring
is the
user documentation: configs, data files, resuming) and ``goose_jax.pipeline.prototypes`` (the
average-activation baseline's router vectors, stored in the library). Rerunning an interrupted
training command resumes it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from goose_jax.core import distributed
from goose_jax.core.tool import run_tool
from goose_jax.library.store import ExpertLibrary
from goose_jax.pipeline import prototypes, train_runs
from goose_jax.routing import two_level

PROG = "goose-train"


def _run_args(args: argparse.Namespace) -> train_runs.RunArgs:
    extra = {}
    if args.command == "expert":  # its --name is the one expert's
        extra["names"] = [args.name] if args.name else None
    elif args.command == "multitask":
        extra.update(name=args.name, out=args.out)
    else:
        extra["names"] = args.names
    return train_runs.RunArgs(
        command=args.command, data=args.data, workdir=args.workdir, config=args.config,
        overrides=tuple(args.set or ()), base=args.base, eval_data=tuple(args.eval_data or ()),
        library=args.library, description=args.description, overwrite=args.overwrite,
        mesh=args.mesh, validation=tuple(getattr(args, "validation", None) or ()), **extra)


def _runner(body: Callable[[train_runs.RunArgs], int]) -> Callable[[argparse.Namespace], int]:
    return lambda args: body(_run_args(args))


def _common(p: argparse.ArgumentParser, many: bool) -> None:
    p.add_argument("--config", help="python file with get_config() -> TrainConfig "
                                    "(default: the paper's expert settings)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set steps=200")
    p.add_argument("--base", help="HF T5 directory, goose-jax model checkpoint, or "
                                  "random:PRESET (default: the config's base_model)")
    p.add_argument("--data", nargs="+" if many else 1, required=True, metavar="JSONL",
                   help="JSON-lines training data, {\"input\": ..., \"target\": ...} per line")
    p.add_argument("--eval-data", nargs="+", metavar="JSONL",
                   help="held-out data in the same order as --data, evaluated every eval_every")
    p.add_argument("--workdir", required=True, help="checkpoints, run.json and metrics.jsonl")
    p.add_argument("--description", help="what the data is (stored in the library)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace experts (or a model) that already exist in the output")
    p.add_argument("--mesh", help="device mesh sizes, e.g. data=2,expert=4 (experts are split "
                                  "over the expert axis)")
    distributed.add_arguments(p)


def _run_prototypes(args: argparse.Namespace) -> int:
    return prototypes.run_prototypes(prototypes.PrototypeArgs(
        library=args.library, data=args.data, names=args.names, base=args.base,
        config=args.config, overrides=tuple(args.set or ()), examples=args.examples,
        pooling=args.pooling, batch_size=args.batch_size, overwrite=args.overwrite))


def _prototypes_parser(sub) -> None:
    help_text = ("compute the average-activation prototypes of library experts from their "
                 "data and store them in the library (goose-eval finds them there)")
    p = sub.add_parser("prototypes", help=help_text, description=help_text)
    p.add_argument("--config", help="python file with get_config() -> TrainConfig: tokenizer, "
                                    "lengths, seed, dtypes (default: the paper's settings)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set tokenizer=byte")
    p.add_argument("--base", help="the library's base model (default: the config's base_model)")
    p.add_argument("--library", required=True, help="expert library directory; the prototypes "
                   "go to its prototypes.safetensors")
    p.add_argument("--data", nargs="+", required=True, metavar="JSONL",
                   help="each expert's training data, {\"input\": ..., \"target\": ...} per line")
    p.add_argument("--names", nargs="+", help="expert names, in --data order (default: the "
                                              "files' stems)")
    p.add_argument("--examples", type=int, default=prototypes.DEFAULT_EXAMPLES,
                   help="at most this many examples per expert (default: %(default)s, as the "
                        "paper)")
    p.add_argument("--pooling", choices=("example", "token"), default="example",
                   help="example: each example's mean over its tokens, then the mean over "
                        "examples (default, the original release's); token: one mean over "
                        "all tokens")
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward pass")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the prototypes the library already holds")
    p.set_defaults(run=_run_prototypes)


def _run_clusters(args: argparse.Namespace) -> int:
    done = two_level.cluster_library(
        ExpertLibrary.open(args.library), args.clusters, seed=args.seed,
        iterations=args.iterations, balance=args.balance, overwrite=args.overwrite)
    print(f"{args.library}: clustered the gates of {done['experts']} experts at {done['sites']} "
          f"sites into {done['num_clusters']} clusters each (largest {done['max_members']} "
          f"members) in {done['seconds']:.1f} s; stored in clusters.safetensors (library format "
          "version 2)", flush=True)
    return 0


def _clusters_parser(sub) -> None:
    help_text = ("cluster each site's PHATGOOSE gates (k-means, seeded) and store the clusters "
                 "in the library, for two-level routing (routing.two_level)")
    p = sub.add_parser("clusters", help=help_text, description=help_text)
    p.add_argument("--library", required=True, help="expert library directory (every expert "
                   "with a gate)")
    p.add_argument("--clusters", type=int, default=None,
                   help="clusters per site (default: round(sqrt(experts)))")
    p.add_argument("--seed", type=int, default=0, help="k-means++ seed (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=two_level.DEFAULT_ITERATIONS,
                   help="Lloyd steps (default: %(default)s)")
    p.add_argument("--balance", type=float, default=two_level.DEFAULT_BALANCE,
                   help="members per cluster at most balance * experts / clusters "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the clusters the library already holds")
    p.set_defaults(run=_run_clusters)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train LoRA experts, PHATGOOSE gates and multitask baselines; "
        "compute average-activation prototypes; cluster the gates for two-level routing.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    specs = {
        "expert": ("train one LoRA expert", False, train_runs.run_experts),
        "experts": ("train several LoRA experts at once, one per --data file", True,
                    train_runs.run_experts),
        "gate": ("train the PHATGOOSE gates of library experts (base and LoRA frozen)", True,
                 train_runs.run_gate),
        "multitask": ("train one model on the mixture of --data files (LoRA or full)", True,
                      train_runs.run_multitask),
    }
    for name, (help_text, many, run) in specs.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p, many)
        p.set_defaults(run=_runner(run))
        if name in ("expert", "multitask"):
            p.add_argument("--name", default="multitask" if name == "multitask" else None,
                           help="expert name (default: the data file's stem)")
        else:
            p.add_argument("--names", nargs="+", help="expert names, in --data order")
        p.add_argument("--library", required=name != "multitask",
                       help="expert library directory (created if missing)")
        if name == "multitask":
            p.add_argument("--out", help="model directory (multitask_mode=full)")
        if name in ("expert", "experts"):
            p.add_argument("--validation", nargs="+", metavar="JSONL",
                           help="validation files in --data order ({\"input\", \"target\"[, "
                                "\"choices\"]} lines), or 'none'; default: goose-data's "
                                "OUT/validation/<name>.jsonl for OUT/train/<name>.jsonl, else "
                                "<name>.validation.jsonl beside it. Scored at step 0 and "
                                "every eval_every steps; each expert keeps its best step")
    _prototypes_parser(sub)
    _clusters_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``goose-train``; returns the exit code (see ``goose_jax.core.errors``)."""
    return run_tool(PROG, build_parser(), argv,
                    interrupted_hint="rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
