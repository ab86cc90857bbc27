"""Tensor files: safetensors and PyTorch checkpoints, read without executing code, written
atomically.

Every file of tensors goose-jax reads goes through this module: Hugging Face T5 weights
(``interop/hf.py``), PEFT adapters (``interop/peft.py``), the original release's checkpoints
(``interop/release.py``), the expert library's files (``library.py``) and router prototype files.

- safetensors: a small header parser checks the header length, and every tensor's dtype, shape
  and data offsets against the file's size, before anything is read. ``SafetensorsFile`` answers
  names and shapes from the header and reads a tensor when asked for it (a sharded checkpoint is
  read one tensor at a time); ``read_safetensors`` reads them all. Each tensor read is a fresh,
  writable NumPy array (bfloat16 as ``ml_dtypes.bfloat16``): nothing stays mapped onto a file that
  may later be replaced.
- PyTorch (``.bin`` / ``.pt``): only ``torch.load(weights_only=True)``, with torch imported then
  (``import goose_jax`` never imports it). A pickle that asks for any class or function beyond
  plain tensors is refused with ``UnsafeCheckpointError``, in one line that names the file and
  what it asked for; torch's own long advice is not repeated.

Errors name the file and are of the class the caller passes as ``error`` (``CheckpointError`` for
a model, ``AdapterError`` for adapters, ``LibraryError`` for a library, ...), so each caller keeps
its own family; ``UnsafeCheckpointError`` is both a ``CheckpointError`` and an ``AdapterError``.

Legend: nothing here has a fixed shape; shapes are the files' own.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import struct
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from goose_jax.core.errors import (
    CheckpointError,
    DiskWriteError,
    GooseError,
    UnsafeCheckpointError,
    one_line,
)

SAFETENSORS_SUFFIX = ".safetensors"
# The safetensors format's own limit; a larger "header" is a corrupt length field.
_MAX_HEADER_BYTES = 100_000_000
_SAFE_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32",
                "U16": "uint16", "U8": "uint8", "BOOL": "bool"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# torch's refusal names the global a pickle asked for, in one of two phrasings (by torch version
# and by whether the module is blocked outright).
_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)

ErrorClass = type[GooseError]


def _np_dtype(name: str) -> np.dtype:
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def _first_sentence(e: BaseException) -> str:
    """One short line from a library's exception: no colour codes, no advice after it."""
    text = _ANSI.sub("", str(e))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    if "weights_only" in first:  # torch's advice to turn the safety off is never passed on
        first = ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# --- safetensors --------------------------------------------------------------------------------


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file: by its name, else by its first bytes (a
    little-endian header length, then the header's ``{``)."""
    path = os.fspath(path)
    if path.endswith(SAFETENSORS_SUFFIX):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


class SafetensorsFile(Mapping):
    """One safetensors file: names, shapes and dtypes from its checked header; each tensor read
    from disk when asked for, as a fresh NumPy array.

    Attributes:
      path: the file.
      metadata: the header's ``__metadata__`` (str -> str), or {}.

    With ``data`` (the file's bytes, already read: to hash them, say), everything is parsed
    from memory and ``path`` only names the file in messages.

    Raises (on opening):
      the ``error`` class: the file is missing, truncated, or its header is not valid
      safetensors (length, JSON, dtype, shape, offsets that do not fit the file or overlap).
    """

    def __init__(self, path: str | os.PathLike, *, error: ErrorClass = CheckpointError,
                 data: bytes | None = None):
        self.path = os.fspath(path)
        self._error = error
        self._data = data
        try:
            self._entries, self._start, self.metadata = self._parse()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            detail = one_line(e)
            raise error(f"{self.path}: not a readable safetensors file (truncated or corrupt?): "
                        f"{detail}") from None

    def _parse(self) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]], int, dict]:
        size = os.path.getsize(self.path) if self._data is None else len(self._data)
        with self._open() as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError(f"header length {n} exceeds the file size {size}")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ValueError(f"header is not JSON ({e})") from None
            except RecursionError:
                raise ValueError("header is JSON nested too deeply") from None
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        start = 8 + n
        data_size = size - start
        metadata = header.pop("__metadata__", None) or {}
        entries = {}
        for key, entry in header.items():
            if entry.get("dtype") not in _SAFE_DTYPES:
                raise ValueError(f"tensor {key!r}: unknown dtype {entry.get('dtype')!r}")
            dtype = _np_dtype(_SAFE_DTYPES[entry["dtype"]])
            shape = tuple(int(s) for s in entry["shape"])
            lo, hi = (int(v) for v in entry["data_offsets"])
            if min(shape, default=0) < 0 or not 0 <= lo <= hi <= data_size or \
                    hi - lo != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {key!r}: data offsets {lo}..{hi} do not fit its shape "
                                 f"{shape} and dtype {entry['dtype']} in {data_size} data bytes")
            entries[key] = (dtype, shape, lo, hi)
        spans = sorted((lo, hi, key) for key, (_, _, lo, hi) in entries.items() if hi > lo)
        for (_, end, first), (lo, _, second) in zip(spans, spans[1:]):
            if lo < end:
                raise ValueError(f"tensors {first!r} and {second!r} overlap in the data")
        return entries, start, metadata

    def _open(self):
        return open(self.path, "rb") if self._data is None else io.BytesIO(self._data)

    def shape_of(self, key: str) -> tuple[int, ...]:
        """The shape of tensor ``key``, from the header (nothing is read)."""
        return self._entries[key][1]

    def file_of(self, key: str) -> str:
        return self.path

    def _read(self, f, key: str) -> np.ndarray:
        dtype, shape, lo, hi = self._entries[key]
        buffer = np.empty(hi - lo, np.uint8)
        f.seek(self._start + lo)
        if f.readinto(buffer) != hi - lo:
            raise self._error(f"{self.path}: cannot read tensor {key}: the file is shorter than "
                              "its header says (truncated after it was opened?)")
        return buffer.view(dtype).reshape(shape)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._entries:
            raise KeyError(key)
        with self._open() as f:
            return self._read(f, key)

    def read_all(self) -> dict[str, np.ndarray]:
        """Every tensor, in header order, read through one open file."""
        with self._open() as f:
            return {key: self._read(f, key) for key in self._entries}

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


