"""The one Orbax wrapper: pytrees on disk (model parameters, experts, training state).

A goose-jax checkpoint is a directory::

    path/
      goose_meta.json   {"format": "goose-jax", "format_version": 1, "tree": "params",
                         "metadata": {...}, "files": {...}}   written last, atomically: its
                        presence marks a complete save
      params/           an Orbax checkpoint (StandardCheckpointHandler) of the pytree

The named sub-directory is the layout Orbax's ``CheckpointManager`` gives each item of a
composite checkpoint, so training can later keep base params, experts and gates as separate
items of one step without changing how a single tree is read.

``files`` records the size and sha256 of every file of the tree, so a deleted, truncated or
altered file is one clear error on load (sizes always, hashes with ``verify``), never a crash
inside Orbax. Replacing a checkpoint (``overwrite``) writes the new tree beside the old one
(``params`` and ``params-1`` alternate) and then replaces ``goose_meta.json``: a crash at any
moment leaves the old checkpoint or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any

import jax

from goose_jax.core import tool_process
from goose_jax.core.errors import CheckpointError, one_line
from goose_jax.core.tensorfile import (
    check_folder_writable,  # noqa: F401  (re-exported for writers)
    disk_write_error,
    read_json,
    write_atomic,
)

META_NAME = "goose_meta.json"
TREE_DIR = "params"
TREE_DIRS = (TREE_DIR, TREE_DIR + "-1")   # a replacing save writes the one not in use
FORMAT = "goose-jax"
FORMAT_VERSION = 1


def absolute(path: str | os.PathLike) -> str:
    """``path`` as an absolute path, ``~`` expanded."""
    # Orbax resolves relative paths against its own notion of the working directory; give it none.
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a complete goose-jax checkpoint."""
    return os.path.isfile(os.path.join(absolute(path), META_NAME))


def read_meta(path: str) -> dict[str, Any]:
    """The metadata record of the checkpoint at ``path``; raises CheckpointError when it is not
    one."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint does not exist")
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path}: not a goose-jax checkpoint (no {META_NAME}; an "
                              "interrupted save, or a different format?)")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a goose-jax checkpoint (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: written by a newer goose-jax (format version "
                              f"{meta['format_version']}, this one reads {FORMAT_VERSION})")
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` dict that was passed to ``save_tree``.

    Raises:
      CheckpointError: ``path`` is missing or not a goose-jax checkpoint.
    """
    return dict(read_meta(absolute(path)).get("metadata") or {})


def save_tree(path: str | os.PathLike, tree: Any, *, metadata: dict[str, Any] | None = None,
              overwrite: bool = False) -> str:
    """Saves a pytree of arrays (jax or NumPy, any dtype including bfloat16) with Orbax.

    Args:
      path: checkpoint directory; created with its parents.
      tree: the pytree, e.g. a params dict.
      metadata: JSON-serializable facts stored beside the tree (``read_metadata`` returns them).
      overwrite: replace an existing goose-jax checkpoint at ``path``. A non-empty directory
        that is not one is never overwritten.

    Returns:
      The absolute checkpoint path.

    Raises:
      CheckpointError: ``path`` exists (without ``overwrite``), or metadata is not JSON.
    """
    import orbax.checkpoint as ocp

    path = absolute(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "tree": TREE_DIR,
            "metadata": metadata or {}}
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint metadata is not JSON-serializable: "
                              f"{one_line(e)}") from None
    check_destination(path, overwrite=overwrite)
    old_tree = read_meta(path).get("tree", TREE_DIR) if is_checkpoint(path) else None
    tree_name = TREE_DIRS[1] if old_tree == TREE_DIRS[0] else TREE_DIRS[0]
    primary = jax.process_index() == 0
    created = not os.path.exists(path)
    tool_process.drop_closed_loop_reports()  # a failed write reports meanwhile, and later
    try:
        if primary:
            os.makedirs(path, exist_ok=True)
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            ckptr.save(os.path.join(path, tree_name), args=ocp.args.StandardSave(tree),
                       force=True)
        if primary:

            meta["tree"] = tree_name
            folder = os.path.join(path, tree_name)
            meta["files"] = {rel: {"bytes": size,
                                   "sha256": file_sha256(os.path.join(folder, rel))}
                             for rel, size in _tree_files(folder).items()}
            write_atomic(os.path.join(path, META_NAME),
                         json.dumps(meta, indent=2, sort_keys=True) + "\n")
    except BaseException as e:  # a full disk, Ctrl-C: the old checkpoint stays whole
        if primary:
            _remove_partial(path, tree_name, created)

        error = disk_write_error(path, e) if isinstance(e, Exception) else None
        if error is None:
            raise
        raise error from None
    if primary and old_tree is not None and old_tree != tree_name:
        shutil.rmtree(os.path.join(path, old_tree), ignore_errors=True)
    return path


