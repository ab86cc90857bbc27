"""Example sources and the step batches built from them: a pure function of (seed, stream,
position).

Shapes follow the package legend (the ``goose_jax`` module docstring): E counts the experts
(streams) side by side, L is the input length and T the target length. Also used here:
A microbatches (gradient accumulation), M examples per microbatch.

An ``ExampleSource`` is a sequence of (input, target) pairs, each a string or a pre-tokenised int
sequence (``JsonlSource`` reads them from a JSON-lines file; ``ConcatSource`` mixes several).
``Batcher`` turns one into step batches whose content is a pure function of (seed, stream,
position), which makes an interrupted run resume bit-exactly; ``global_batch`` assembles one
step's batch of every stream, on a device mesh each process building only its own share.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np

from goose_jax.core import sharding
from goose_jax.core.errors import DataError


class ExampleSource(Protocol):
    """A finite sequence of (input, target) examples: strings or pre-tokenised int sequences."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[str | Sequence[int], str | Sequence[int]]: ...


class Tokenizer(Protocol):
    """What batching needs of a tokenizer: its pad id and ``encode_batch`` (ids and mask, padded to
    ``max_length``)."""
    pad_id: int

    def encode_batch(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        ...


class JsonlSource:
    """Examples from a JSON-lines file, one ``{"input": ..., "target": ...}`` object per line.

    Values are strings, or lists of ints (already tokenised, used as they are). Blank lines are
    skipped. The file is read once, at construction.

    Raises:
      DataError: naming the file (and line) when it is missing, malformed or empty, or a row's
        target is empty (nothing to learn: a no-op expert).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        self.name = os.path.splitext(os.path.basename(self.path))[0]
        try:
            with open(self.path, "rb") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise DataError(f"{self.path}: cannot read the data file: {e.strerror}") from None
        self.examples = []
        self.line_numbers = []  # the file line of each example, for messages
        for i, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")  # a leading BOM is no text
            except UnicodeDecodeError as e:
                raise DataError(f"{self.path}:{i}: not UTF-8 text (byte {raw[e.start]:#04x} at "
                                f"column {e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and all(_is_example_part(row.get(k))
                                                   for k in ("input", "target"))
            except (ValueError, RecursionError):
                ok = False
            if not ok:
                raise DataError(f"{self.path}:{i}: expected a JSON object with 'input' and "
                                "'target' (strings or lists of ints)")
            for key in ("input", "target"):
                check_text(row[key], f"{self.path}:{i}", key)
            for key in ("input", "target"):
                if isinstance(row[key], list) and row[key] and min(row[key]) < 0:
                    raise DataError(f"{self.path}:{i}: {key!r} holds the token id "
                                    f"{min(row[key])}; ids are >= 0")
            target = row["target"]
            if not (target.strip() if isinstance(target, str) else target):
                raise DataError(f"{self.path}:{i}: 'target' is empty ({target!r}): an expert "
                                "learns nothing from it; remove the row or give its answer")
            self.examples.append((row["input"], row["target"]))
            self.line_numbers.append(i)
        if not self.examples:
            raise DataError(f"{self.path}: no examples (empty dataset)")

    def check_token_ids(self, vocab_size: int) -> None:
        """Checks every pre-tokenised id against the model's vocabulary, before any work.

        Raises:
          DataError: naming the file, the line and the id, for an id >= ``vocab_size``.
        """
        for (inp, tgt), i in zip(self.examples, self.line_numbers):
            for key, part in (("input", inp), ("target", tgt)):
                if isinstance(part, list) and part and max(part) >= vocab_size:
                    raise DataError(f"{self.path}:{i}: {key!r} holds the token id {max(part)}, "
                                    f"outside the model's vocabulary (0 .. {vocab_size - 1}); "
                                    "tokenised for another model?")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        return self.examples[index]


def check_text(value, where: str, key: str) -> None:
    """Raises DataError unless ``value`` (a str; anything else passes) is text UTF-8 can encode:
    JSON's ``\\ud800``-style escapes can spell half of a UTF-16 pair (a lone surrogate), which no
    tokenizer can encode; found here, before any work, rather than at the first batch."""
    if not isinstance(value, str):
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: {key!r} holds a lone surrogate U+{ord(value[e.start]):04X} at "
                        f"character {e.start + 1} (half of a UTF-16 pair, not text); fix the "
                        "file's \\u escapes") from None


def _is_example_part(v) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in v))


class ConcatSource:
    """Several sources as one (a multitask mixture, examples-proportional)."""

    def __init__(self, sources: Sequence[ExampleSource]):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int):
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[k][index - int(self.offsets[k])]

    def check_token_ids(self, vocab_size: int) -> None:
        """``JsonlSource.check_token_ids`` of every source that has it."""
        for source in self.sources:
            check_token_ids(source, vocab_size)


def check_token_ids(source: ExampleSource, vocab_size: int) -> None:
    """Checks ``source``'s pre-tokenised ids against ``vocab_size`` where it can (one pass over
    the ids); the ids of other sources are checked as ``Batcher`` encodes their batches."""
    check = getattr(source, "check_token_ids", None)
    if check is not None:
        check(vocab_size)


class Batcher:
    """Step batches of one example stream, a pure function of (seed, stream, position).

    The stream visits its examples in epochs, each in the order of a permutation drawn from
    ``(seed, stream, epoch)``; ``batch(position)`` holds the ``batch_size`` examples from
    ``position`` on (positions count examples, across epochs). So a resumed run that knows its
    position reads exactly what an uninterrupted run would have.

    Text inputs end with the tokenizer's EOS unless ``input_eos`` is False, and start with the
    token ``input_bos`` if one is given (counted in ``max_input_length``); targets always end
    with EOS. Pre-tokenised parts are used as they are.
    """

    def __init__(self, source: ExampleSource, tokenizer: Tokenizer, *, micro_batch: int,
                 grad_accum: int, max_input_length: int, max_target_length: int, seed: int,
                 stream: int = 0, vocab_size: int | None = None, input_bos: int | None = None,
                 input_eos: bool = True):
        if len(source) == 0:
            raise DataError(f"{getattr(source, 'path', 'data source')}: no examples")
        self.source, self.tokenizer = source, tokenizer
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.lengths = (max_input_length, max_target_length)
        self.seed, self.stream, self.vocab_size = seed, stream, vocab_size
        self.input_bos, self.input_eos = input_bos, input_eos

    @classmethod
    def from_config(cls, source, tokenizer, tcfg: Any, stream: int = 0,
                    vocab_size: int | None = None, **encoding) -> Batcher:
        """A batcher with the batch shape and lengths of ``tcfg`` (a
        ``training.program.TrainConfig``); ``encoding``: ``input_bos`` / ``input_eos`` (see
        ``__init__``)."""
        return cls(source, tokenizer, micro_batch=tcfg.micro_batch, grad_accum=tcfg.grad_accum,
                   max_input_length=tcfg.max_input_length,
                   max_target_length=tcfg.max_target_length, seed=tcfg.seed, stream=stream,
                   vocab_size=vocab_size, **encoding)

    @property
    def batch_size(self) -> int:
        return self.micro_batch * self.grad_accum

    @functools.lru_cache(maxsize=4)  # noqa: B019 -- a few epochs' permutations, per batcher
    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, self.stream, epoch))
        return rng.permutation(len(self.source))

    def indices(self, position: int) -> np.ndarray:
        """Example indices of the batch starting at ``position``: (batch_size,)."""
        n = len(self.source)
        pos = position + np.arange(self.batch_size)
        return np.array([self._permutation(int(p // n))[int(p % n)] for p in pos], np.int64)

    def _encode(self, parts, max_length: int, bos: int | None = None,
                eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(parts), max_length), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((len(parts), max_length), np.int32)
        texts = [(i, p) for i, p in enumerate(parts) if isinstance(p, str)]
        if texts:
            rows = [i for i, _ in texts]
            if bos is None:
                ids[rows], mask[rows] = self.tokenizer.encode_batch(
                    [p for _, p in texts], max_length, add_eos=eos)
            else:  # BOS first, then the text truncated to the room left
                ids[rows, 0], mask[rows, 0] = bos, 1
                if max_length > 1:
                    ids[rows, 1:], mask[rows, 1:] = self.tokenizer.encode_batch(
                        [p for _, p in texts], max_length - 1, add_eos=eos)
        for i, p in enumerate(parts):
            if not isinstance(p, str):
                p = list(p)[:max_length]
                ids[i, :len(p)], mask[i, :len(p)] = p, 1
        if self.vocab_size is not None and ids.size and (ids.max() >= self.vocab_size
                                                         or ids.min() < 0):
            bad = ids.max() if ids.max() >= self.vocab_size else ids.min()
            raise DataError(f"{getattr(self.source, 'path', 'data')}: token id {bad} is "
                            f"outside the model's vocabulary (0 .. {self.vocab_size - 1}); wrong "
                            "tokenizer for this model?")
        return ids, mask

    def batch(self, position: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        """``inputs`` / ``input_mask`` (A, M, L) and ``targets`` (A, M, T), int32.

        Args:
          position: the stream position of the batch's first example.
          rows: only these microbatch rows (a slice of M), e.g. the rows one host's devices
            hold; only their examples are read and tokenised. Default: all M.
        """
        picked = self.indices(position).reshape(self.grad_accum, self.micro_batch)
        if rows is not None:
            picked = picked[:, rows]
        examples = [self.source[int(i)] for i in picked.reshape(-1)]
        inputs, input_mask = self._encode([e[0] for e in examples], self.lengths[0],
                                          self.input_bos, self.input_eos)
        targets, _ = self._encode([e[1] for e in examples], self.lengths[1])
        shape = (self.grad_accum, picked.shape[1])
        return {"inputs": inputs.reshape(shape + (-1,)),
                "input_mask": input_mask.reshape(shape + (-1,)),
                "targets": targets.reshape(shape + (-1,))}


def stack_batches(batches: Sequence[dict]) -> dict[str, np.ndarray]:
    """E per-stream batches -> one batch with a leading E axis."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def global_batch(batchers: Sequence[Batcher], positions: Sequence[int],
                 mesh: jax.sharding.Mesh | None = None, *, many: bool = True) -> dict:
    """One step's batch, built where it is needed.

    Without a mesh: NumPy arrays, ``stack_batches`` of every batcher's batch (``many``) or the
    one batcher's batch. With a mesh (of one process or several): global arrays laid out as
    ``core.sharding.shard_batch`` lays them out, each process reading and tokenising only the
    experts and
    microbatch rows its own devices hold. The values are those of the single-process batch,
    whatever the mesh or the number of processes, since a batch is a pure function of
    (seed, stream, position).

    Args:
      batchers: one per expert (``many``), or one.
      positions: each batcher's stream position.
      mesh: the device mesh, or None.
      many: the batch has a leading expert axis E.

    Returns:
      ``inputs`` / ``input_mask`` [E, A, M, L] and ``targets`` [E, A, M, T] (no E without
      ``many``), int32.
    """
    if mesh is None:
        parts = [b.batch(p) for b, p in zip(batchers, positions)]
        return stack_batches(parts) if many else parts[0]
    b0 = batchers[0]
    lengths = {"inputs": b0.lengths[0], "input_mask": b0.lengths[0], "targets": b0.lengths[1]}
    lead = (len(batchers),) if many else ()
    shapes = {k: jax.ShapeDtypeStruct(lead + (b0.grad_accum, b0.micro_batch, n), np.int32)
              for k, n in lengths.items()}
    shardings = sharding.batch_shardings(shapes, mesh, many)
    cache: dict = {}

    def block(experts: range, rows: slice) -> dict:
        # Devices that hold the same block (replicas over "model") share one build.
        key = (experts.start, experts.stop, rows.start, rows.stop)
        if key not in cache:
            parts = [batchers[e].batch(positions[e], rows) for e in experts]
            cache[key] = stack_batches(parts) if many else parts[0]
        return cache[key]

    def build(name):
        def callback(index):
            index = tuple(index) + (slice(None),) * (len(shapes[name].shape) - len(index))
            if many:
                experts = range(len(batchers))[index[0]]
                rows = slice(*index[2].indices(b0.micro_batch))
                return block(experts, rows)[name][:, index[1], :, index[3]]
            rows = slice(*index[1].indices(b0.micro_batch))
            return block(range(1), rows)[name][index[0], :, index[2]]
        return jax.make_array_from_callback(shapes[name].shape, shardings[name], callback)

    return {name: build(name) for name in shapes}


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """``n`` rounded up to a power of two, at least ``minimum``, at most ``maximum``."""
    b = max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
    return b if maximum is None else max(n, min(b, maximum))
