"""Running a stack of layers: unrolled or as one scanned body, with optional rematerialisation.

Shapes follow the package legend (the ``goose_jax`` module docstring). Also used here: Y the
layers of one stack (``num_encoder_layers`` or ``num_decoder_layers``).

Two layouts of every tree that follows the model's scopes (base ``params``, and the per-site
collections the adapters read: ``experts``, ``gates``, ``router``, ``telemetry``, ``capture``,
and what the model writes: ``cache``, sown ``intermediates``):

- per layer (the user-facing one, and the only one HF conversion and expert libraries know):
  ``{"encoder": {"block_0": {...}, "block_1": {...}, ...}}`` in a T5 (sites named
  ``encoder/block_3/self_attn/q``), ``{"layers_0": {...}, ...}`` in a Llama;
- stacked (what a config with ``scan_layers=True`` reads): ``{"encoder": {"blocks": {...}}}``, or
  ``{"layers": {...}}``, whose leaves gain a leading (Y, ...) axis, logical axis name ``layers``.

Each per-layer naming has its stacked name (``STACKED_NAMES``); a config says how many layers
each stack has (``layer_counts``, keyed by the stack's parent scope, ``""`` at the root).

``stack_layers`` and ``unstack_layers`` convert between them. Both are idempotent, so the model
API (``t5_logits``, ``generate_greedy``) accepts either layout and programs that run many steps
stack once, at load time, and pass the stacked trees on (stacking costs one copy of the tree).

Why scan: an unrolled T5-XL compiles 24 + 24 copies of every block, and with a routing adapter
at each of the 432 sites the per-site routing code dominates compile time; a scan compiles one
encoder and one decoder body.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from goose_jax.core.errors import ConfigError

STACKED = "blocks"      # scope name of a scanned T5 stack's one body
LAYER_AXIS = "layers"   # logical name of the stacked leading axis
# Per-layer scope prefix -> the stacked body's scope name.
STACKED_NAMES = {"block_": STACKED, "layers_": "layers"}
_PREFIXES = {v: k for k, v in STACKED_NAMES.items()}
_LAYER = re.compile(r"(" + "|".join(STACKED_NAMES) + r")(\d+)")

# Activation rematerialisation per block (``models.config.REMAT_NAMES``): what the backward pass
# keeps
# from the forward one.
#   none: everything (no recomputation);
#   block: only each block's inputs; the block is recomputed in the backward pass;
#   dots: the outputs of the matmuls without batch dimensions (every site's projection); the
#     attention products and elementwise work are recomputed.
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@functools.cache
def _scan_body(block_cls: type) -> type:
    """``block_cls`` with the (carry, outputs) signature ``nn.scan`` wants; same scopes."""

    class Body(block_cls):
        def __call__(self, carry, *shared):
            return super().__call__(carry, *shared), None

    Body.__name__ = Body.__qualname__ = block_cls.__name__
    return Body


def run_blocks(block_cls: type, num_layers: int, carry, *shared, prefix: str = "block_",
               **attrs):
    """Runs ``num_layers`` blocks of ``block_cls`` in sequence over the residual stream.

    Call inside a compact method: the blocks become children of the calling module, named
    ``{prefix}{i}`` (unrolled) or ``STACKED_NAMES[prefix]`` (``cfg.scan_layers``: one body,
    every variable collection stacked along axis 0), where ``cfg = attrs["cfg"]``, the model
    config. ``cfg.remat`` wraps each block in ``nn.remat``.

    Args:
      block_cls: the block module; ``block_cls(**attrs)(carry, *shared)`` returns the new carry.
      num_layers: Y.
      carry: the residual stream (B, S, D).
      *shared: inputs every block reads unchanged (biases, the encoder output, the decode
        position); positional, so that remat and scan pass them through.
      **attrs: the block's attributes (``cfg``, the adapter, static flags).
    """
    cfg = attrs["cfg"]
    cls = _scan_body(block_cls) if cfg.scan_layers else block_cls
    if cfg.remat != "none":
        # Common-subexpression prevention only matters outside a scan (jax.checkpoint's doc).
        cls = nn.remat(cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if not cfg.scan_layers:
        for i in range(num_layers):
            carry = cls(name=f"{prefix}{i}", **attrs)(carry, *shared)
        return carry
    scanned = nn.scan(cls, variable_axes={True: 0}, split_rngs={"params": True},
                      in_axes=nn.broadcast, length=num_layers,
                      metadata_params={nn.PARTITION_NAME: LAYER_AXIS})
    carry, _ = scanned(name=STACKED_NAMES[prefix], **attrs)(carry, *shared)
    return carry


def per_layer(cfg):
    """``cfg`` unrolled: the user-facing per-layer scopes (site names, HF conversion)."""
    return cfg.replace(scan_layers=False, remat="none")


# --- tree layouts --------------------------------------------------------------------------------


def _is_abstract(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def _stack(leaves: list) -> Any:
    if all(_is_abstract(x) for x in leaves):
        return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype)
    return jnp.stack([jnp.asarray(x) for x in leaves])


def _zeros_like(x) -> Any:
    return x if _is_abstract(x) else jnp.zeros(jnp.shape(x), jnp.result_type(x))


def _layer_counts(cfg) -> dict[str, int]:
    return {} if cfg is None else dict(cfg.layer_counts)


def stack_layers(tree: Any, cfg=None) -> Any:
    """Per-layer tree -> stacked tree (``block_{i}`` children become one ``blocks`` child).

    Works for any tree that follows the model's scopes, concrete or abstract
    (``jax.ShapeDtypeStruct`` leaves), inside or outside jit. A site (or leaf) that some layers
    lack is filled with zeros there: zero LoRA factors add nothing, so a library that covers only
    some layers runs the same (telemetry then also counts, and ``unstack_layers`` returns, the
    filled sites). Trees already stacked are returned unchanged.

    Args:
      tree: nested dicts; a node's ``block_{i}`` children are stacked.
      cfg: the model config; its layer counts fix Y per stack (``encoder`` / ``decoder``), so a
        tree without the last blocks is padded too. None: Y is the largest index present + 1.

    Raises:
      ConfigError: a node with both ``block_{i}`` and ``blocks`` children, a block index beyond
        the model's layers, or layers whose leaves disagree in shape.
    """
    counts = _layer_counts(cfg)

    def walk(node, path):
        if not isinstance(node, dict):
            return node
        found = {k: m for k in node if (m := _LAYER.fullmatch(k))}
        rest = {k: walk(v, path + (k,)) for k, v in node.items() if k not in found}
        if not found:
            return rest
        prefixes = {m.group(1) for m in found.values()}
        where = "/".join(path) or "the tree"
        if len(prefixes) > 1:
            raise ConfigError(f"stack_layers: {where} mixes per-layer names "
                              f"{sorted(p + 'N' for p in prefixes)}")
        prefix = prefixes.pop()
        stacked_name = STACKED_NAMES[prefix]
        blocks = {int(m.group(2)): node[k] for k, m in found.items()}
        if stacked_name in rest:
            raise ConfigError(f"stack_layers: {where} has both per-layer '{prefix}N' and stacked "
                              f"'{stacked_name}' children; pass one layout")
        n = counts.get(path[-1] if path else "", max(blocks) + 1)
        if max(blocks) >= n:
            raise ConfigError(f"stack_layers: {where}/{prefix}{max(blocks)} is beyond the "
                              f"model's {n} layers")
        template = {}
        for i in sorted(blocks):
            for p, leaf in jax.tree_util.tree_flatten_with_path(blocks[i])[0]:
                template.setdefault(p, leaf)
        layers = []
        for i in range(n):
            have = dict(jax.tree_util.tree_flatten_with_path(blocks.get(i, {}))[0])
            layers.append({p: have[p] if p in have else _zeros_like(leaf)
                           for p, leaf in template.items()})
        stacked = {}
        for p in template:
            shapes = {tuple(jnp.shape(layer[p])) for layer in layers}
            if len(shapes) != 1:
                name = jax.tree_util.keystr(p)
                raise ConfigError(f"stack_layers: {where}/{prefix}N{name} differs in shape "
                                  f"across layers ({sorted(shapes)}); layers must match to be "
                                  "stacked")
            stacked[p] = _stack([layer[p] for layer in layers])
        return {**rest, stacked_name: _rebuild(template, stacked)}

    return walk(tree, ())


def _rebuild(template: dict, values: dict) -> Any:
    """The nested dict of ``template``'s key paths with the leaves ``values``."""
    out: dict = {}
    for p in template:
        node = out
        keys = [k.key for k in p]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = values[p]
    return out