def _remove_partial(path: str, tree_name: str, created: bool) -> None:
    """Removes what a failed ``save_tree`` wrote: the new tree and Orbax's temporary folders
    beside it, and ``path`` itself if the save created it; an older tree and its metadata stay.

    Orbax's writer threads may still be finishing (and creating folders) after the save
    raised, so this repeats until nothing has reappeared for a moment (5 s at most)."""
    def leftovers() -> list[str]:
        if created:
            return [path] if os.path.exists(path) else []
        return [os.path.join(path, n) for n in (os.listdir(path) if os.path.isdir(path) else ())
                if n == tree_name or n.startswith(f"{tree_name}.orbax-checkpoint-tmp")]

    deadline, quiet_since = time.monotonic() + 5.0, None
    while True:
        found = leftovers()
        for p in found:
            shutil.rmtree(p, ignore_errors=True)
        now = time.monotonic()
        quiet_since = None if found else (quiet_since or now)
        if (quiet_since is not None and now - quiet_since >= 0.3) or now > deadline:
            return
        time.sleep(0.05)


def check_destination(path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Fails unless ``save_tree`` / ``save_model`` may write ``path`` (call it before the work
    that produces the tree).

    Raises:
      CheckpointError: ``path`` is a file or lies below one, is a non-empty directory that is
        not a goose-jax checkpoint, or is one and ``overwrite`` is False.
    """
    path = absolute(path)
    check_folder_writable(path)
    if os.path.isdir(path) and os.listdir(path):
        if not is_checkpoint(path):
            raise CheckpointError(f"{path}: exists, is not empty and is not a goose-jax "
                                  "checkpoint; refusing to write into it")
        if not overwrite:
            raise CheckpointError(f"{path}: checkpoint already exists (pass overwrite=True, or "
                                  "--overwrite on the command line, to replace it)")


def file_sha256(file: str) -> str:
    """``"sha256:"`` and the hex SHA-256 digest of ``file``'s bytes."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _tree_files(tree_dir: str) -> dict[str, int]:
    """Relative path -> size of every file under ``tree_dir``."""
    out = {}
    for folder, _, files in os.walk(tree_dir):
        for name in files:
            file = os.path.join(folder, name)
            out[os.path.relpath(file, tree_dir).replace(os.sep, "/")] = os.path.getsize(file)
    return dict(sorted(out.items()))


def reconvert_hint(path: str) -> str:
    """The message's advice for a damaged checkpoint at ``path``: how to re-create it."""
    return (f"the checkpoint {path} is damaged: re-create it (goose-convert hf-to-orbax SRC "
            f"{path} --overwrite, or the training run that wrote it)")


def file_mismatch(file: str, want: Any, *, verify: bool = True) -> tuple[str, Any] | None:
    """How ``file`` differs from its record ``want`` (``{"bytes": n, "sha256": ...}``), or None:
    ``("missing", None)``, ``("size", its size)``, ``("unreadable", the OSError)`` or
    ``("sha256", its digest)``; the digest is compared only with ``verify``."""
    try:
        size = os.path.getsize(file)
    except OSError:
        return "missing", None
    if not isinstance(want, dict) or size != want.get("bytes"):
        return "size", size
    if not verify:
        return None
    try:
        digest = file_sha256(file)
    except OSError as e:
        return "unreadable", e
    return ("sha256", digest) if digest != want.get("sha256") else None


def _check_files(path: str, meta: dict[str, Any], tree_dir: str, verify: bool) -> None:
    """Every file ``meta`` records is there with its size (and, with ``verify``, its sha256)."""
    recorded = meta.get("files")
    if not isinstance(recorded, dict):
        return   # written before files were recorded: Orbax's own checks only
    for rel, want in recorded.items():
        file = os.path.join(tree_dir, rel)
        problem = file_mismatch(file, want, verify=verify)
        if problem is None:
            continue
        kind, found = problem
        if kind == "missing":
            raise CheckpointError(f"{file}: missing; {reconvert_hint(path)}")
        if kind == "size":
            raise CheckpointError(f"{file}: {found} bytes, expected "
                                  f"{want.get('bytes') if isinstance(want, dict) else want} "
                                  f"(truncated or altered); {reconvert_hint(path)}")
        if kind == "unreadable":
            raise CheckpointError(f"{file}: cannot be read ({one_line(found)}); "
                                  f"{reconvert_hint(path)}")
        raise CheckpointError(f"{file}: sha256 differs from the one recorded at save "
                              f"(altered); {reconvert_hint(path)}")


def abstract_leaf(leaf: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    """A ``jax.ShapeDtypeStruct`` with ``leaf``'s shape and dtype, placed by ``sharding``."""
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding)


def restore_tree(path: str | os.PathLike, *, target: Any = None, shardings: Any = None,
                 verify: bool = False) -> Any:
    """Restores a pytree saved by ``save_tree`` as jax arrays.

    Args:
      path: checkpoint directory.
      target: optional pytree of arrays or ``jax.ShapeDtypeStruct`` with the saved structure;
        gives each leaf's dtype (a cast on restore) and, unless ``shardings`` is given, its
        sharding. Default: the saved shapes and dtypes.
      shardings: a ``jax.sharding.Sharding`` for every leaf, or a pytree of them matching the
        saved tree. Default: the target's shardings, else the first local device.
      verify: also check every file's sha256 against the one recorded at save (reads every
        byte once more; sizes are always checked).

    Returns:
      The pytree (nested dicts stay dicts) of jax arrays.

    Raises:
      CheckpointError: missing path, not a goose-jax checkpoint, a missing, truncated or
        altered file, or a structure that does not match ``target`` / ``shardings``.
    """
    import orbax.checkpoint as ocp

    path = absolute(path)
    meta = read_meta(path)
    tree_dir = os.path.join(path, str(meta.get("tree", TREE_DIR)))
    if not os.path.isdir(tree_dir):
        raise CheckpointError(f"{tree_dir}: checkpoint data is missing; {reconvert_hint(path)}")
    _check_files(path, meta, tree_dir, verify)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            if target is None:
                # Built from the saved metadata so that a tree written on a mesh of 8 devices
                # restores on 1, instead of Orbax trying to recreate the saved shardings.
                saved = ckptr.metadata(tree_dir).item_metadata
                if saved is None:
                    raise CheckpointError(f"{tree_dir}: the tree's metadata is unreadable; "
                                          f"{reconvert_hint(path)}")
                target = jax.tree.map(lambda m: abstract_leaf(m, None), saved.tree)
            if shardings is None:
                shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or default, target)
            elif isinstance(shardings, jax.sharding.Sharding):
                shardings = jax.tree.map(lambda _: shardings, target)
            abstract = jax.tree.map(abstract_leaf, target, shardings)
            return ckptr.restore(tree_dir, args=ocp.args.StandardRestore(abstract))
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{tree_dir}: cannot restore the tree (does the target or the "
                              f"shardings match what was saved? else {reconvert_hint(path)}): "
                              f"{one_line(e)[:300]}") from None
    except Exception as e:
        if isinstance(e, jax.errors.JaxRuntimeError):
            raise   # a peer of a process group died: the tool's own exit code
        # TensorStore reports unreadable chunks as a bare Exception with a long spec.
        raise CheckpointError(f"{tree_dir}: cannot read the tree ({type(e).__name__}: "
                              f"{one_line(e)[:200]}); {reconvert_hint(path)}") from None
