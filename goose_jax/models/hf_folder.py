"""Hugging Face checkpoint folders, for every model family: finding, reading, writing.

A folder holds ``config.json`` and weights (``model.safetensors``, safetensors shards with
``model.safetensors.index.json``, or ``pytorch_model.bin`` and its index); a Hugging Face cache
entry ``models--org--name`` is followed to its snapshot. Nothing here knows a model's tensors:
``goose_jax.models.t5.hf`` (T5) and ``goose_jax.models.llama.hf`` (Llama, Qwen2, Mistral) map
them. Never touches the network; tensor files go through ``goose_jax.core.tensorfile``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from goose_jax.core.checkpoint import check_folder_writable, is_checkpoint
from goose_jax.core.errors import CheckpointError, one_line
from goose_jax.core.hf_code import check_no_custom_code
from goose_jax.core.tensorfile import open_tensors, read_json, write_atomic, write_safetensors

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
# Every file whose presence means a folder holds a model, and the shard names of older ones.
WEIGHT_FILES = (CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME, TORCH_WEIGHTS_NAME,
                TORCH_INDEX_NAME)
SHARD_PATTERNS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")
_NAMES_SHOWN = 5


def names_shown(keys) -> str:
    """The first few of ``keys``, sorted and comma-separated, with a count of the rest."""
    keys = sorted(keys)
    shown = ", ".join(keys[:_NAMES_SHOWN])
    return shown + (f" (and {len(keys) - _NAMES_SHOWN} more)" if len(keys) > _NAMES_SHOWN else "")


def _read_index(index_path: str) -> list[str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        shard_names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{index_path}: not a valid checkpoint index (needs a 'weight_map' of tensor name -> "
            f"shard file): {one_line(e)}") from None
    folder = os.path.dirname(index_path)
    shards = [os.path.join(folder, name) for name in shard_names]
    absent = [name for name in shard_names if not os.path.isfile(os.path.join(folder, name))]
    if absent:
        raise CheckpointError(f"{index_path}: names shard file(s) that are missing: "
                              f"{names_shown(absent)}")
    return shards


def resolve_hf_dir(path: str | os.PathLike) -> str:
    """A local checkpoint directory, following a Hugging Face cache entry to its snapshot.

    Given ``.../models--org--name`` (the cache layout), returns the snapshot that ``refs/main``
    names, or else the most recently modified one.

    Raises:
      CheckpointError: the directory does not exist.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory does not exist (goose-jax reads only "
                              "local directories and never downloads)")
    snapshots = os.path.join(path, "snapshots")
    if os.path.isfile(os.path.join(path, CONFIG_NAME)) or not os.path.isdir(snapshots):
        return path
    ref = os.path.join(path, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            candidate = os.path.join(snapshots, f.read().strip())
        if os.path.isdir(candidate):
            return candidate
    entries = [os.path.join(snapshots, e) for e in os.listdir(snapshots)]
    entries = [e for e in entries if os.path.isdir(e)]
    if not entries:
        raise CheckpointError(f"{snapshots}: Hugging Face cache entry has no snapshot")
    return max(entries, key=os.path.getmtime)


def read_config_json(path: str | os.PathLike) -> tuple[dict, str]:
    """(the parsed ``config.json`` of a checkpoint directory, its path), for any model family.

    Raises:
      CheckpointError: the file is missing, not JSON, or not a JSON object, or it names custom
        code (``auto_map``; see ``goose_jax.core.hf_code``).
    """

    config_path = os.path.join(resolve_hf_dir(path), CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: missing; a Hugging Face checkpoint directory needs "
                              f"a {CONFIG_NAME}")
    d = read_json(config_path, what="the config as JSON")
    if not isinstance(d, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, found {type(d).__name__}")
    check_no_custom_code(d, config_path)
    return d, config_path


def read_hf_state(path: str | os.PathLike) -> tuple[Mapping[str, np.ndarray], str]:
    """Opens the weights of a checkpoint directory as a lazy state dict.

    Looks for, in order: ``model.safetensors``, ``model.safetensors.index.json`` (sharded),
    ``pytorch_model.bin``, ``pytorch_model.bin.index.json``.

    Returns:
      (state, source): tensor name -> NumPy array, read on access; the file (or index) it came from.

    Raises:
      CheckpointError: no weights file, a missing shard, a corrupt file, or a .bin without torch;
        ``UnsafeCheckpointError`` (a ``CheckpointError``) for a pickle that is not weights-only.
    """
    folder = resolve_hf_dir(path)
    for name in (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME, TORCH_WEIGHTS_NAME, TORCH_INDEX_NAME):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            files = _read_index(candidate) if name.endswith(".json") else [candidate]
            return open_tensors(files, error=CheckpointError), candidate
    others = [n for n in ("flax_model.msgpack", "tf_model.h5") if os.path.isfile(
        os.path.join(folder, n))]
    hint = (f"; found {names_shown(others)}, which goose-jax does not read: re-save it with "
            "transformers' save_pretrained") if others else ""
    raise CheckpointError(f"{folder}: no weights file (looked for {SAFE_WEIGHTS_NAME}, "
                          f"{SAFE_INDEX_NAME}, {TORCH_WEIGHTS_NAME}, {TORCH_INDEX_NAME}){hint}")


def check_model_folder(path: str | os.PathLike, held: Sequence[str], *, overwrite: bool = False,
                       what: str = "a Hugging Face model", error: type[Exception] = CheckpointError
                       ) -> None:
    """Fails before any work unless a model folder may be written at ``path``.

    Args:
      path: the folder.
      held: file names whose presence means ``path`` already holds such a model.
      overwrite: replace a model already there.
      what: what the folder holds (for the message).
      error: the error class to raise.

    Raises:
      ``error``: ``path`` is a file or lies below one, is a goose-jax checkpoint, or already
        holds a model (without ``overwrite``).
    """

    check_folder_writable(path, error=error)
    folder = os.fspath(path)
    if is_checkpoint(folder):
        raise error(f"{folder}: is a goose-jax checkpoint; write {what} to another folder")
    found = [name for name in held if os.path.exists(os.path.join(folder, name))]
    if found and not overwrite:
        raise error(f"{folder}: already holds {what} ({found[0]}); pass --overwrite to replace "
                    "it, or write to another folder")


def write_model_folder(path: str | os.PathLike, weights_name: str,
                       tensors: Mapping[str, np.ndarray], config_name: str, config_text: str,
                       *, superseded: Sequence[str] = ()) -> list[str]:
    """Writes a weights file and the config that describes it into a folder, crash-safe.

    A new folder is written whole under a temporary name and renamed into place. In an existing
    folder the new weights are written beside the old ones, the old config is removed, the
    weights renamed into place and the config written last: a crash leaves the old pair, the new
    pair, or a folder without a config (refused on load), never a config beside weights it does
    not describe. Other files in the folder (a tokenizer, a README) are kept.

    Args:
      path: the folder.
      weights_name: the safetensors file name (e.g. ``model.safetensors``).
      tensors: name -> NumPy array.
      config_name: the config's file name (e.g. ``config.json``).
      config_text: its content.
      superseded: names (or glob patterns) of the old model's other weight files, removed once
        the new pair is in place.

    Returns:
      The paths written: the config, then the weights.
    """
    import glob
    import shutil

    folder = os.path.abspath(os.path.expanduser(os.fspath(path)))
    meta = {"format": "pt"}
    if not os.path.exists(folder):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = f"{folder}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.makedirs(tmp)
            write_safetensors(os.path.join(tmp, weights_name), tensors, metadata=meta)
            write_atomic(os.path.join(tmp, config_name), config_text)
            os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        weights, config = os.path.join(folder, weights_name), os.path.join(folder, config_name)
        staged = f"{weights}.new-{os.getpid()}"
        try:
            write_safetensors(staged, tensors, metadata=meta)
            if os.path.exists(config):
                os.remove(config)
            os.replace(staged, weights)
        finally:
            if os.path.exists(staged):
                os.remove(staged)
        write_atomic(config, config_text)
        for pattern in superseded:
            for old in glob.glob(os.path.join(glob.escape(folder), pattern)):
                if os.path.basename(old) not in (weights_name, config_name):
                    os.remove(old)
    return [os.path.join(folder, config_name), os.path.join(folder, weights_name)]


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays hold exactly the same values (same shape; the stored bits when the dtypes
    agree)."""
    # Exact equality of the stored bits: the tie decision must not depend on float tolerance.
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype != b.dtype:
        return bool(np.array_equal(a.astype(np.float32), b.astype(np.float32)))
    return bool(np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                               np.ascontiguousarray(b).view(np.uint8)))
