"""``goose-train prototypes``: the average-activation baseline's router vectors, computed from
each expert's own training data and stored in its library.

    goose-train prototypes --base B --library LIB --data a.jsonl b.jsonl --names a b \\
        [--examples 1000] [--pooling example] [--config C] [--set KEY=VALUE] [--overwrite]

Per expert (PHATGOOSE.md section 6, the original release's ``compute_hiddens`` run): up to
``examples`` examples of its data file (a seeded draw: the first ones of the permutation its
training would visit first), run through the base model with that expert's LoRA active; per
site, the mean input over non-pad tokens (on a T5, encoder tokens for encoder sites and
cross-attention k / v, teacher-forced target tokens for the other decoder sites; on a
decoder-only base, every real token of the prompt-and-target sequence its training packs,
``routing.methods.compute_average_activations``), pooled per example and then over examples
(``--pooling example``, the release's) or over all tokens at once (``token``).

The result goes to ``<library>/prototypes.safetensors``
(``library.prototypes.PROTOTYPES_FILE``, beside ``manifest.json``), one row per expert with the
experts' names in its header, where
``goose-eval --method average_activation`` finds it without ``--prototypes``. An existing file is
replaced only with ``overwrite``. Tokenizer, lengths and seed come from the training config
(``--config`` / ``--set``, as for the other goose-train commands).

Checked before any model is read: the library and the experts it must hold, the data files,
the names, the output file. Errors a user can cause raise ``GooseError`` subclasses.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

from goose_jax.core.errors import LibraryError, TrainConfigError, UsageError
from goose_jax.core.outputs import check_apart
from goose_jax.core.tensorfile import check_folder_writable
from goose_jax.data.batching import Batcher, JsonlSource, check_token_ids
from goose_jax.library.prototypes import PROTOTYPES_FILE
from goose_jax.library.store import ExpertLibrary, save_prototypes
from goose_jax.models import families
from goose_jax.pipeline.train_runs import load_train_base, load_train_config, stream_id
from goose_jax.routing.methods import POOLINGS, compute_average_activations
from goose_jax.training.program import cast_floats

DEFAULT_EXAMPLES = 1000  # per expert, as the paper and the release


@dataclasses.dataclass(frozen=True)
class PrototypeArgs:
    """What one prototypes run is given (``goose-train prototypes``'s flags).

    Attributes:
      library: the expert library; the file is written into it.
      data: JSON-lines training data, one file per expert.
      names: the experts, in ``data`` order (default: the data files' stems).
      base: the base model (default: the config's ``base_model``).
      config: a python file with ``get_config() -> TrainConfig`` (tokenizer, lengths, seed,
        dtypes); None: the paper's settings.
      overrides: ``key=value`` overrides of config fields.
      examples: at most this many examples per expert.
      pooling: ``example`` (per-example means, then their mean: the release's) or ``token``.
      batch_size: examples per forward pass.
      overwrite: replace prototypes the library already holds.
    """

    library: str
    data: Sequence[str]
    names: Sequence[str] | None = None
    base: str | None = None
    config: str | None = None
    overrides: Sequence[str] = ()
    examples: int = DEFAULT_EXAMPLES
    pooling: str = "example"
    batch_size: int = 16
    overwrite: bool = False

    def __post_init__(self):
        if isinstance(self.data, str) or isinstance(self.names, str):
            raise UsageError("PrototypeArgs.data and names must be sequences of strings")
        if self.pooling not in POOLINGS:
            raise UsageError(f"--pooling {self.pooling!r}: expected one of {list(POOLINGS)}")
        for flag, value in (("--examples", self.examples), ("--batch-size", self.batch_size)):
            if value < 1:
                raise UsageError(f"{flag} {value}: must be at least 1")


def prototypes_path(library: str) -> str:
    """Where a library keeps its prototypes."""

    return os.path.join(library, PROTOTYPES_FILE)


def _names(args: PrototypeArgs) -> list[str]:
    names = list(args.names or [os.path.splitext(os.path.basename(p))[0] for p in args.data])
    if len(names) != len(args.data):
        raise UsageError(f"{len(names)} --names for {len(args.data)} --data files; give one "
                         "name per file")
    if len(set(names)) != len(names):
        raise UsageError(f"expert names must be distinct, got {names}")
    return names


def expert_batches(cfg, source, tokenizer, tcfg, name: str, examples: int,
                   batch_size: int) -> Iterator[tuple]:
    """One expert's ``compute_average_activations`` batches over its first
    ``min(examples, len(source))`` examples in the seeded order of its training stream
    (``pipeline.train_runs.stream_id``), encoded as its training encoded them.

    As the family's ``activation_batch`` gives them: on a T5, ``(ids_BL, mask_BL, dec_BT,
    dec_mask_BT)``, the targets teacher-forced (shifted right after the decoder start token); on
    a decoder-only model, ``(ids_BS, mask_BS)``, each example's prompt and target packed into
    one sequence exactly as decoder-only training packs them (``models.causal.loss``).
    """

    fam = families.of(cfg)
    encoding = fam.batch_encoding(cfg, tokenizer)
    cfg = fam.with_tokenizer(cfg, tokenizer)
    batcher = Batcher(source, tokenizer, micro_batch=batch_size, grad_accum=1,
                      max_input_length=tcfg.max_input_length,
                      max_target_length=tcfg.max_target_length, seed=tcfg.seed,
                      stream=stream_id(name), vocab_size=cfg.vocab_size, **encoding)
    n = min(examples, len(source))
    for pos in range(0, n, batch_size):
        x = batcher.batch(pos, rows=slice(0, min(batch_size, n - pos)))
        x = {k: v[0] for k, v in x.items()}   # one micro-batch (grad_accum=1)
        yield fam.activation_batch(cfg, x, tokenizer)


def run_prototypes(args: PrototypeArgs) -> int:
    """Computes and writes the library's prototypes (see the module doc). Returns 0.

    Raises:
      GooseError: a library, data file, name or output that cannot be used (one line each),
        before any model is read.
    """

    names = _names(args)
    tcfg = load_train_config(args.config, args.overrides)
    lib = ExpertLibrary.open(args.library)   # the manifest only
    missing = [n for n in names if n not in lib]
    if missing:
        raise LibraryError(f"{lib.path}: no expert named {missing[:3]} (it holds "
                           f"{lib.names[:8]}); fix --names or train the experts first")
    out = prototypes_path(lib.path)
    if os.path.exists(out) and not args.overwrite:
        raise LibraryError(f"{out}: the library already holds prototypes; pass --overwrite to "
                           "replace them")
    if os.path.isdir(out):
        raise LibraryError(f"{out}: is a directory; remove it to write the prototypes there")
    check_apart({"--library": args.library}, {"--data": args.data, "--config": args.config,
                                              "--base": args.base or tcfg.base_model})
    check_folder_writable(lib.path, error=TrainConfigError, fix="; choose another --library")
    sources = [JsonlSource(p) for p in args.data]
    cfg, params, tok = load_train_base(args.base or tcfg.base_model, tcfg)
    for source in sources:
        check_token_ids(source, cfg.vocab_size)
    lib = ExpertLibrary.open(lib.path, cfg, params)   # the base the library was trained on
    experts, _ = lib.load(names, gates=False)
    run_cfg = cfg.with_dtypes(tcfg.param_dtype, tcfg.compute_dtype)
    counts = [min(args.examples, len(s)) for s in sources]
    # Lazy: each expert's batches are tokenised while its prototypes are computed.
    batches = [expert_batches(cfg, s, tok, tcfg, n, args.examples, args.batch_size)
               for s, n in zip(sources, names)]
    protos = compute_average_activations(run_cfg, cast_floats(params, run_cfg.dtype.param),
                                         experts, batches, scale=lib.scale,
                                         pooling=args.pooling)
    info = {"pooling": args.pooling, "examples": dict(zip(names, counts)),
            "data": dict(zip(names, map(os.path.abspath, args.data))),
            "base": args.base or tcfg.base_model}
    save_prototypes(protos, out, names=names, info=info)
    print(f"prototypes of {len(names)} experts ({args.pooling} pooling, "
          f"{min(counts)}-{max(counts)} examples each) -> {out}")
    return 0
