"""One zero-shot evaluation run: a base model, a routing method over an expert library, the tasks
of a benchmark, and a results folder. What ``goose-eval`` and the ``eval/`` scripts run.

    settings = EvalSettings(base="flan-t5-xl/", library="lib/", method="phatgoose", top_k=2,
                            benchmarks=("t0_heldout",), p3_root="P3/", out="runs/pg_t0ho")
    summary = run_eval(settings)

The run reads the data first (a wrong path fails in seconds, before a large model is read), then
the base model, the library and the method's router vectors; it scores every task with an
``evaluation.Evaluator`` (batches over the mesh's ``data`` axis, the library over its ``expert``
axis) and writes the results folder of ``goose_jax.report`` from process 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Sequence

from goose_jax import routing
from goose_jax.data.examples import Example
from goose_jax.errors import DataError, LibraryError, RoutingError, UsageError
from goose_jax.routers import METHODS, PER_EXAMPLE
from goose_jax.tensorfile import read_json

WORLD = "world"   # the miniature world's benchmark (goose_jax.data.world, what goose-demo trains)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Everything one evaluation run needs; each field is the ``goose-eval`` flag of that name.

    Attributes:
      base: base model (a Hugging Face T5 directory, a goose-jax checkpoint, ``random:PRESET``).
      out: the results folder.
      tasks: task names (``t0_heldout/rte``, ``bbh/navigate``).
      benchmarks: whole benchmarks (``t0_heldout``, ``t0_heldin``, ``bbh``, ``bbl``, ``flan``,
        ``world``: the miniature world's tasks, on a library ``goose-demo`` wrote).
      library: the expert library directory (None: only method ``base``).
      method: one of ``routers.METHODS`` (None: ``phatgoose`` with a library, else ``base``).
      top_k: experts per token (per-token methods).
      expert: for ``single``: an expert name or index.
      experts: the experts to load (empty: all).
      expert_map: for ``example``: a JSON file mapping a dataset, or
        ``<dataset>/<template>/<example id>``, to an expert name.
      retrieval_index: for ``retrieval``: the index file (None: the library's own).
      embedder: for ``retrieval``: a sentence-transformers directory (None: the packaged one).
      prototypes: for ``average_activation``: the ``report.save_prototypes`` file (None: the
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
      mesh: device mesh sizes, ``data=D,model=M,expert=X`` (``sharding.parse_mesh``); None:
        every device on ``data`` (one device: no mesh).
      scan_layers: run the blocks as one scanned body (``T5Config.scan_layers``).
      batch_size, max_input_length, max_target_length: see ``evaluation.Evaluator``.
      max_examples: at most this many examples per template (quick runs).
      length_normalize: mean choice NLL (the paper); False: the sum.
      encoder_once: one encoder pass per example (False: per choice, for comparison).
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
            from goose_jax.errors import ConfigError
            from goose_jax.sharding import parse_mesh

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
        from goose_jax.report import PROTOTYPES_FILE

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
    ap.add_argument("--base", required=True, help="base model: a Hugging Face T5 directory, a "
                    "goose-jax (Orbax) model checkpoint or random:PRESET")
    ap.add_argument("--library", help="expert library directory (goose_jax.library)")
    ap.add_argument("--retrieval-index", help="for --method retrieval: the .npz written by "
                    "goose_jax.retrieval.RetrievalIndex.save (default: <library>/"
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
                    "per choice (for comparison)")
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


# --- routing from a library -------------------------------------------------------------------


# Methods whose library is read straight into its expert sharding (each process reads only its
# own experts' files, padded to the axis): those the expert-parallel forward routes per token.
_SHARDED_LOAD = ("phatgoose", "average_activation", "arrow")


def _load_library(path: str, cfg, params, names: Sequence[str], *, mesh=None, dtype=None,
                  method: str = ""):
    """(experts, gates or None, expert names, LoRA scale) of a library on disk; on a mesh with
    an ``expert`` axis, per-token methods get it already padded and placed."""
    import jax.numpy as jnp

    from goose_jax.library import ExpertLibrary
    from goose_jax.sharding import expert_shards

    lib = ExpertLibrary.open(path, cfg, params)
    load_dtype = jnp.dtype(dtype) if dtype else jnp.float32
    if mesh is not None and method in _SHARDED_LOAD and expert_shards(mesh) > 1:
        experts, gates = lib.load(list(names) or None, dtype=load_dtype, mesh=mesh)
    else:
        experts, gates = lib.load(list(names) or None, dtype=load_dtype)
    return experts, gates, list(names or lib.names), lib.scale


def build_method(s: EvalSettings, cfg, params, mesh=None):
    """(``routers.Routed``, expert names) of the settings' method over its library, its
    collections placed on ``mesh`` (``routers.build_routed``).

    Raises:
      LibraryError: a library that cannot serve the method (phatgoose without every gate).
      DataError: an unreadable prototypes file.
    """
    from goose_jax.report import load_prototypes
    from goose_jax.routers import build_routed

    method = s.routing_method
    if method == "base":
        return build_routed("base", cfg), []
    experts, gates, names, scale = _load_library(s.library, cfg, params, s.experts, mesh=mesh,
                                                 dtype=s.dtype, method=method)
    expert = None
    if method == "single":
        expert = names.index(s.expert) if s.expert in names else (
            int(s.expert) if s.expert.isdigit() else s.expert)
    prototypes = None
    if method == "average_activation":
        prototypes = load_prototypes(s.prototypes_path, names)
    if method == "phatgoose" and gates is None:
        raise LibraryError(f"{s.library}: --method phatgoose needs every expert's trained gate; "
                           "some experts have none")
    return build_routed(method, cfg, experts, gates=gates, prototypes=prototypes,
                        top_k=s.top_k, scale=scale, expert=expert,
                        temperature=s.arrow_temperature, mesh=mesh,
                        num_experts=len(names)), names


def map_chooser(path: str, names: list[str]) -> Callable[[list[Example]], list[int]]:
    """For method ``example``: examples -> expert indices, from a JSON map (``expert_map``).

    Raises:
      DataError: an unreadable map, an expert the library lacks, an example with no entry.
    """
    table = read_json_flag(path, "--expert-map", "expert map")
    unknown = sorted({str(v) for v in table.values() if v not in names})
    if unknown:
        raise DataError(f"{path}: experts {unknown[:3]} are not in the library {names[:5]} "
                        "(--expert-map values must be the library's expert names)")

    def choose(examples):
        out = []
        for ex in examples:
            key = f"{ex.dataset}/{ex.template}/{ex.example_id}"
            name = table.get(key, table.get(ex.dataset))
            if name is None:
                raise DataError(f"{path}: no expert for {key!r} nor for {ex.dataset!r}")
            out.append(names.index(name))
        return out

    return choose


def retrieval_chooser(s: EvalSettings, names: list[str], examples: dict[str, list[Example]]):
    """For method ``retrieval``: embeds every example once and picks its nearest expert."""
    from goose_jax import retrieval

    index = retrieval.RetrievalIndex.load(s.retrieval_index or s.library).select(names)
    embedder = retrieval.SentenceEmbedder.load(s.embedder)
    return retrieval.expert_chooser(index, embedder, [ex for v in examples.values() for ex in v])


def cap_examples(examples: list[Example], n: int | None) -> list[Example]:
    """At most ``n`` examples per template, in order (None: all)."""
    if n is None:
        return examples
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        if seen.get(ex.template, 0) < n:
            seen[ex.template] = seen.get(ex.template, 0) + 1
            out.append(ex)
    return out


# --- checks before any work -------------------------------------------------------------------


def read_json_flag(path: str, flag: str, what: str) -> dict:
    """The JSON object in the file a flag names (``--expert-map``, ``--flan-grouping``).

    Raises:
      DataError: the file is missing, is not JSON, or holds no object (naming file and flag).
    """
    table = read_json(path, error=DataError, what=f"the {what} ({flag})",
                      fix="; pass a JSON object file")
    if not isinstance(table, dict):
        raise DataError(f"{path}: the {what} ({flag}) must be a JSON object, found "
                        f"{type(table).__name__}")
    return table


def _check_prototypes(s: EvalSettings, names: list[str]) -> None:
    """The prototypes file exists and has a vector for every routed expert (header only)."""
    from goose_jax.report import PROTOTYPES_FILE, prototype_names
    from goose_jax.tensorfile import SafetensorsFile

    path = s.prototypes_path
    if not os.path.isfile(path):
        if s.prototypes is not None:
            raise DataError(f"{path}: prototypes file does not exist (--prototypes)")
        raise LibraryError(f"{s.library}: --method average_activation needs prototypes and the "
                           f"library has no {PROTOTYPES_FILE}; compute them with goose-train "
                           "prototypes, or pass --prototypes")
    stored = prototype_names(path)
    if stored is not None:
        missing = [n for n in names if n not in stored]
        if missing:
            raise DataError(f"{path}: no prototypes for experts {missing[:3]} (it has "
                            f"{stored[:8]}); recompute them with goose-train prototypes "
                            "--overwrite, or route fewer --experts")
    f = SafetensorsFile(path, error=DataError)   # the header only
    rows = len(names) if stored is None else len(stored)
    wrong = {k: f.shape_of(k)[0] for k in f if k.endswith("/gate") and
             f.shape_of(k)[:1] != (rows,)}
    if wrong:
        key = sorted(wrong)[0]
        raise DataError(f"{path}: {key} holds {wrong[key]} expert vectors but {rows} "
                        "experts are routed (--prototypes must match the library and --experts)")


def _check_library(s: EvalSettings) -> list[str]:
    """The routed expert names, after checking that the library can serve the method."""
    from goose_jax.errors import LibraryMismatchError
    from goose_jax.library import ExpertLibrary

    lib = ExpertLibrary.open(s.library)   # the manifest only
    unknown = [n for n in s.experts if n not in lib.names]
    if unknown:
        raise LibraryError(f"{s.library}: --experts names {unknown[:3]} not in the library; it "
                           f"has {lib.names[:8]}{' ...' if len(lib) > 8 else ''}")
    names = list(s.experts or lib.names)
    if not names:
        raise LibraryError(f"{s.library}: the library holds no experts; add some with goose-train "
                           "or goose-convert")
    method = s.routing_method
    if method in ("phatgoose", "arrow", "average_activation") and s.top_k > len(names):
        raise LibraryMismatchError(f"--top-k {s.top_k}: more than the {len(names)} experts "
                                   f"routed from {s.library}; pass --top-k {len(names)} or less")
    if method == "phatgoose":
        lacking = [n for n in names if not lib.info(n).get("has_gate")]
        if lacking:
            raise LibraryError(f"{s.library}: --method phatgoose needs every expert's trained "
                               f"gate; {lacking[:3]} have none (train them with goose-train "
                               "gate, or use --method arrow)")
    if method == "single" and s.expert not in names and not (
            s.expert.isdigit() and int(s.expert) < len(names)):
        raise LibraryError(f"--expert {s.expert!r}: not an expert of {s.library} (pass a name "
                           f"among {names[:8]} or an index below {len(names)})")
    if method == "example":
        map_chooser(s.expert_map, names)   # reads and checks the map
    if method == "average_activation":
        _check_prototypes(s, names)
    if method == "retrieval":
        from goose_jax import retrieval

        retrieval.RetrievalIndex.load(s.retrieval_index or s.library).select(names)
        if s.embedder is not None and not os.path.isdir(s.embedder):
            raise DataError(f"{s.embedder}: sentence-embedding model directory does not exist "
                            "(--embedder)")
    return names


def eval_mesh(s: EvalSettings):
    """The run's device mesh: ``s.mesh``'s sizes, else every device on ``data`` (None on one
    device).

    Raises:
      ConfigError: sizes that do not multiply to the device count (before anything compiles).
    """
    import jax

    from goose_jax.errors import ConfigError
    from goose_jax.sharding import make_mesh, parse_mesh

    if s.mesh is None:
        return make_mesh(data=-1) if jax.device_count() > 1 else None
    try:
        return make_mesh(**parse_mesh(s.mesh))
    except ConfigError as e:
        raise ConfigError(f"--mesh {s.mesh}: {e}; give sizes whose product is "
                          f"{jax.device_count()}") from None


def validate(s: EvalSettings) -> None:
    """Checks every path and flag of a run before any data or model is read: the output folder
    (not a file, not already holding results without ``overwrite``), the base and tokenizer
    paths, the JSON flag files, and whether the library can serve the method (experts, gates,
    ``top_k``, the method's own file).

    Raises:
      GooseError: one line naming the file or flag and the fix.
    """
    from goose_jax.base_model import RANDOM, check_base, load_tokenizer
    from goose_jax.errors import CheckpointError
    from goose_jax.report import check_out_dir

    check_out_dir(s.out, overwrite=s.overwrite)
    check_base(s.base)
    if not s.byte_tokenizer and not (s.world and s.tokenizer is None):
        if s.tokenizer is not None and not os.path.isdir(s.tokenizer):
            raise CheckpointError(f"{s.tokenizer}: --tokenizer is not a directory")
        if s.tokenizer is None and s.base.startswith(RANDOM):
            load_tokenizer(s.base)   # raises: a random base has no tokenizer files
    if s.flan_grouping:
        read_json_flag(s.flan_grouping, "--flan-grouping", "FLAN grouping")
    if s.library:
        _check_library(s)
    eval_mesh(s)


# --- the run ----------------------------------------------------------------------------------


def load_tasks(s: EvalSettings):
    """(tasks, examples by task name) of the settings: every task read and capped up front."""
    from goose_jax.data import tasks as T
    from goose_jax.data import world
    from goose_jax.evaluation import load_all

    if s.world:   # evaluated apart (EvalSettings)
        names = [n.removeprefix(f"{WORLD}/") for n in s.world if n != WORLD]
        tasks = world.eval_tasks(None if WORLD in s.world else names, split="test",
                                 seed=s.world_seed)
        return tasks, {t.name: cap_examples(t.load(), s.max_examples) for t in tasks}
    grouping = None
    if s.flan_grouping:
        grouping = read_json_flag(s.flan_grouping, "--flan-grouping", "FLAN grouping")
    roots = T.DataRoots(p3=s.p3_root, bbh=s.bbh_root, bbl=s.bbl_root, flan=s.flan_root,
                        tfds=s.tfds_dir, flan_grouping=grouping)
    tasks = T.get_tasks(list(s.tasks), list(s.benchmarks), roots)
    return tasks, {k: cap_examples(v, s.max_examples) for k, v in load_all(tasks).items()}


def load_base_model(s: EvalSettings, mesh=None):
    """(cfg, params, tokenizer) of the settings' base model; with ``mesh``, read straight into
    the rules table's layout (``base_model.load_base``)."""
    from goose_jax.base_model import load_base, load_tokenizer

    cfg, params = load_base(s.base, dtype=s.dtype, mesh=mesh)
    if s.world and not (s.tokenizer or s.byte_tokenizer):
        from goose_jax.data.world import WorldTokenizer

        return cfg, params, WorldTokenizer()
    tok = load_tokenizer(s.tokenizer or s.base, None if s.tokenizer else cfg,
                         byte=s.byte_tokenizer)
    return cfg, params, tok


def run_eval(s: EvalSettings, *, base=None, data=None) -> dict:
    """Runs one evaluation and writes its results folder; returns the summary (results.json).

    Args:
      s: the settings.
      base: an already loaded ``(cfg, params, tokenizer)`` of ``s.base`` (several runs over one
        base read it once); None: loaded here.
      data: an already loaded ``(tasks, examples)`` of ``load_tasks(s)`` (several methods over
        one benchmark read and cap its data once); None: loaded here.

    Raises:
      GooseError: any input a user controls that cannot be used (one line each).
    """
    import jax

    from goose_jax import distributed, evaluation, report
    from goose_jax.progress import progress_enabled

    validate(s)
    mesh = eval_mesh(s)
    tasks, examples = data if data is not None else load_tasks(s)
    cfg, params, tok = base if base is not None else load_base_model(s, mesh)
    batch_size = s.batch_size
    if mesh is not None:
        # Batches over ``data``, the base by the rules table (``model`` splits its large
        # kernels), the library over ``expert``; in a process group every process scores the
        # same batches in step and process 0 alone writes the results.
        from goose_jax.sharding import shard_params
        from goose_jax.t5 import param_logical_axes

        params = shard_params(params, param_logical_axes(cfg), mesh)
        data_size = mesh.shape["data"]
        batch_size = -(-batch_size // data_size) * data_size
    routed, names = build_method(s, cfg, params, mesh)
    if s.scan_layers and not cfg.scan_layers:
        # After the library has checked the base (per layer, as it was trained): the blocks
        # stacked once, laid out by the stacked specs.
        from goose_jax.layers import stack_layers
        from goose_jax.sharding import shard_params
        from goose_jax.t5 import param_logical_axes

        cfg = cfg.replace(scan_layers=True)
        params = stack_layers(params, cfg)
        if mesh is not None:
            params = shard_params(params, param_logical_axes(cfg), mesh)
    chooser = None
    if routed.method == "example":
        chooser = map_chooser(s.expert_map, names)
    elif routed.method in PER_EXAMPLE:
        chooser = retrieval_chooser(s, names, examples)
    evaluator = evaluation.Evaluator(
        cfg, params, tok, routed, batch_size=batch_size, max_input_length=s.max_input_length,
        max_target_length=s.max_target_length, length_normalize=s.length_normalize,
        encoder_once=s.encoder_once, telemetry=s.telemetry, choose_experts=chooser, mesh=mesh,
        fixed_shapes=s.fast_compile, fast_compile=s.fast_compile)
    t0 = time.perf_counter()
    primary = jax.process_index() == 0
    results = evaluation.evaluate(evaluator, tasks, examples=examples,
                                  progress=progress_enabled() and s.progress and primary)
    seconds = time.perf_counter() - t0
    n = sum(len(r.values) for r in results.values())
    meta = {"method": routed.method, "top_k": s.top_k, "base": os.path.abspath(s.base),
            "library": s.library and os.path.abspath(s.library), "experts": names,
            "tasks": [t.name for t in tasks], "batch_size": batch_size,
            "length_normalize": s.length_normalize, "encoder_once": s.encoder_once,
            **({"arrow_temperature": s.arrow_temperature} if routed.method == "arrow" else {}),
            **({"expert": s.expert if s.expert in names else names[int(s.expert)]}
               if routed.method == "single" else {}),
            **({"world_seed": s.world_seed} if s.world else {}),
            **({"prototypes": os.path.abspath(s.prototypes_path)}
               if routed.method == "average_activation" else {}),
            "devices": jax.device_count(),
            **({"mesh": dict(mesh.shape)} if mesh is not None else {}),
            "seconds": round(seconds, 2),
            "examples_per_second": round(n / max(seconds, 1e-9), 2),
            "compiled_shapes": len(evaluator.compiled_shapes)}
    summary = report.summarize(results, benchmark=",".join(s.benchmarks), meta=meta)
    if primary:
        table = report.write_results(s.out, summary, results, names)
        print(table, end="")
        print(f"{summary['examples_per_second']} examples/s; results in {s.out}")
    distributed.barrier("goose-eval: results written")
    return summary


# --- the paper's settings ---------------------------------------------------------------------


def paper_methods(s: EvalSettings) -> dict[str, EvalSettings]:
    """The paper's zero-shot methods that ``s.library`` supports, one settings each.

    PHATGOOSE (top-2; when every expert has a gate), merged experts, Arrow, average activation
    (when ``s.prototypes`` is given or the library holds its own), retrieval (when an index is
    given or the library holds one), and the base model alone; each writes to
    ``<s.out>/<method>``.
    """
    from goose_jax import retrieval
    from goose_jax.library import ExpertLibrary

    lib = ExpertLibrary.open(s.library) if s.library else None
    methods = ["base"]
    if lib is not None:
        if all(lib.info(n).get("has_gate") for n in (s.experts or lib.names)):
            methods.append("phatgoose")
        methods += ["merged", "arrow"]
        if s.prototypes or os.path.isfile(s.prototypes_path):
            methods.append("average_activation")
        index = s.retrieval_index or os.path.join(s.library, retrieval.INDEX_FILE)
        if os.path.isfile(index):
            methods.append("retrieval")
    return {m: dataclasses.replace(s, method=m, top_k=2 if m == "phatgoose" else s.top_k,
                                   out=os.path.join(s.out, m)) for m in methods}
