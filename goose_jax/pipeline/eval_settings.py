"""The settings of one zero-shot evaluation run (``EvalSettings``) and the flags that fill them:
what ``goose-eval``, ``eval/paper.py`` and the setting scripts share.

``pipeline.zeroshot.run_eval`` runs them; ``pipeline.zeroshot.validate`` checks them against the
files they name.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from goose_jax.core.errors import ConfigError, RoutingError, UsageError
from goose_jax.core.sharding import parse_mesh
from goose_jax.library.prototypes import PROTOTYPES_FILE
from goose_jax.routing import formula as routing
from goose_jax.routing.methods import METHODS

WORLD = "world"   # the miniature world's benchmark (goose_jax.data.world, what goose-demo trains)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Everything one evaluation run needs; each field is the ``goose-eval`` flag of that name.

    Attributes:
      base: base model (a Hugging Face T5 or decoder-only Llama / Qwen2 / Mistral directory, a
        goose-jax checkpoint, ``random:PRESET`` such as ``random:llama-tiny``).
      out: the results folder.
      tasks: task names (``t0_heldout/rte``, ``bbh/navigate``).
      benchmarks: whole benchmarks (``t0_heldout``, ``t0_heldin``, ``bbh``, ``bbl``, ``flan``,
        ``world``: the miniature world's tasks, on a library ``goose-demo`` wrote).
      library: the expert library directory (None: only method ``base``).
      method: one of ``routing.methods.METHODS`` (None: ``phatgoose`` with a library, else
      ``base``).
      top_k: experts per token (per-token methods).
      expert: for ``single``: an expert name or index.
      experts: the experts to load (empty: all).
      expert_map: for ``example``: a JSON file mapping a dataset, or
        ``<dataset>/<template>/<example id>``, to an expert name.
      retrieval_index: for ``retrieval``: the index file (None: the library's own).
      embedder: for ``retrieval``: a sentence-transformers directory (None: the packaged one).
      prototypes: for ``average_activation``: the ``library.store.save_prototypes`` file (None: the
        library's own, ``<library>/prototypes.safetensors`` from ``goose-train prototypes``).
      arrow_temperature: for ``arrow``: the divisor of ``|x . u|`` (a number > 0, or
        ``"release"`` for the original release's ``10 * sqrt(d_in)``); see ``build_routed``.
      p3_root, bbh_root, bbl_root, flan_root, tfds_dir: where each data source lives.
      flan_grouping: a JSON file mapping FLAN task names to expert names.
      world_seed: the seed of the world's test examples (the demo's ``--seed`` reproduces its
        own test set; any seed is a fresh draw of the same tasks).
      tokenizer: tokenizer directory (None: the base's).
      byte_tokenizer: use the byte-level tokenizer.
      dtype: ``float32`` or ``bfloat16`` (a Hugging Face base's parameters and compute).
      mesh: device mesh sizes, ``data=D,model=M,expert=X`` (``core.sharding.parse_mesh``); None:
        every device on ``data`` (one device: no mesh).
      scan_layers: run the blocks as one scanned body (``T5Config.scan_layers``).
      batch_size, max_input_length, max_target_length: see ``evaluation.evaluator.Evaluator``.
      max_examples: at most this many examples per template (quick runs).
      length_normalize: mean choice NLL (the paper); False: the sum.
      encoder_once: one encoder pass per example, or for a decoder-only base one pass of the
        prompt into the key/value cache (False: per choice, for comparison).
      telemetry: count each site's top-1 experts (per-token methods).
      progress: draw a progress bar (on a terminal, process 0).
      fast_compile: compile with XLA's CPU optimisations off and one shape per batch
        (``Evaluator``'s ``fast_compile`` and ``fixed_shapes``): for tiny models, where
        compiling costs more than running (the settings scripts' ``--small``).
      overwrite: replace the results an ``out`` folder already holds.
    """

    base: str
    out: str
    tasks: tuple[str, ...] = ()
    benchmarks: tuple[str, ...] = ()
    library: str | None = None
    method: str | None = None
    top_k: int = 2
    expert: str | None = None
    experts: tuple[str, ...] = ()
    expert_map: str | None = None
    retrieval_index: str | None = None
    embedder: str | None = None
    prototypes: str | None = None
    arrow_temperature: float | str = 1.0
    p3_root: str | None = None
    bbh_root: str | None = None
    bbl_root: str | None = None
    flan_root: str | None = None
    flan_grouping: str | None = None
    world_seed: int = 0
    tfds_dir: str | None = None
    tokenizer: str | None = None
    byte_tokenizer: bool = False
    dtype: str = "float32"
    mesh: str | None = None
    scan_layers: bool = False
    batch_size: int = 16
    max_input_length: int = 512
    max_target_length: int = 512
    max_examples: int | None = None
    length_normalize: bool = True
    encoder_once: bool = True
    telemetry: bool = True
    progress: bool = True
    overwrite: bool = False
    fast_compile: bool = False

    def inputs(self) -> dict[str, str | None]:
        """Flag -> every path this run reads (for ``core.outputs.check_apart``)."""
        return {"--base": self.base, "--library": self.library, "--tokenizer": self.tokenizer,
                "--expert-map": self.expert_map, "--retrieval-index": self.retrieval_index,
                "--embedder": self.embedder, "--prototypes": self.prototypes,
                "--p3-root": self.p3_root, "--bbh-root": self.bbh_root,
                "--bbl-root": self.bbl_root, "--flan-root": self.flan_root,
                "--flan-grouping": self.flan_grouping, "--tfds-dir": self.tfds_dir}

    def __post_init__(self):
        if not self.tasks and not self.benchmarks:
            raise UsageError("give --benchmark or --tasks")
        examples = 1 if self.max_examples is None else self.max_examples
        for flag, value, least in (("--top-k", self.top_k, 1),
                                   ("--batch-size", self.batch_size, 1),
                                   ("--max-input-length", self.max_input_length, 2),
                                   ("--max-target-length", self.max_target_length, 1),
                                   ("--max-examples", examples, 1)):
            if value < least:
                raise UsageError(f"{flag} {value}: must be at least {least}")
        method = self.routing_method
        if method not in METHODS:
            raise UsageError(f"--method {method!r}: expected one of {list(METHODS)}")
        if method != "base" and not self.library:
            raise UsageError(f"--method {method} needs --library")
        try:
            routing.check_temperature(self.arrow_temperature)
        except RoutingError:
            raise UsageError(f"--arrow-temperature {self.arrow_temperature!r}: expected a "
                             "number > 0 or 'release'") from None
        if self.mesh is not None:

            try:
                parse_mesh(self.mesh)
            except ConfigError as e:
                raise UsageError(f"--mesh: {e}") from None
        needs = {"single": ("expert", "--expert (a name or an index)"),
                 "example": ("expert_map", "--expert-map (or use --method retrieval)")}
        if method in needs and getattr(self, needs[method][0]) is None:
            raise UsageError(f"--method {method} needs {needs[method][1]}")
        if self.world and len(self.world) < len(self.tasks) + len(self.benchmarks):
            raise UsageError("the world's tasks use the world's own tokenizer: evaluate them "
                             "apart from other benchmarks")

    @property
    def world(self) -> tuple[str, ...]:
        """The miniature world's benchmark and task names among ``benchmarks`` and ``tasks``."""
        return tuple(n for n in self.benchmarks + self.tasks
                     if n == WORLD or n.startswith(f"{WORLD}/"))

    @property
    def routing_method(self) -> str:
        """The method that runs (``method``, or its default)."""
        return self.method or ("phatgoose" if self.library else "base")

    @property
    def prototypes_path(self) -> str | None:
        """The prototypes file ``average_activation`` reads: ``prototypes``, else the
        library's own (which may not exist)."""

        if self.prototypes is not None:
            return self.prototypes
        return os.path.join(self.library, PROTOTYPES_FILE) if self.library else None