def unstack_layers(tree: Any) -> Any:
    """Stacked tree -> per-layer tree: each ``blocks`` child becomes ``block_0 .. block_{Y-1}``
    (each ``layers`` child ``layers_0 ..``).

    The inverse of ``stack_layers`` (for the layers and sites it filled, zeros come back). Leaves
    may be arrays, abstract shapes or the tuples that ``sow`` writes; trees without a stacked
    child are returned unchanged.
    """
    def walk(node):
        if not isinstance(node, dict):
            return node
        out = {k: walk(v) for k, v in node.items() if k not in _PREFIXES}
        for name in (k for k in node if k in _PREFIXES):
            sub = node[name]
            leaves = jax.tree.leaves(sub)
            for i in range(leaves[0].shape[0] if leaves else 0):
                out[f"{_PREFIXES[name]}{i}"] = jax.tree.map(lambda x, i=i: _index(x, i), sub)
        return out

    return walk(tree)


def _index(x, i: int):
    if _is_abstract(x):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[i]


def per_layer_state(cfg, state: dict) -> dict:
    """A model's mutable ``state`` with its sown ``intermediates`` per layer (unstacked when
    ``cfg.scan_layers``), as ``sites.collect_counts`` reads them."""
    if not getattr(cfg, "scan_layers", False) or "intermediates" not in state:
        return state
    return {**state, "intermediates": unstack_layers(state["intermediates"])}


def repeat_rows(cfg, tree: Any, repeats: int) -> Any:
    """Each array of ``tree`` (a cache, say) repeated ``repeats`` times along its batch axis:
    axis 0, or axis 1 under a stacked scope (whose leaves lead with the layer axis). Scalars
    are kept."""
    def one(path, x):
        if not jnp.ndim(x):
            return x
        stacked = any(getattr(k, "key", None) in _PREFIXES for k in path)
        return jnp.repeat(x, repeats, axis=1 if stacked else 0)

    return jax.tree_util.tree_map_with_path(one, tree)
