"""The device mesh and the one table that maps logical axis names onto it.

Every parameter carries logical axis names (t5x's T5 vocabulary plus ``expert`` and
``lora_rank``); this module alone decides which mesh axis, if any, each name is split over.
A mesh always has the three axes ``data``, ``model`` and ``expert`` (any may have size 1), so a
rules table never names an axis that does not exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from goose_jax.core.errors import ConfigError

MESH_AXES = ("data", "model", "expert")

# logical name -> mesh axis (None = replicated). Activations use the same names.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", "data"),
    ("length", None),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("joined_kv", "model"),
    ("relpos_buckets", None),
    ("layers", None),
    ("expert", "expert"),
    ("lora_rank", None),
)


def make_mesh(data: int = -1, model: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model, expert) mesh over ``devices`` (default: all global devices).

    One size may be -1 and takes what is left. Raises ValueError if the sizes do not multiply to
    the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, model, expert]
    if sizes.count(-1) > 1:
        raise ConfigError(
            f"make_mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise ConfigError(f"make_mesh: {len(devices)} devices cannot be split into "
                             f"{dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"make_mesh: axis sizes {dict(zip(MESH_AXES, sizes))} need "
                         f"{math.prod(sizes)} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,expert=4"`` -> ``{"data": 2, "expert": 4}`` (the ``make_mesh`` arguments).

    Raises:
      ValueError: an axis that is not one of ``MESH_AXES``, or a size that is not an integer.
    """
    sizes = {}
    for part in text.split(","):
        key, _, value = (x.strip() for x in part.partition("="))
        if key not in MESH_AXES or not value.lstrip("-").isdigit():
            raise ConfigError(f"mesh {text!r}: expected AXIS=SIZE pairs such as data=2,expert=4 "
                             f"with AXIS one of {MESH_AXES}")
        sizes[key] = int(value)
    return sizes


def logical_to_sharding(specs: Any, mesh: Mesh, rules=RULES) -> Any:
    """Maps a pytree of logical ``PartitionSpec`` onto ``NamedSharding`` for ``mesh``.

    A logical axis whose mesh axis does not divide the array is still legal for jit; shapes that
    cannot be split evenly are replicated by ``shard_params`` instead of failing.
    """
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def _fits(shape: tuple[int, ...], sharding: NamedSharding) -> bool:
    mesh_shape = sharding.mesh.shape
    for dim, axes in zip(shape, sharding.spec):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else axes
        if dim % math.prod(mesh_shape[a] for a in axes):
            return False
    return True