def parse_temperature(text: str) -> float | str:
    """``--arrow-temperature``'s value: ``release`` or a number > 0 (argparse ``type``)."""
    if text == routing.RELEASE:
        return text
    try:
        return routing.check_temperature(float(text))
    except (ValueError, RoutingError):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a number > 0 or 'release'") from None


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags of an ``EvalSettings`` that every evaluation program shares (goose-eval and the
    ``eval/`` scripts): base, library, data, tokenizer, batching, output. The flags choosing a
    method (``--method``, ``--top-k``, ``--expert``, ``--experts``, ``--expert-map``) are each
    program's own."""
    ap.add_argument("--base", required=True, help="base model: a Hugging Face T5 or "
                    "decoder-only (Llama, Qwen2, Mistral) directory, a goose-jax (Orbax) model "
                    "checkpoint or random:PRESET (e.g. random:llama-tiny)")
    ap.add_argument("--library", help="expert library directory (goose_jax.library.store)")
    ap.add_argument("--retrieval-index", help="for --method retrieval: the .npz written by "
                    "goose_jax.routing.retrieval.RetrievalIndex.save (default: <library>/"
                    "retrieval_index.npz)")
    ap.add_argument("--embedder", help="for --method retrieval: a local sentence-transformers "
                    "model directory (default: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--prototypes", help="average_activation router vectors: a safetensors file "
                    "with '<site>/gate' tensors (E, d_in) (default: the library's own "
                    "prototypes.safetensors, written by goose-train prototypes)")
    ap.add_argument("--arrow-temperature", type=parse_temperature, default=1.0,
                    metavar="{1,release,T}",
                    help="Arrow: divide |x . u| by this before the softmax. 1 (default: the "
                    "paper's formula and mttl's, near one-hot top-2 weights, as goose-jax has "
                    "always run it); 'release': the original release's 10 * sqrt(d_in), "
                    "near-even top-2 weights, as the paper's Arrow numbers were measured; or "
                    "any number > 0. The kept experts are the same either way")
    ap.add_argument("--benchmark", help="comma-separated: t0_heldout, t0_heldin, bbh, bbl, flan; "
                    "or world (the miniature world's tasks, on a library goose-demo wrote)")
    ap.add_argument("--world-seed", type=int, default=0, help="--benchmark world: the seed of "
                    "the test examples (a demo's --seed gives its own test set)")
    ap.add_argument("--tasks", help="comma-separated task names (e.g. t0_heldout/rte,bbh/navigate)")
    ap.add_argument("--p3-root", help="P3 release directory (with data/<task>/ folders)")
    ap.add_argument("--bbh-root", help="BIG-bench Hard: one saved HF dataset per task")
    ap.add_argument("--bbl-root", help="BIG-bench Lite: one saved HF dataset per task")
    ap.add_argument("--flan-root", help="Open-Orca/FLAN release directory")
    ap.add_argument("--flan-grouping", help="JSON file mapping FLAN task names to expert names")
    ap.add_argument("--tfds-dir", help="tfds data directory")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: --base)")
    ap.add_argument("--byte-tokenizer", action="store_true", help="use the byte-level tokenizer")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="parameter and compute dtype for a Hugging Face base model")
    ap.add_argument("--mesh", help="device mesh sizes, e.g. data=2,expert=4 or "
                    "data=2,model=2,expert=2: batches over data, the base model's large kernels "
                    "over model, the expert library over expert (never whole on one device); "
                    "the sizes multiply to the device count (default: every device on data)")
    ap.add_argument("--scan-layers", action="store_true",
                    help="run the blocks as one scanned body (T5Config.scan_layers): the same "
                    "numbers, compiled in a fraction of the time for deep models such as T5-XL")
    ap.add_argument("--batch-size", type=int, default=16, help="examples per batch")
    ap.add_argument("--max-input-length", type=int, default=512)
    ap.add_argument("--max-target-length", type=int, default=512)
    ap.add_argument("--max-examples", type=int, help="at most this many examples per template "
                    "(quick runs)")
    ap.add_argument("--summed", action="store_true", help="summed choice NLL instead of the mean")
    ap.add_argument("--naive", action="store_true", help="score choices with one encoder pass "
                    "(decoder-only: one pass of prompt and choice) per choice, for comparison")
    ap.add_argument("--no-telemetry", action="store_true", help="skip routing telemetry")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the results --out already holds (refused without it)")


def _csv(s: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (s or "").split(",") if x.strip())


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The ``EvalSettings`` of parsed flags (``add_arguments`` and the method flags a program
    has; the others keep their defaults).

    Raises:
      UsageError: no tasks, or a method without the flag it needs.
    """
    derived = {"tasks": _csv(args.tasks), "benchmarks": _csv(args.benchmark),
               "experts": _csv(getattr(args, "experts", None)),
               "length_normalize": not args.summed, "encoder_once": not args.naive,
               "telemetry": not args.no_telemetry, "progress": not args.no_progress,
               "overwrite": bool(getattr(args, "overwrite", False))}
    same = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSettings)
            if f.name not in derived and hasattr(args, f.name)}
    return EvalSettings(**same, **derived)
