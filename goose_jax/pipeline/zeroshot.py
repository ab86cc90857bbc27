"""One zero-shot evaluation run: a base model, a routing method over an expert library, the tasks
of a benchmark, and a results folder. What ``goose-eval`` and the ``eval/`` scripts run.

    settings = EvalSettings(base="flan-t5-xl/", library="lib/", method="phatgoose", top_k=2,
                            benchmarks=("t0_heldout",), p3_root="P3/", out="runs/pg_t0ho")
    summary = run_eval(settings)

The run reads the data first (a wrong path fails in seconds, before a large model is read), then
the base model, the library and the method's router vectors; it scores every task with an
``evaluation.evaluator.Evaluator`` (batches over the mesh's ``data`` axis, the library over its
``expert``
axis) and writes the results folder of ``goose_jax.evaluation.report`` from process 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence

from goose_jax.core import distributed
from goose_jax.core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    LibraryError,
    LibraryMismatchError,
    UsageError,
)
from goose_jax.core.outputs import check_apart, run_lock
from goose_jax.core.progress import progress_enabled
from goose_jax.core.sharding import expert_shards, make_mesh, parse_mesh, shard_params
from goose_jax.core.tensorfile import SafetensorsFile, read_json
from goose_jax.data import tasks as T
from goose_jax.data import world
from goose_jax.data.examples import Example
from goose_jax.data.tokenizers import ByteTokenizer
from goose_jax.data.world import WorldTokenizer
from goose_jax.evaluation import evaluator as evaluation
from goose_jax.evaluation import report
from goose_jax.evaluation.evaluator import load_all
from goose_jax.evaluation.report import check_out_dir
from goose_jax.library.prototypes import (
    PROTOTYPES_FILE,
    check_prototypes_file,
    load_prototypes,
    prototype_names,
)
from goose_jax.library.store import ExpertLibrary
from goose_jax.models import families
from goose_jax.models.base import RANDOM, check_base, load_base, load_tokenizer
from goose_jax.models.scan import stack_layers
from goose_jax.pipeline.eval_settings import (  # noqa: F401  (re-exported: the run's API)
    WORLD,
    EvalSettings,
    add_arguments,
    parse_temperature,
    settings_from_args,
)
from goose_jax.routing import retrieval
from goose_jax.routing.methods import PER_EXAMPLE, build_routed

# --- routing from a library -------------------------------------------------------------------


# Methods whose library is read straight into its expert sharding (each process reads only its
# own experts' files, padded to the axis): those the expert-parallel forward routes per token.
_SHARDED_LOAD = ("phatgoose", "average_activation", "arrow")


def _load_library(path: str, cfg, params, names: Sequence[str], *, mesh=None, dtype=None,
                  method: str = ""):
    """(experts, gates or None, expert names, LoRA scale) of a library on disk; on a mesh with
    an ``expert`` axis, per-token methods get it already padded and placed."""
    import jax.numpy as jnp


    lib = ExpertLibrary.open(path, cfg, params)
    load_dtype = jnp.dtype(dtype) if dtype else jnp.float32
    if mesh is not None and method in _SHARDED_LOAD and expert_shards(mesh) > 1:
        experts, gates = lib.load(list(names) or None, dtype=load_dtype, mesh=mesh)
    else:
        experts, gates = lib.load(list(names) or None, dtype=load_dtype)
    return experts, gates, list(names or lib.names), lib.scale


def build_method(s: EvalSettings, cfg, params, mesh=None):
    """(``routing.methods.Routed``, expert names) of the settings' method over its library, its
    collections placed on ``mesh`` (``routing.methods.build_routed``).

    Raises:
      LibraryError: a library that cannot serve the method (phatgoose without every gate).
      DataError: an unreadable prototypes file.
    """

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

    path = s.prototypes_path
    if not os.path.isfile(path):
        if s.prototypes is not None:
            raise DataError(f"{path}: prototypes file does not exist (--prototypes)")
        raise LibraryError(f"{s.library}: --method average_activation needs prototypes and the "
                           f"library has no {PROTOTYPES_FILE}; compute them with goose-train "
                           "prototypes, or pass --prototypes")
    check_prototypes_file(path)
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

        retrieval.RetrievalIndex.load(s.retrieval_index or s.library).select(names)
        if s.embedder is not None and not os.path.isdir(s.embedder):
            raise DataError(f"{s.embedder}: sentence-embedding model directory does not exist "
                            "(--embedder)")
    return names


def eval_mesh(s: EvalSettings):
    """The run's device mesh: ``s.mesh``'s sizes, else every device on ``data`` (None on one
    device).

    Raises:
      UsageError: sizes that do not multiply to the device count (before anything compiles).
    """
    import jax


    if s.mesh is None:
        return make_mesh(data=-1) if jax.device_count() > 1 else None
    try:
        return make_mesh(**parse_mesh(s.mesh))
    except ConfigError as e:  # the --mesh flag: a usage error (exit 2)
        raise UsageError(f"--mesh {s.mesh}: {e}; give sizes whose product is "
                         f"{jax.device_count()}") from None


def validate(s: EvalSettings) -> None:
    """Checks every path and flag of a run before any data or model is read: the output folder
    (not a file, not already holding results without ``overwrite``, apart from every input), the
    base and tokenizer
    paths, the JSON flag files, and whether the library can serve the method (experts, gates,
    ``top_k``, the method's own file).

    Raises:
      GooseError: one line naming the file or flag and the fix.
    """

    check_apart({"--out": s.out}, s.inputs())
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
    the rules table's layout (``models.base.load_base``)."""

    # A random base's vocabulary grows to hold the byte-level tokenizer's ids.
    cfg, params = load_base(s.base, dtype=s.dtype, mesh=mesh,
                            min_vocab_size=ByteTokenizer.vocab_size if s.byte_tokenizer else 0)
    if s.world and not (s.tokenizer or s.byte_tokenizer):

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
      GooseError: any input a user controls that cannot be used (one line each), or another run
        writing ``s.out`` (``core.outputs.run_lock``).
    """

    validate(s)
    with contextlib.ExitStack() as held:
        if distributed.is_primary():   # process 0 alone writes the results
            held.enter_context(run_lock(s.out, prog="goose-eval"))
        return _run_eval(s, base, data)


def _run_eval(s: EvalSettings, base, data) -> dict:
    import jax


    mesh = eval_mesh(s)
    tasks, examples = data if data is not None else load_tasks(s)
    cfg, params, tok = base if base is not None else load_base_model(s, mesh)
    if s.scan_layers and not families.of(cfg).scans:
        kind = families.describe(families.family(cfg))
        raise ConfigError(f"--scan-layers: the base {s.base} is a {kind} model, which has no "
                          "scanned layout; drop the flag")
    batch_size = s.batch_size
    if mesh is not None:
        # Batches over ``data``, the base by the rules table (``model`` splits its large
        # kernels), the library over ``expert``; in a process group every process scores the
        # same batches in step and process 0 alone writes the results.

        params = shard_params(params, families.param_logical_axes(cfg), mesh)
        data_size = mesh.shape["data"]
        batch_size = -(-batch_size // data_size) * data_size
    routed, names = build_method(s, cfg, params, mesh)
    if s.scan_layers and not cfg.scan_layers:
        # After the library has checked the base (per layer, as it was trained): the blocks
        # stacked once, laid out by the stacked specs.
        cfg = cfg.replace(scan_layers=True)
        params = stack_layers(params, cfg)
        if mesh is not None:
            params = shard_params(params, families.param_logical_axes(cfg), mesh)
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