def read_safetensors(path: str | os.PathLike, *, error: ErrorClass = CheckpointError,
                     data: bytes | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, as fresh NumPy arrays (bfloat16 via ml_dtypes).

    Args:
      path: the file.
      error: the GooseError subclass raised for a bad file (default ``CheckpointError``).
      data: the file's bytes when the caller has read them already (parsed from memory, so a
        file is read once even when it is also hashed); ``path`` then only names it.

    Raises:
      ``error``: the file is missing, truncated, or not valid safetensors; the message names it.
    """
    return SafetensorsFile(path, error=error, data=data).read_all()


# --- PyTorch ------------------------------------------------------------------------------------


def torch_to_numpy(tensor) -> np.ndarray:
    """A CPU NumPy view of a torch tensor; bfloat16 becomes ml_dtypes.bfloat16 (NumPy has none)."""
    import torch

    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class TorchFile(Mapping):
    """A PyTorch state dict loaded with ``torch.load(weights_only=True)`` (memory-mapped when the
    file is a zip archive); each tensor becomes a NumPy view when asked for.

    Raises (on opening):
      UnsafeCheckpointError: the pickle asks for a class or function to run.
      the ``error`` class: torch is not installed, the file is truncated or corrupt, or it holds
        something other than a flat dict of tensors.
    """

    def __init__(self, path: str | os.PathLike, *, error: ErrorClass = CheckpointError):
        import pickle

        self.path = path = os.fspath(path)
        try:
            import torch
        except ImportError:
            raise error(f"{path}: reading a PyTorch checkpoint needs torch, which is not "
                        "installed; install torch or convert the file to safetensors") from None
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols it then reads
                warnings.simplefilter("ignore", UserWarning)
                loaded = torch.load(path, map_location="cpu", weights_only=True,
                                    mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:
            found = _GLOBAL.search(_ANSI.sub("", str(e)))
            if found:
                raise UnsafeCheckpointError(
                    f"{path}: refused: this pickle is not weights-only (loading it would import "
                    f"and run {found.group(1)}); goose-jax never executes code from a "
                    "checkpoint: save the tensors as safetensors or as a plain state dict"
                ) from None
            raise error(f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or not "
                        f"weights-only?): {_first_sentence(e)}") from None
        except Exception as e:  # torch raises RuntimeError / EOFError / zip errors for bad files
            raise error(f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or not "
                        f"weights-only?): {_first_sentence(e)}") from None
        if not isinstance(loaded, Mapping):
            raise error(f"{path}: expected a state dict (name -> tensor), found "
                        f"{type(loaded).__name__}")
        for key, value in loaded.items():
            if not isinstance(value, torch.Tensor):
                raise error(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        self._tensors: dict[str, Any] = dict(loaded)

    def shape_of(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def file_of(self, key: str) -> str:
        return self.path

    def __getitem__(self, key: str) -> np.ndarray:
        return torch_to_numpy(self._tensors[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors


def read_torch(path: str | os.PathLike, *,
               error: ErrorClass = CheckpointError) -> dict[str, np.ndarray]:
    """A PyTorch state dict read with ``weights_only=True``, as NumPy views of its tensors.

    Raises:
      UnsafeCheckpointError: the pickle asks for a class or function to run (never run).
      ``error``: torch is missing, the file is unreadable, or not a flat dict of tensors.
    """
    state = TorchFile(path, error=error)
    return {key: state[key] for key in state}


# --- any tensor file ----------------------------------------------------------------------------


def open_tensor_file(path: str | os.PathLike, *,
                     error: ErrorClass = CheckpointError) -> SafetensorsFile | TorchFile:
    """One tensor file, safetensors (see ``is_safetensors``) or else a weights-only PyTorch
    checkpoint, as a lazy mapping with ``shape_of`` and ``file_of``."""
    try:
        safe = is_safetensors(path)
    except OSError as e:
        raise error(f"{os.fspath(path)}: cannot read: {e.strerror or e}") from None
    return (SafetensorsFile if safe else TorchFile)(path, error=error)


def read_tensors(path: str | os.PathLike, *,
                 error: ErrorClass = CheckpointError) -> dict[str, np.ndarray]:
    """Every tensor of one file, safetensors or a weights-only PyTorch checkpoint.

    Args:
      path: the file; ``*.safetensors`` or a file that starts like one is read as safetensors,
        anything else as a PyTorch checkpoint.
      error: the GooseError subclass raised for a bad file (default ``CheckpointError``).

    Returns:
      Tensor name -> NumPy array (bfloat16 as ``ml_dtypes.bfloat16``).

    Raises:
      UnsafeCheckpointError: a pickle that is not weights-only.
      ``error``: anything else wrong with the file, naming it.
    """
    state = open_tensor_file(path, error=error)
    if isinstance(state, SafetensorsFile):
        return state.read_all()
    return {key: state[key] for key in state}


class TensorFiles(Mapping):
    """Several tensor files (the shards of one checkpoint) seen as one lazy state dict.

    ``shape_of(key)`` answers without reading data; ``file_of(key)`` names the file a tensor is
    in (for error messages); ``state[key]`` reads one tensor. A name in several files is taken
    from the last.
    """

    def __init__(self, files: Iterable[SafetensorsFile | TorchFile]):
        self._file_of = {key: f for f in files for key in f}

    def file_of(self, key: str) -> str:
        return self._file_of[key].path

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self._file_of[key].shape_of(key)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._file_of[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __contains__(self, key: object) -> bool:
        return key in self._file_of


def open_tensors(paths: Iterable[str | os.PathLike], *,
                 error: ErrorClass = CheckpointError) -> TensorFiles:
    """The tensor files ``paths`` (each safetensors or PyTorch) as one lazy state dict.

    Raises:
      UnsafeCheckpointError, ``error``: as ``read_tensors``, for the first bad file.
    """
    return TensorFiles([open_tensor_file(p, error=error) for p in paths])


# --- writing ------------------------------------------------------------------------------------


def os_error(e: BaseException) -> tuple[int, str] | None:
    """The system's error number and reason behind a failed write, whoever raised it: an
    ``OSError``, or a native writer's error that quotes the number (safetensors' ``os error
    28``, tensorstore's ``os_error_code='28'``); None when there is none."""
    if isinstance(e, OSError) and e.errno:
        return e.errno, e.strerror or os.strerror(e.errno)
    m = re.search(r"os error (\d+)|os_error_code='(\d+)'|\[Errno (\d+)\]", str(e))
    if m is None:
        return None
    number = int(next(g for g in m.groups() if g))
    return number, os.strerror(number)


