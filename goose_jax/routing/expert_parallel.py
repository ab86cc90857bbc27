"""Expert parallelism: a site routes and combines with its library split over the mesh's
``expert`` axis, and never gathers the library.

Shapes follow the package legend (the ``goose_jax`` module docstring). Also used here: X the
``expert`` mesh axis size, e = E / X the experts each device holds (E padded to a multiple of X,
``core.sharding.pad_experts``), N the tokens of one ``data`` shard.

Inside one ``jax.shard_map`` over the whole mesh, with the batch over ``data`` and every device
of an expert group holding the same tokens:

    1. each device scores its own e experts:            (N, e) from its (e, I) router vectors
    2. the scores are all-gathered over ``expert``:     (N, E), small; padding experts at -inf
    3. every device takes the same top-k and softmax    (the single-device routing rule)
    4. each device combines only the choices it owns    ``routing.formula.combine_lora`` on its (e,
    I, R)
                                                        and (e, R, O) slice, local indices
    5. the partial outputs are summed over ``expert``   (N, O) psum

Why this layout and not an all-to-all dispatch, counted per site and per data shard (b bytes per
activation value; T5-XL: I, O about 2,048 to 5,120, R 16, k 2, E 166):

  - this layout moves the scores' all-gather, N * E * 4 bytes (E of 36 to 1,000 against O of
    2,048 to 5,120), and one all-reduce of the partial outputs, about 2 * N * O * b bytes on a
    ring. Each device does the LoRA rows of its own assignments only, about N * k / X of the
    N * k (the other choices carry index e, one past the local slice, and weight 0: every
    backend gives them nothing, and grouped no rows of work), saving 2 * N * k * R * (I + O) *
    (1 - 1 / X) FLOPs per device; but those are only k * R * (I + O) / (I * O), 2 to 3 %, of the
    base matmul at T5-XL sizes, so the layout is chosen for bytes and memory, not FLOPs.
  - an all-to-all dispatch (tokens split over ``expert`` too, each assignment's row sent to its
    expert's device and its output sent back) must equal the single-device model, so it cannot
    drop tokens over a capacity: its static buffers must hold the worst case, every assignment of
    a device going to one peer, which moves about N * k * (I + O) * b bytes: 4 * N * O * b at
    k = 2, twice the all-reduce. A capacity factor would halve that and change the results.
  - gathering the library instead moves E * R * (I + O) * b bytes per site and holds a whole
    site's library on every chip, the memory that the split exists to save.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from goose_jax.routing import formula as routing

Array = jax.Array

EXPERT = "expert"
DATA = "data"


def expert_axis_size(mesh: Mesh | None) -> int:
    """X, the size of ``mesh``'s ``expert`` axis (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[EXPERT])


def mask_padding(scores_NE: Array, first: Array | int, num_real: int) -> Array:
    """Scores of padding experts (global index >= ``num_real``) set to -inf: never routed to.

    Args:
      scores_NE: (..., e) scores of experts ``first, first + 1, ...``.
      first: the global index of the first expert in ``scores_NE``.
      num_real: the number of real experts; the rest of the stack is padding.
    """
    index_E = first + jnp.arange(scores_NE.shape[-1])
    real_E = (index_E < num_real).reshape((1,) * (scores_NE.ndim - 1) + (-1,))
    return jnp.where(real_E, scores_NE, -jnp.inf)


def routed_delta(adapter, x: Array, router: Array, a_EIR: Array, b_ERO: Array):
    """The routed LoRA sum of one site with the library split over ``adapter.mesh``'s experts.

    Args:
      adapter: the ``routing.methods.RoutedAdapter`` (its ``mesh``, ``scoring``, ``top_k``,
        ``num_experts``, ``scale``, ``backend``, ``temperature``).
      x: (B, ..., I) site inputs.
      router: (E, I) router vectors, or for ``scoring="example"`` the (B,) expert of each example.
      a_EIR: (E, I, R) A factors, E a multiple of X, split over ``expert``.
      b_ERO: (E, R, O) B factors, split alike.

    Returns:
      (delta (B, ..., O) in x's dtype, ``routing.formula.RouteOutput`` without scores (weights and
      global
      indices (B, ..., k)) for telemetry).
    """
    mesh = adapter.mesh
    num_real = adapter.num_experts or a_EIR.shape[0]
    # The batch goes over ``data`` when it divides (the evaluator pads it so); otherwise every
    # device of an expert group takes the whole batch, which is still exact.
    lead = DATA if x.shape[0] % mesh.shape[DATA] == 0 else None
    x_spec = PartitionSpec(lead, *([None] * (x.ndim - 1)))
    example = adapter.scoring == "example"
    router_spec = PartitionSpec(lead) if example else PartitionSpec(EXPERT)

    def site(x, router, a_eIR, b_eRO):
        local = a_eIR.shape[0]
        first = jax.lax.axis_index(EXPERT) * local
        if example:
            index_Nk = jnp.broadcast_to(router.reshape((-1,) + (1,) * (x.ndim - 1)),
                                        x.shape[:-1] + (1,)).astype(jnp.int32)
            weights_Nk = jnp.ones(index_Nk.shape, jnp.float32)
        else:
            if adapter.scoring == "standardized":
                scores = routing.phatgoose_scores(x, router, gates_normed=True)
            else:
                scores = routing.arrow_scores(x, router, temperature=adapter.temperature)
            scores = mask_padding(scores, first, num_real)
            scores = jax.lax.all_gather(scores, EXPERT, axis=scores.ndim - 1, tiled=True)
            route = routing.topk_softmax(scores, adapter.top_k)
            index_Nk, weights_Nk = route.index, route.weights
        own = index_Nk - first
        owned = (own >= 0) & (own < local)
        part = routing.combine_lora(x, a_eIR, b_eRO, jnp.where(owned, weights_Nk, 0.0),
                                    jnp.where(owned, own, local), adapter.scale,
                                    backend=adapter.backend)
        return jax.lax.psum(part, EXPERT), weights_Nk, index_Nk

    out_spec = PartitionSpec(lead)
    # check_vma off: the top-k and the psum are the same on every device of an expert group,
    # which the out_specs (replicated over ``expert``) state.
    fn = jax.shard_map(site, mesh=mesh, in_specs=(x_spec, router_spec, PartitionSpec(EXPERT),
                                                   PartitionSpec(EXPERT)),
                       out_specs=(out_spec, out_spec, out_spec), check_vma=False)
    delta, weights, index = fn(x, router, a_EIR, b_ERO)
    return delta, routing.RouteOutput(weights=weights, index=index, scores=None)
