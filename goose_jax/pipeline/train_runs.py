"""goose-train's runs: LoRA experts, PHATGOOSE gates and multitask baselines, from a config, a
base model and JSON-lines data to an expert library (or a model).

The command-line tool and the scripts under ``train/`` call the same run bodies with a
``RunArgs`` (what the command line gives):

    run_experts    ``goose-train expert`` / ``experts``: one LoRA expert per data file
    run_gate       ``goose-train gate``: the gates of experts already in the library
    run_multitask  ``goose-train multitask``: one model on the mixture of the data files

The config is a python file whose ``get_config()`` returns a ``TrainConfig`` (default: the
paper's settings); ``key=value`` overrides change any field, typed by the field's type
(``goose_jax.core.config_files``). The base is a local Hugging Face T5 or decoder-only (Llama,
Qwen2,
Mistral) directory, a goose-jax (Orbax) model checkpoint, or ``random:PRESET``
(``models.base.load_base``). On a decoder-only base the loss is the causal-LM loss of the target
tokens and the prompts are encoded as ``goose_jax.models.causal.loss`` says; validation scores
the experts as goose-eval scores a decoder-only base (``goose_jax.evaluation.evaluator``). Data
files
are JSON lines ``{"input": ..., "target": ...}``: one per expert (``experts``, ``gate``), or
the mixture (``multitask``).

``experts`` trains all its experts in one jitted step, side by side. An expert's initialisation
and data order depend on the seed and its name only, so it is the same expert whether trained
alone (``expert``) or with others. ``gate`` trains the gates of experts already in the library
(base and LoRA frozen) and writes them into those experts' files.

Checked before any work: the data (UTF-8, JSON lines, token ids within the base's vocabulary),
the expert names (they become file names), the output paths (a directory that can be written,
not a file in the way), and that nothing would be replaced without ``overwrite``. A refused run
writes nothing, not even its ``run.json``. Training that diverges (a non-finite loss or
parameters) stops with one line and writes nothing to the output.

Validation (``expert`` / ``experts``; ``goose_jax.evaluation.validation``): each expert's
validation split
(``--validation``, or each training file's own: ``evaluation.validation.find_validation``) is
scored by its task metric at step 0, every ``eval_every`` steps and at the last step; each
expert keeps the step that scored best (ties: the later), and the library gets that step's
expert, with the step and score in its manifest entry (``info["validation"]``).

Resumable: the work directory keeps the last checkpoints (trainable trees, optimiser state,
step, data positions) and ``run.json``; rerunning the same command after an interruption
continues from the last checkpoint and ends with the same parameters as an uninterrupted run.
Metrics go to ``metrics.jsonl`` in the work directory (and TensorBoard, if ``tensorboardX`` is
installed). Errors a user can cause raise ``GooseError`` subclasses (goose-train prints one line
and exits 1); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from collections.abc import Callable, Sequence

import jax
import numpy as np

from goose_jax.core import checkpoint as core_checkpoint
from goose_jax.core import distributed, sharding
from goose_jax.core.config_files import apply_overrides, load_config
from goose_jax.core.errors import DataError, LibraryError, TrainConfigError, UsageError
from goose_jax.core.outputs import check_apart
from goose_jax.core.tensorfile import check_folder_writable
from goose_jax.data.batching import (
    Batcher,
    ConcatSource,
    ExampleSource,
    JsonlSource,
    check_token_ids,
)
from goose_jax.data.tokenizers import ByteTokenizer
from goose_jax.evaluation.validation import (
    BestKeeper,
    Validator,
    no_validation_note,
    read_validation,
    validation_files,
)
from goose_jax.experts.lora import LoRAConfig, init_experts, init_gates
from goose_jax.library.manifest import check_library_writable
from goose_jax.library.store import MANIFEST, ExpertLibrary, check_expert_name
from goose_jax.models import checkpoint, families
from goose_jax.models.base import load_base, load_tokenizer
from goose_jax.pipeline.run_records import (
    already_written,
    dropped_if_left_empty,
    not_written_here,
    one_run_per_workdir,
    read_run,
    record_run,
)
from goose_jax.training.loop import train_loop
from goose_jax.training.program import Program, TrainConfig, cast_floats

COMMANDS = ("expert", "experts", "gate", "multitask")


@dataclasses.dataclass(frozen=True)
class RunArgs:
    """What one run is given: goose-train's command line, or a script's arguments.

    Attributes:
      command: ``expert``, ``experts``, ``gate`` or ``multitask`` (recorded in ``run.json``).
      data: JSON-lines training files: one per expert (``expert(s)``, ``gate``), or the mixture
        (``multitask``).
      workdir: checkpoints, ``run.json`` and ``metrics.jsonl``.
      config: a python file with ``get_config() -> TrainConfig``; None: the paper's settings.
      overrides: ``key=value`` overrides of config fields.
      base: the base model (default: the config's ``base_model``).
      eval_data: held-out files in ``data`` order, evaluated every ``eval_every`` steps.
      validation: validation files in ``data`` order, or ``["none"]``; empty: each data file's
        ``<name>.validation.jsonl`` where they exist (``goose_jax.evaluation.validation``).
      library: the expert library (created if missing; required but for ``multitask_mode=full``).
      names: expert names in ``data`` order (default: the config's ``expert_names`` when their
        number fits, else the data files' stems).
      name: the name of the ``multitask`` expert.
      description: what the data is (stored in the library).
      overwrite: replace experts (or a model) that already exist in the output.
      mesh: device mesh sizes, e.g. ``data=2,expert=4`` (default: the config's ``mesh``).
      out: the model directory of ``multitask_mode=full``.
    """

    command: str
    data: Sequence[str]
    workdir: str
    config: str | None = None
    overrides: Sequence[str] = ()
    base: str | None = None
    eval_data: Sequence[str] = ()
    library: str | None = None
    names: Sequence[str] | None = None
    name: str = "multitask"
    description: str | None = None
    overwrite: bool = False
    mesh: str | None = None
    out: str | None = None
    validation: Sequence[str] = ()

    def __post_init__(self):
        if self.command not in COMMANDS:
            raise UsageError(f"RunArgs.command must be one of {COMMANDS}, got {self.command!r}")
        for name in ("data", "overrides", "eval_data", "validation"):
            if isinstance(getattr(self, name), str):
                raise UsageError(f"RunArgs.{name} must be a sequence of strings, not one string")


# --- config, base, mesh --------------------------------------------------------------------------


def load_train_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The ``TrainConfig`` of a config file (None: the defaults) with ``key=value`` overrides.

    Raises:
      TrainConfigError: a config file or override that cannot be used (one line).
    """
    cfg = load_config(path, TrainConfig, error=TrainConfigError)
    return apply_overrides(cfg, overrides, error=TrainConfigError)


def load_train_base(spec: str, tcfg: TrainConfig):
    """(cfg, params, tokenizer) of ``spec`` (a directory or ``random:PRESET``)."""

    byte = tcfg.tokenizer == "byte"
    if spec and spec.startswith("random:") and not byte:
        raise TrainConfigError(f"base {spec!r} has no tokenizer: use --set tokenizer=byte")
    cfg, params = load_base(spec, seed=tcfg.seed,
                            min_vocab_size=ByteTokenizer().vocab_size if byte else 0)
    return cfg, params, load_tokenizer(spec, cfg, byte=byte)


def train_mesh(text: str | None, num_experts: int = 1) -> jax.sharding.Mesh | None:
    """The mesh of ``--mesh`` / ``TrainConfig.mesh``; without one, None on a single process
    and, in a process group, a mesh over all global devices whose ``expert`` axis is as large
    as both the expert count and the device count allow (the rest is ``data``)."""
    if not text:
        if not distributed.is_multiprocess():
            return None
        n = jax.device_count()
        experts = math.gcd(max(num_experts, 1), n)
        return sharding.make_mesh(data=n // experts, expert=experts)
    try:
        return sharding.make_mesh(**sharding.parse_mesh(text))
    except ValueError as e:
        raise TrainConfigError(f"--mesh {text!r}: {e}") from None


class Setup:
    """What every run resolves first: config, base, tokenizer, data, mesh."""

    def __init__(self, args: RunArgs, min_files: int = 1):
        self.args = args
        tcfg = load_train_config(args.config, args.overrides)
        self.tcfg = tcfg
        # Cheap checks first: data files and the mesh fail before a model is read.
        if len(args.data) < min_files:
            raise DataError(f"{args.command}: needs at least {min_files} --data file(s)")
        self.sources = [JsonlSource(p) for p in args.data]
        self.eval_sources = [JsonlSource(p) for p in args.eval_data]
        self.validation = None
        if args.command in ("expert", "experts") and tcfg.eval_every:
            self.validation = validation_files(args.data, args.validation)
            if self.validation is None and not args.validation and distributed.is_primary():
                print(no_validation_note(args.data), flush=True)
        self.base_spec = args.base or tcfg.base_model
        read = {"--data": args.data, "--eval-data": args.eval_data, "--config": args.config,
                "--validation": self.validation or [], "--base": self.base_spec}
        # The library is read too (its base, the experts a gate run trains on): the work
        # folder and a full model's --out stay out of it.
        check_apart({"--library": args.library}, read)
        check_apart({"--workdir": args.workdir, "--out": args.out},
                    {**read, "--library": args.library})
        check_apart({"--out": args.out}, {"--workdir": args.workdir})
        check_folder_writable(args.workdir, error=TrainConfigError,
                              fix="; choose another --workdir")
        experts = len(self.sources) if args.command in ("experts", "gate") else 1
        try:
            self.mesh = train_mesh(args.mesh or tcfg.mesh, experts)
        except TrainConfigError as e:  # a bad --mesh flag is a usage error (exit 2)
            if not args.mesh:
                raise
            raise UsageError(str(e)) from None
        cfg, params, self.tokenizer = load_train_base(self.base_spec, tcfg)
        tcfg.check_family(cfg)
        fam = families.of(cfg)
        # How the batches encode inputs (as the T5's, or as prompts): the family's.
        self.encoding = fam.batch_encoding(cfg, self.tokenizer)
        for source in self.sources + self.eval_sources:
            check_token_ids(source, cfg.vocab_size)
        if args.command != "gate" and not (args.command == "multitask"
                                           and tcfg.multitask_mode == "full"):
            tcfg.check_model(cfg)  # the experts' sites, before any work
        self.full_cfg = cfg
        # Training runs with the tokenizer's special tokens (the library records the base's
        # own config, full_cfg).
        self.cfg = fam.with_tokenizer(cfg.with_dtypes(tcfg.param_dtype, tcfg.compute_dtype),
                                      self.tokenizer)
        self.host_params = params  # this process's own copy: libraries fingerprint it
        self.params = params
        if self.mesh is not None:
            self.params = sharding.shard_params(self.params, families.param_logical_axes(cfg),
                                                self.mesh)

    def frozen_base(self):
        """The base params in the config's storage dtype (frozen during every run here)."""
        return cast_floats(self.params, self.cfg.dtype.param)

    def batcher(self, source: ExampleSource, stream: int) -> Batcher:
        """A ``Batcher`` of ``source`` with the config's batch shape, stream ``stream``."""
        return Batcher.from_config(source, self.tokenizer, self.tcfg, stream,
                                   vocab_size=self.cfg.vocab_size, **self.encoding)

    def identity(self, **extra) -> dict:
        """What ``run.json`` records of this run (a rerun must match it to resume)."""
        validation = {"validation": self.validation} if self.validation else {}
        return {"command": self.args.command, "config": self.tcfg.to_dict(),
                "base": self.base_spec, "data": [os.path.abspath(p) for p in self.args.data],
                "eval_data": [os.path.abspath(p) for p in self.args.eval_data], **validation,
                **extra}


# --- run bookkeeping ------------------------------------------------------------------------------


def stream_id(name: str) -> int:
    """The data stream (and init key) of an expert: a function of its name only."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def expert_names(args: RunArgs, tcfg: TrainConfig, count: int) -> list[str]:
    """The experts' names, in data order: given, else the config's, else the files' stems."""
    names = list(args.names or [])
    if not names and tcfg.expert_names and len(tcfg.expert_names) == count:
        names = list(tcfg.expert_names)
    if not names:
        names = [os.path.splitext(os.path.basename(p))[0] for p in args.data]
    if len(names) != count:
        raise TrainConfigError(f"{len(names)} names for {count} --data files")
    if len(set(names)) != len(names):
        raise TrainConfigError(f"expert names must be distinct, got {names}")
    for name in names:  # before any work: a name becomes experts/<name>.safetensors
        check_expert_name(name, "--names" if args.names else "expert name")
    if tcfg.num_experts and count != tcfg.num_experts:
        raise TrainConfigError(f"config expects {tcfg.num_experts} experts, got {count} "
                               "--data files (set num_experts=0 to allow any number)")
    return names


def existing_library(path: str, setup: Setup, lora: LoRAConfig) -> ExpertLibrary | None:
    """The library at ``path`` checked against ``setup``'s base and ``lora`` (None if there is
    none yet, and it can be created there); reads only."""
    check_library_writable(path, error=TrainConfigError)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return ExpertLibrary.create(path, setup.full_cfg, setup.host_params, lora, exist_ok=True)
    if os.path.isdir(path) and os.listdir(path):
        raise LibraryError(f"{os.path.abspath(path)}: exists and is neither an empty directory "
                           f"nor an expert library (no {MANIFEST}); choose another --library")
    return None


def create_library(path: str, setup: Setup, lora: LoRAConfig) -> ExpertLibrary:
    """The library at ``path`` for ``setup``'s base, created if missing."""
    # Process 0 creates (or checks) the library; the others open it once it exists. No process
    # writes before every process has checked its inputs (``existing_library`` reads a folder
    # that process 0 would otherwise already be filling).
    distributed.barrier("goose-train: inputs checked")
    lib = None
    if distributed.is_primary():
        lib = ExpertLibrary.create(path, setup.full_cfg, setup.host_params, lora, exist_ok=True)
    distributed.barrier("goose-train: library created")
    if lib is None:
        lib = ExpertLibrary.create(path, setup.full_cfg, setup.host_params, lora, exist_ok=True)
    return lib


def write_experts(lib: ExpertLibrary, entries: Sequence[tuple]) -> None:
    """Writes ``(name, experts, gates, index, info, message)`` entries from process 0, after
    every process has gathered the trained trees; the others wait until they are on disk."""
    for name, experts, gates, index, info, message in entries:
        if distributed.is_primary():
            lib.add(name, experts, gates, index=index, info=info, overwrite=True)
            print(message)
    distributed.barrier("goose-train: library written")


def write_trained(lib: ExpertLibrary, names: Sequence[str], experts, gates, history: dict,
                  info: Callable[[int, dict], dict], label: str,
                  note: Callable[[int], str] | None = None) -> None:
    """Writes expert ``i`` of a many-experts run as ``names[i]`` (with its gates, if given), its
    manifest facts ``info(i, its metrics)``, and prints its last ``label`` (after ``note(i)``,
    if given; see ``write_experts``)."""
    entries = []
    for i, name in enumerate(names):
        metrics = expert_metrics(history, i)
        entries.append((name, experts, gates, i, info(i, metrics),
                        f"{name}: {note(i) if note else ''}{label} "
                        f"{_mean(metrics.get('loss', np.nan)):.4f} -> {lib.path}"))
    write_experts(lib, entries)


def eval_batchers(setup: Setup, names: Sequence[str]) -> list[Batcher] | None:
    """The held-out batchers, one per expert, or None without eval data."""
    if not setup.eval_sources:
        return None
    if len(setup.eval_sources) != len(names):
        raise DataError(f"{len(setup.eval_sources)} --eval-data files for {len(names)} experts")
    return [setup.batcher(s, stream_id(n)) for s, n in zip(setup.eval_sources, names)]


def expert_metrics(history: dict, i: int) -> dict:
    """Expert ``i`` 's share of a many-experts history (per-expert lists; scalars shared)."""
    return {k: (v[i] if isinstance(v, list) else v) for k, v in history.items()}


def _mean(v) -> float:
    return float(np.mean(v))


def _require(value, flag: str, command: str) -> None:
    if not value:
        raise UsageError(f"{command}: needs {flag}")


# --- runs -----------------------------------------------------------------------------------------


@one_run_per_workdir
def run_experts(args: RunArgs) -> int:
    """``expert`` / ``experts``: trains one LoRA expert per data file, all at once, into the
    library (see the module doc). Returns 0."""
    if args.command == "expert" and len(args.data) != 1:
        raise TrainConfigError("expert trains one expert from one --data file (use `experts` "
                               "for several)")
    _require(args.library, "--library", args.command)
    setup = Setup(args)
    tcfg, lora = setup.tcfg, setup.tcfg.lora
    names = expert_names(args, tcfg, len(setup.sources))
    # Every refusal comes before the first write (library, run.json, checkpoints).
    identity = setup.identity(names=names)
    recorded = read_run(args.workdir, identity)
    lib = existing_library(args.library, setup, lora)
    if already_written(bool(recorded and recorded.get("finished")), lib, names, args.workdir):
        return 0
    clash = not_written_here(lib, names, args.workdir)
    if clash and not args.overwrite:
        raise TrainConfigError(f"{lib.path}: already has experts {clash} that this run "
                               f"({args.workdir}) did not write; pass --overwrite to replace them")
    batchers = [setup.batcher(s, stream_id(n)) for s, n in zip(setup.sources, names)]
    evals = eval_batchers(setup, names)
    examples = [read_validation(p, n) for p, n in zip(setup.validation or (), names)]
    best = None
    if examples:   # before the library is made: a validation rule is checked here
        validator = Validator(setup.cfg, setup.frozen_base(), setup.tokenizer, examples,
                              lora_scale=lora.lora_scale, tcfg=tcfg, mesh=setup.mesh)
        best = BestKeeper(validator.scores, validator.metrics)
    existed = lib is not None
    lib = create_library(args.library, setup, lora)
    with dropped_if_left_empty(args.library, existed):
        return _train_experts(args, setup, lib, names, identity, recorded, batchers, evals,
                              examples, best)


def _train_experts(args, setup, lib, names, identity, recorded, batchers, evals,
                   examples, best) -> int:
    tcfg, lora = setup.tcfg, setup.tcfg.lora
    if recorded is None:
        record_run(args.workdir, identity)
    root = jax.random.key(tcfg.seed)
    trainable = init_experts(
        setup.cfg, lora, [jax.random.fold_in(root, stream_id(n)) for n in names],
        fast_compile=tcfg.fast_compile, mesh=setup.mesh)
    program = Program("expert", setup.cfg, tcfg, tcfg.steps, lora.lora_scale, mesh=setup.mesh)
    state, history, ran = train_loop(program, setup.frozen_base(), None, trainable, batchers,
                                     args.workdir, eval_batchers=evals,
                                     mesh=setup.mesh, desc=f"{len(names)} expert(s)",
                                     seed_key=root, best=best)
    if not already_written(ran == 0, lib, names, args.workdir):
        def info(i, metrics):
            record = {"data": args.description or os.path.abspath(args.data[i]),
                      "workdir": os.path.realpath(args.workdir), "steps": tcfg.steps,
                      "metrics": metrics, "train_config": tcfg.to_dict()}
            if best is not None:
                record["validation"] = {"data": setup.validation[i],
                                        "examples": len(examples[i]),
                                        "every": tcfg.eval_every, **best.expert(i)}
            return record

        def note(i):
            return (f"step {best.step[i]} ({best.metrics[i]} {best.score[i]:.1f} on validation), "
                    "last ")

        trained = best.trainable if best is not None else state.trainable
        write_trained(lib, names, distributed.fetch(trained), None, history, info, "loss",
                      note if best is not None else None)
    record_run(args.workdir, identity, finished=True)
    return 0


@one_run_per_workdir
def run_gate(args: RunArgs) -> int:
    """``gate``: trains the PHATGOOSE gates of library experts (base and LoRA frozen) and
    writes them into those experts' files. Returns 0."""
    _require(args.library, "--library", args.command)
    setup = Setup(args)
    tcfg = setup.tcfg
    lib = ExpertLibrary.open(args.library, setup.full_cfg, setup.host_params)
    check_library_writable(lib.path, error=TrainConfigError)   # the gates are written there
    names = expert_names(args, tcfg, len(setup.sources))
    missing = [n for n in names if n not in lib]
    if missing:
        raise LibraryError(f"{lib.path}: no expert named {', '.join(map(repr, missing))} (it "
                           f"holds {lib.names}); train the experts first, or fix --names")
    identity = setup.identity(names=names, library=lib.path)
    recorded = read_run(args.workdir, identity)
    if already_written(bool(recorded and recorded.get("finished")), lib, names, args.workdir,
                       gates=True):
        return 0
    gated = not_written_here(lib, names, args.workdir, gates=True)
    if gated and not args.overwrite:
        raise TrainConfigError(f"{lib.path}: experts {gated} already have gates that this run "
                               f"({args.workdir}) did not train; pass --overwrite to replace them")
    experts, _ = lib.load(names, dtype=None, gates=False)
    batchers = [setup.batcher(s, stream_id(n)) for s, n in zip(setup.sources, names)]
    evals = eval_batchers(setup, names)
    if recorded is None:
        record_run(args.workdir, identity)
    frozen = cast_floats(experts, setup.cfg.dtype.param)
    if setup.mesh is not None:
        frozen = sharding.shard_experts(frozen, setup.mesh)
    program = Program("gate", setup.cfg, tcfg, tcfg.gate_steps, lib.scale, mesh=setup.mesh)
    gates = init_gates(experts, mesh=setup.mesh)
    state, history, ran = train_loop(program, setup.frozen_base(), frozen, gates,
                                     batchers, args.workdir, eval_batchers=evals,
                                     mesh=setup.mesh, desc=f"{len(names)} gate(s)",
                                     seed_key=jax.random.key(tcfg.seed))
    if not already_written(ran == 0, lib, names, args.workdir, gates=True):
        def info(i, metrics):
            return {**lib.info(names[i]), "gate": {
                "steps": tcfg.gate_steps, "data": os.path.abspath(args.data[i]),
                "workdir": os.path.realpath(args.workdir), "metrics": metrics}}

        write_trained(lib, names, experts, distributed.fetch(state.trainable), history, info,
                      "gate loss")
    record_run(args.workdir, identity, finished=True)
    return 0


@one_run_per_workdir
def run_multitask(args: RunArgs) -> int:
    """``multitask``: trains one LoRA expert (into the library) or the whole model (into
    ``args.out``) on the mixture of the data files. Returns 0."""
    setup = Setup(args)
    tcfg = setup.tcfg
    full = tcfg.multitask_mode == "full"
    if full and not args.out:
        raise TrainConfigError("multitask_mode=full writes a model: pass --out DIR")
    if not full and not args.library:
        raise TrainConfigError("multitask_mode=lora writes one expert: pass --library DIR")
    identity = setup.identity(name=args.name)
    recorded = read_run(args.workdir, identity)
    mixture = ConcatSource(setup.sources)
    batchers = [setup.batcher(mixture, stream_id(args.name))]
    evals = None
    if setup.eval_sources:
        evals = [setup.batcher(ConcatSource(setup.eval_sources), stream_id(args.name))]
    key = jax.random.key(tcfg.seed)
    if full:
        core_checkpoint.check_destination(args.out,
                                          overwrite=recorded is not None or args.overwrite)
        if recorded is None:
            record_run(args.workdir, identity)
        program = Program("full", setup.cfg.with_dtypes("float32", tcfg.compute_dtype), tcfg,
                          tcfg.steps, many=False, mesh=setup.mesh)
        state, history, _ = train_loop(program, None, None, setup.params, batchers,
                                       args.workdir, eval_batchers=evals, mesh=setup.mesh,
                                       desc="multitask (full)", seed_key=key)
        written = checkpoint.save_model(args.out, setup.full_cfg.with_dtypes(
            "float32", setup.full_cfg.dtype.compute_dtype), state.trainable,
            overwrite=recorded is not None or args.overwrite)
        record_run(args.workdir, identity, finished=True)
        if distributed.is_primary():
            print(f"multitask model: loss {_mean(history.get('loss', np.nan)):.4f} -> "
                  f"{written}")
        return 0
    check_expert_name(args.name, "--name")
    lora = tcfg.lora
    lib = existing_library(args.library, setup, lora)
    if already_written(bool(recorded and recorded.get("finished")), lib, [args.name],
                       args.workdir):
        return 0
    if not_written_here(lib, [args.name], args.workdir) and not args.overwrite:
        raise TrainConfigError(f"{lib.path}: already has {args.name!r}, which this run "
                               f"({args.workdir}) did not write; pass --overwrite")
    existed = lib is not None
    lib = create_library(args.library, setup, lora)
    with dropped_if_left_empty(args.library, existed):
        return _train_multitask_expert(args, setup, lib, identity, recorded, batchers, evals,
                                       key)


def _train_multitask_expert(args, setup, lib, identity, recorded, batchers, evals, key) -> int:
    tcfg, lora = setup.tcfg, setup.tcfg.lora
    if recorded is None:
        record_run(args.workdir, identity)
    trainable = init_experts(setup.cfg, lora, [jax.random.fold_in(key, stream_id(args.name))],
                             fast_compile=tcfg.fast_compile, mesh=setup.mesh)
    program = Program("expert", setup.cfg, tcfg, tcfg.steps, lora.lora_scale, many=False,
                      mesh=setup.mesh)
    state, history, ran = train_loop(program, setup.frozen_base(), None, trainable, batchers,
                                     args.workdir, eval_batchers=evals, mesh=setup.mesh,
                                     desc="multitask (lora)", seed_key=key)
    if not already_written(ran == 0, lib, [args.name], args.workdir):
        info = {"data": args.description or "mixture of " + ", ".join(map(os.path.abspath,
                                                                          args.data)),
                "workdir": os.path.realpath(args.workdir), "steps": tcfg.steps,
                "metrics": history, "train_config": tcfg.to_dict()}
        write_experts(lib, [(args.name, distributed.fetch(state.trainable), None, None, info,
                              f"{args.name}: loss {_mean(history.get('loss', np.nan)):.4f} -> "
                              f"{lib.path}")])
    record_run(args.workdir, identity, finished=True)
    return 0