def disk_write_error(path: str, e: BaseException) -> DiskWriteError | None:
    """``e`` as the one-line ``DiskWriteError`` naming ``path``, if the system refused a write
    (see ``os_error``); None for any other error (a bug, which keeps its traceback)."""
    found = os_error(e)
    if found is None:
        return None
    number, text = found
    full = number in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    error = DiskWriteError(f"{path}: cannot write: {text}; nothing of this write was kept"
                           + ("; free space (or lift the file-size limit) and rerun" if full
                              else ""))
    error.errno = number
    return error


def _replace_atomically(path: str, write: Callable[[str], None]) -> None:
    # A crash mid-write must not leave a truncated file under the final name, and two processes
    # writing the same name must not share a temporary file.
    # A refused write (a full disk's ENOSPC comes from a write or a close, without a file name)
    # is one line naming the file being written (disk_write_error).
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except Exception as e:
        error = disk_write_error(path, e)
        if error is None:
            raise
        raise error from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes ``data`` (str as UTF-8) to ``path`` through a temporary file renamed into place."""
    payload = data.encode() if isinstance(data, str) else data

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(payload)

    _replace_atomically(os.fspath(path), write)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes NumPy arrays as a safetensors file, atomically (see ``write_atomic``).

    Args:
      path: the file to write (replaced if it exists).
      tensors: name -> C-contiguous NumPy array (bfloat16 as ``ml_dtypes.bfloat16``).
      metadata: the header's ``__metadata__`` (str -> str).
    """
    from safetensors.numpy import save_file

    tensors = dict(tensors)
    meta = dict(metadata) if metadata is not None else None
    if meta is not None and len(meta) > 1:   # the same bytes on every run (safetensors_bytes)
        write_atomic(path, safetensors_bytes(tensors, meta))
        return

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=meta)
        except OSError:
            raise
        except Exception as e:   # safetensors' own error type wraps the OS error in its text
            if "os error" not in str(e).lower():
                raise
            code = re.search(r"os error (\d+)", str(e))
            raise OSError(int(code.group(1)) if code else errno.EIO, one_line(e)) from None

    _replace_atomically(os.fspath(path), write)