def param_shardings(params: Any, specs: Any, mesh: Mesh, rules=RULES) -> Any:
    """NamedShardings for ``params``; a leaf whose dims do not divide evenly is replicated."""
    shardings = logical_to_sharding(specs, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map(
        lambda x, s: s if _fits(np.shape(x), s) else replicated, params, shardings)


def put_global(tree: Any, shardings: Any) -> Any:
    """Places host values (the same on every process) as global arrays with ``shardings``.

    Each process copies only the slices its own devices hold, so this works whether the mesh
    spans one process or several (``jax.device_put`` of a host value onto devices of other
    processes does not). Leaves already laid out as asked are returned unchanged.

    Args:
      tree: a pytree of arrays (NumPy, or jax arrays whose values this process can read).
      shardings: one ``jax.sharding.Sharding``, or a pytree of them matching ``tree``.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def put(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        if s.is_fully_addressable:
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def shard_params(params: Any, specs: Any, mesh: Mesh, rules=RULES) -> Any:
    """Places ``params`` on ``mesh`` according to their logical specs and the rules table."""
    return put_global(params, param_shardings(params, specs, mesh, rules))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` whole on every device of ``mesh`` (routing collections, small trees)."""
    return put_global(tree, NamedSharding(mesh, PartitionSpec()))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a (B, ...) batch array: batch over ``data``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


# --- trees with a leading expert axis ------------------------------------------------------------


def shard_leading(tree: Any, mesh: Mesh, rest_logical: tuple = ()) -> Any:
    """Places a tree whose leaves lead with the expert axis E: that axis over ``expert`` (as the
    rules table maps it), the next axes by the logical names ``rest_logical``, the rest
    replicated. Scalars, and axes the mesh does not divide, are replicated."""
    return put_global(tree, leading_shardings(tree, mesh, rest_logical))


def shard_experts(tree: Any, mesh: Mesh) -> Any:
    """Places a tree with a leading expert axis (experts, gates, optimiser state) on ``mesh``:
    that axis over the ``expert`` mesh axis (the one rules table decides), the rest replicated.
    Scalars, and axes the mesh does not divide, are replicated."""
    return shard_leading(tree, mesh)


def shard_state(state: Any, mesh: Mesh) -> Any:
    """A many-experts ``training.program.TrainState`` on ``mesh``, placed as the jitted step
    returns it (so the second step does not compile again): experts over ``expert``, the step count
    replicated."""
    step, trainable, opt_state = shard_leading(
        (state.step, state.trainable, state.opt_state), mesh)
    return state.replace(step=step, trainable=trainable, opt_state=opt_state)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Places an [E, A, M, L] batch: experts over ``expert``, microbatch rows over ``data``."""
    return shard_leading(batch, mesh, (None, "batch"))


# --- loading straight into the expert layout -----------------------------------------------------


def expert_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a leaf that leads with the expert axis E: E over the mesh axis the rules
    table gives ``expert``, every other axis replicated (as ``shard_experts`` places it)."""
    return logical_to_sharding(PartitionSpec("expert"), mesh)


def expert_shards(mesh: Mesh) -> int:
    """X: how many ways ``expert_sharding(mesh)`` splits the expert axis."""
    axes = expert_sharding(mesh).spec[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def padded_count(count: int, multiple: int) -> int:
    """E_pad: the least multiple of ``multiple`` (X) that is at least ``count`` (E).

    An expert axis of E_pad splits evenly over X devices; rows E .. E_pad - 1 hold inert experts.
    """
    if count < 0 or multiple < 1:
        raise ValueError(f"padded_count: count {count} must be >= 0 and multiple {multiple} >= 1")
    return -(-count // multiple) * multiple


def local_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...],
               devices: Sequence[jax.Device] | None = None) -> list[int]:
    """The rows of the leading axis of a ``shape`` array laid out by ``sharding`` that
    ``devices`` hold (default: this process's own devices), ascending.

    A loader reads exactly these rows' sources: each process only what its devices keep.
    """
    mine = set(sharding.addressable_devices if devices is None else devices)
    rows: set[int] = set()
    for device, index in sharding.devices_indices_map(tuple(shape)).items():
        if device in mine:
            rows.update(range(*index[0].indices(shape[0])))
    return sorted(rows)


def read_into(shape: tuple[int, ...], sharding: jax.sharding.Sharding,
              read: Callable[[], np.ndarray]) -> jax.Array:
    """A global array of ``shape`` laid out by ``sharding`` from a host reader: ``read()`` (the
    whole value, as NumPy) is called at most once in this process, and only if one of its own
    devices holds a part; each device keeps only its slice; the value is then dropped."""
    value: list[np.ndarray] = []

    def block(index: tuple[slice, ...]) -> np.ndarray:
        if not value:
            value.append(read())
        return value[0][index]

    return jax.make_array_from_callback(tuple(shape), sharding, block)


# --- an expert axis the mesh does not divide ----------------------------------------------------
# A NamedSharding splits an axis only into equal parts, and real libraries rarely divide: FLAN's
# 166 experts are 2 x 83, so on 16 chips the expert axis could be split at most 2 ways and each
# chip would hold half the library. Padding to a multiple of the axis with inert experts (zero
# LoRA, never routed to: the routers mask them by a static count of real experts) costs at most
# X - 1 zero experts of memory (166 -> 176 on 16 chips, 6 %) and no routed work, and keeps every
# shard the same shape, which jit, shard_map and the collectives need. The other layouts cost
# more: uneven per-device slices cannot be expressed as one sharded array, and keeping the
# remainder replicated puts it whole on every chip.


def pad_experts(tree: Any, multiple: int) -> Any:
    """``tree`` with zeros appended on every leaf's leading (expert) axis up to a multiple of
    ``multiple``; host-side (NumPy). Leaves already a multiple are returned unchanged.

    Args:
      tree: a pytree whose leaves all lead with the same expert axis E (an expert library,
        router vectors).
      multiple: the ``expert`` mesh axis size X.

    Returns:
      the tree with leading axis ``padded_count(E, X)``; the added experts are all zero.
    """
    def pad(x):
        n = np.shape(x)[0]
        extra = padded_count(n, multiple) - n
        if not extra:
            return x
        host = np.asarray(x)
        return np.concatenate([host, np.zeros((extra,) + host.shape[1:], host.dtype)])

    return jax.tree.map(pad, tree)


# --- layouts of whole programs (declared shardings, abstract trees) ------------------------------


def leading_shardings(tree: Any, mesh: Mesh, rest_logical: tuple = ()) -> Any:
    """The ``NamedSharding`` of every leaf of a tree that leads with the expert axis E, as
    ``shard_leading`` places it: E over ``expert``, the next axes by ``rest_logical``, the rest
    replicated; scalars, and axes the mesh does not divide, replicated. ``tree`` may be abstract
    (``jax.ShapeDtypeStruct`` leaves): nothing is placed or built."""
    def spec(x):
        axes = (("expert",) + rest_logical)[:np.ndim(x)]
        while axes and axes[-1] is None:  # P("expert") as jit writes it, not P("expert", None)
            axes = axes[:-1]
        return PartitionSpec(*axes)

    return param_shardings(tree, jax.tree.map(spec, tree), mesh)


def replicated_shardings(tree: Any, mesh: Mesh) -> Any:
    """``NamedSharding(mesh, P())`` for every leaf of ``tree`` (as ``replicate`` places it)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda _: replicated, tree)


def batch_shardings(batch: Any, mesh: Mesh, many: bool) -> Any:
    """Shardings of a train batch as ``data.batching.global_batch`` lays it out: [E, A, M, ...]
    experts over ``expert`` and rows over ``data`` (``many``), else [A, M, ...] rows over
    ``data``."""
    if many:
        return leading_shardings(batch, mesh, (None, "batch"))
    return param_shardings(batch, jax.tree.map(lambda _: PartitionSpec(None, "batch"), batch),
                           mesh)


def abstract(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves with ``shardings`` (one, or a matching tree) for
    ``jit(...).lower``: shapes and layouts only, nothing materialised."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings)
