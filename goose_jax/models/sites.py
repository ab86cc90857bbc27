"""The seam every expert plugs into: a model's named sites and the adapter each site calls.

Every linear layer of every family is a *site*, named by its scope path
(``encoder/block_3/self_attn/q`` in a T5, ``layers_3/mlp/up`` in a Llama). A site computes its
base matmul ``y = x @ kernel`` and, when the model runs with an ``Adapter``, returns
``adapter(module, x, y)``: LoRA, gated LoRA and every routing method are adapters, and read
their own weights from their own variable collections at the site's path.

Routing telemetry rides the same seam: an adapter may sow per-site top-1 counts into
``intermediates``, counting only the tokens the ``telemetry`` collection's per-site ``mask``
marks; ``telemetry_masks`` / ``sequence_telemetry_masks`` build that collection and
``collect_counts`` reads the counts back.

Shapes follow the package legend (the ``goose_jax`` module docstring).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

from goose_jax.core.trees import flatten_sites, nest_sites

Array = jax.Array

TELEMETRY = "telemetry"  # optional per-site ``mask`` of the tokens telemetry counts


class Adapter(Protocol):
    """What a site calls after its base matmul. Must be hashable (it is a jit static argument).

    ``module`` is the calling ``Linear``: ``module.site`` is its name, and the adapter may read
    variables of its own collections there (``module.get_variable('lora', 'a')``).
    """

    def __call__(self, module: Any, x: Array, y: Array) -> Array: ...


def resolve_adapter(adapter, collections, routing):
    """The ``(adapter, collections)`` a model runs with: those of ``routing`` (a
    ``routing.methods.Routed``) when given, else the ones passed; both at once is an error."""
    if routing is None:
        return adapter, collections
    if adapter is not None or collections is not None:
        raise ValueError("pass either routing= or adapter= / collections=, not both")
    return routing.adapter, routing.collections


def telemetry_masks(sites, enc_mask_BL: Array, dec_mask_BT: Array, cross_mask_BL: Array) -> dict:
    """The ``telemetry`` collection: per site, the mask of the tokens its counts include.

    Args:
      sites: site names (``"encoder/block_0/self_attn/q"``, ...).
      enc_mask_BL: (B, L) the encoder tokens that count, for encoder sites.
      dec_mask_BT: (B, T) the decoder tokens that count, for decoder sites.
      cross_mask_BL: (B, L) the encoder tokens that count for cross-attention k and v, which
        read the encoder output.

    Returns:
      ``{"encoder": {"block_0": {"self_attn": {"q": {"mask": ...}}}}, ...}``. For a decoder-only
      model use ``sequence_telemetry_masks``.
    """

    def pick(site):
        if site.startswith("encoder/"):
            return enc_mask_BL
        return cross_mask_BL if site.endswith(("cross_attn/k", "cross_attn/v")) else dec_mask_BT

    return nest_sites({s: {"mask": pick(s)} for s in sites})


def sequence_telemetry_masks(sites, mask_BT: Array) -> dict:
    """The ``telemetry`` collection of a decoder-only model: every site (``layers_0/mlp/up``,
    ...) reads the one token sequence, so every site counts its real tokens, ``mask_BT``
    (B, T) (1 for a real token; prompt and continuation alike)."""
    return nest_sites({s: {"mask": mask_BT} for s in sites})


def collect_counts(state) -> dict[str, Array]:
    """Per site, the (E,) top-1 counts a telemetry adapter sowed in ``state["intermediates"]``
    (summed over the site's calls); sites that sowed nothing are absent."""
    inter = state.get("intermediates", {}) if state else {}
    if not inter:
        return {}
    return {name: sum(leaf["top1_counts"]) for name, leaf in flatten_sites(inter).items()
            if "top1_counts" in leaf}