def safetensors_bytes(tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file of ``tensors`` (as ``write_safetensors`` writes it), for a
    caller that hashes what it writes (then writes it with ``write_atomic``)."""
    from safetensors.numpy import save

    data = save(dict(tensors), metadata=dict(metadata) if metadata is not None else None)
    if metadata is None or len(metadata) < 2:
        return data
    # The library writes the header's __metadata__ in a hash map's order, which changes from
    # process to process: the same tensors would give other bytes (and another sha256) on every
    # run. The header is rewritten with its metadata keys sorted; the data is unchanged.
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)   # the 8-byte alignment of the data the format keeps
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def check_folder_writable(path: str | os.PathLike, *, error: ErrorClass = CheckpointError,
                          fix: str = "") -> None:
    """Fails unless ``path`` is a directory, or can be created as one, that this process may
    write into: every writer of a folder calls it before its work. Writes nothing but a
    temporary probe file in the nearest existing folder, removed at once (permission bits alone
    say nothing to root, nor about read-only file systems).

    Args:
      path: the folder.
      error: the error class to raise.
      fix: appended to the message (e.g. "; pass another --out").
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise error(f"{path}: exists and is not a directory{fix}")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise error(f"{path}: cannot be created: {parent} is a file{fix}")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise error(f"{parent}: cannot write here ({e.strerror}), so {path} cannot be "
                    f"used{fix}") from None


def read_json(path: str | os.PathLike, *, error: ErrorClass = CheckpointError,
              what: str = "as JSON", fix: str = "") -> Any:
    """The JSON value in the file ``path``; a missing, unreadable or malformed file is one
    ``error`` line: ``{path}: cannot read {what}: {detail}{fix}``."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise error(f"{os.fspath(path)}: cannot read {what}: {one_line(e)}{fix}") from None
    except RecursionError:  # Python's JSON parser recurses once per level of nesting
        raise error(f"{os.fspath(path)}: cannot read {what}: nested deeper than "
                    f"{sys.getrecursionlimit()} levels{fix}") from None

