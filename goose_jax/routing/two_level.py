"""Two-level routing: a token scores cluster centroids first, then only the members of the few
clusters it keeps, so the router's cost grows with C + n_probe * M instead of E.

Build time (per site, ``cluster_vectors``): the router vectors exactly as the method scores them
(PHATGOOSE and average activation: the standardized rows ``ln(G)``; Arrow: its unit vectors) are
normalized to unit length and clustered by spherical k-means: k-means++ seeding drawn from a
``jax.random`` key (deterministic for a seed), then a fixed number of Lloyd steps (assign each
vector to the centroid of largest cosine, centroid = normalized sum of its members). Arrow scores
``|x . u|`` ignore u's sign, so its geometry is axial: the similarity is ``|cos|`` and members are
sign-aligned before summing. A last, capacity-bounded assignment (experts in order of their
best similarity, each to its most similar cluster that still has room, at most
``ceil(balance * E / C)`` members) keeps the clusters of similar size, since every cluster's
member table is padded to the largest one. Centroids are the normalized sums of the final
members.

Why cosine: a token's PHATGOOSE score is ``ln(x) . ln(G_e) / sqrt(I)``, an inner product with
rows of near-equal norm (standardized, norms below sqrt(I) only by the eps term), so the experts
that score highest for a token are, to that order, those of largest cosine with it, and a
centroid's cosine with the token ranks the clusters that hold them.

Run time (``two_level_route``), per token: the C centroid scores (for PHATGOOSE the centred
token against the unit centroids; the token's positive scale changes no ranking), the best
``n_probe`` clusters (``jax.lax.top_k``), the exact method scores of their members, padding
masked to -inf, and the exact top-k with its softmax over these candidates. Static shapes
throughout: the (token, cluster) pairs are sorted by cluster into fixed-size row blocks, each
owned by one cluster (the layout of ``backends.combine_grouped``), and a ``lax.scan`` scores
blocks against their cluster's padded (M, I) member table with batched matmuls: no per-token
copy of candidate vectors. With ``n_probe = C`` every expert is a candidate once and the result
is exact routing (up to float summation order; ties then go to the lower candidate slot, which
is the lower expert index within a cluster).

Shapes follow the package legend. Also used here: C clusters, M members per cluster (padded),
p clusters kept per token (n_probe), S token rows per block.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from goose_jax.core.errors import LibraryError, RoutingError
from goose_jax.core.trees import flatten_sites, nest_sites
from goose_jax.library.clusters import save_clusters
from goose_jax.library.store import ExpertLibrary
from goose_jax.routing.backends import sort_by_expert
from goose_jax.routing.formula import LN_EPS, arrow_temperature, prepare_router

Array = jax.Array

SCORINGS = ("standardized", "abs_dot")
DEFAULT_ITERATIONS = 20
DEFAULT_BALANCE = 1.5
# Bytes of gathered token rows and member rows one scan step scores (as backends._STEP_BYTES).
_STEP_BYTES = 3 << 20

__all__ = ["DEFAULT_BALANCE", "DEFAULT_ITERATIONS", "SCORINGS", "TwoLevel", "check_clusters",
           "cluster_gates", "cluster_library", "cluster_vectors", "default_clusters",
           "member_table", "member_vectors", "route_recall", "two_level_route"]


@dataclasses.dataclass(frozen=True)
class TwoLevel:
    """The two-level option of ``routing.methods.build_routed``.

    Attributes:
      n_probe: clusters kept per token (1 <= n_probe <= C).
      clusters: per-site ``{"centroids": (C, I), "members": (C, M)}`` (a library's stored
        clusters, ``library.clusters.load_clusters``); None: clustered when the router is built,
        from the method's own router vectors, with ``num_clusters``, ``seed``, ``iterations``
        and ``balance``.
      num_clusters: C when clustering at build (None: ``default_clusters(E)``).
    """

    n_probe: int
    clusters: dict | None = None
    num_clusters: int | None = None
    seed: int = 0
    iterations: int = DEFAULT_ITERATIONS
    balance: float = DEFAULT_BALANCE


def default_clusters(num_experts: int) -> int:
    """C = round(sqrt(E)) (at least 1): centroid and member work then balance, ~2 sqrt(E) rows."""
    return max(1, round(math.sqrt(num_experts)))


# ----------------------------------------------------------------------------------------------
# Build time: spherical (or axial) k-means.


def _similarity(unit_EI: Array, centroids_CI: Array, axial: bool) -> Array:
    sim = jnp.einsum("ei,ci->ec", unit_EI, centroids_CI, precision=jax.lax.Precision.HIGHEST)
    return jnp.abs(sim) if axial else sim


def _centroids(unit_EI: Array, sim_EC: Array, assign_E: Array, num_clusters: int,
               axial: bool, previous_CI: Array) -> Array:
    """Normalized member sums (sign-aligned when axial); an empty cluster keeps its centroid."""
    rows = unit_EI
    if axial:
        rows = unit_EI * jnp.where(jnp.take_along_axis(sim_EC, assign_E[:, None], 1) < 0, -1.0,
                                   1.0)
    sums = jax.ops.segment_sum(rows, assign_E, num_segments=num_clusters)
    norm = jnp.linalg.norm(sums, axis=-1, keepdims=True)
    return jnp.where(norm > 0, sums / jnp.maximum(norm, 1e-30), previous_CI)


@functools.partial(jax.jit, static_argnames=("num_clusters", "iterations", "axial", "capacity"))
def _kmeans(unit_EI, key, *, num_clusters, iterations, axial, capacity):
    num_experts = unit_EI.shape[0]

    # k-means++ seeding: each new centroid drawn with probability proportional to the squared
    # chord distance (1 - similarity) to the nearest centroid chosen so far, that distance kept
    # up to date against each new centroid only (C * E * I work in all).
    first = jax.random.randint(jax.random.fold_in(key, 0), (), 0, num_experts)
    cents = jnp.zeros((num_clusters, unit_EI.shape[1]), jnp.float32).at[0].set(unit_EI[first])

    def nearest(dist_E, centroid_I):
        sim = _similarity(unit_EI, centroid_I[None, :], axial)[:, 0]
        return jnp.minimum(dist_E, jnp.maximum(1.0 - sim, 0.0))

    def seed_step(c, carry):
        cents, dist_E = carry
        logits = jnp.where(dist_E > 0, jnp.log(jnp.maximum(dist_E, 1e-30)), -jnp.inf)
        # All remaining distances 0 (fewer distinct vectors than clusters): any expert will do.
        logits = jnp.where(jnp.all(dist_E <= 0), 0.0, logits)
        pick = jax.random.categorical(jax.random.fold_in(key, c), logits)
        return cents.at[c].set(unit_EI[pick]), nearest(dist_E, unit_EI[pick])

    dist_E = nearest(jnp.full((num_experts,), jnp.inf, jnp.float32), cents[0])
    cents, _ = jax.lax.fori_loop(1, num_clusters, seed_step, (cents, dist_E))

    def lloyd(_, cents):
        sim = _similarity(unit_EI, cents, axial)
        return _centroids(unit_EI, sim, jnp.argmax(sim, axis=1), num_clusters, axial, cents)

    cents = jax.lax.fori_loop(0, iterations, lloyd, cents)

    # Capacity-bounded final assignment, most confident experts first.
    sim = _similarity(unit_EI, cents, axial)
    order = jnp.argsort(-jnp.max(sim, axis=1), stable=True)

    def place(counts_C, e):
        room = jnp.where(counts_C < capacity, sim[e], -jnp.inf)
        c = jnp.argmax(room)
        return counts_C.at[c].add(1), c

    _, assign_sorted = jax.lax.scan(place, jnp.zeros((num_clusters,), jnp.int32), order)
    assign_E = jnp.zeros((num_experts,), jnp.int32).at[order].set(assign_sorted)
    return _centroids(unit_EI, sim, assign_E, num_clusters, axial, cents), assign_E


def cluster_vectors(vectors_EI, num_clusters: int, *, scoring: str = "standardized",
                    seed: int = 0, iterations: int = DEFAULT_ITERATIONS,
                    balance: float = DEFAULT_BALANCE) -> tuple[np.ndarray, np.ndarray]:
    """Clusters one site's router vectors (see the module doc).

    Args:
      vectors_EI: (E, I) the vectors as the method scores them: ``prepare_router(gates)`` for
        PHATGOOSE and average activation, Arrow's unit vectors for ``abs_dot``.
      num_clusters: C, 1 <= C <= E.
      scoring: ``"standardized"`` (cosine geometry) or ``"abs_dot"`` (axial: sign ignored).
      seed: the k-means++ key; the same seed and vectors give the same clusters.
      iterations: Lloyd steps.
      balance: members per cluster at most ``ceil(balance * E / C)`` (>= 1).

    Returns:
      centroids: (C, I) float32 unit rows.
      members: (C, M) int32 expert indices, ascending within a cluster, padded with -1;
        M is the largest cluster's size. Every expert appears exactly once.
    """
    vectors = np.asarray(vectors_EI, np.float32)
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise RoutingError(f"router vectors must be (E, I) with E >= 1; found {vectors.shape}")
    if scoring not in SCORINGS:
        raise RoutingError(f"unknown scoring {scoring!r}; expected one of {SCORINGS}")
    num_experts = vectors.shape[0]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or \
            not 1 <= num_clusters <= num_experts:
        raise RoutingError(f"num_clusters must be an int in [1, E={num_experts}]; found "
                           f"{num_clusters!r}")
    if not (isinstance(balance, (int, float)) and balance >= 1):
        raise RoutingError(f"balance must be a number >= 1; found {balance!r}")
    norm = np.linalg.norm(vectors, axis=1, keepdims=True)
    # A zero row (an Arrow expert absent at the site) has no direction: any cluster holds it.
    unit = np.where(norm > 0, vectors / np.maximum(norm, 1e-30), 0.0).astype(np.float32)
    capacity = math.ceil(balance * num_experts / num_clusters)
    cents, assign = _kmeans(jnp.asarray(unit), jax.random.key(seed),
                            num_clusters=int(num_clusters), iterations=int(iterations),
                            axial=scoring == "abs_dot", capacity=int(capacity))
    return np.asarray(cents, np.float32), member_table(np.asarray(assign), int(num_clusters))


def cluster_gates(gates: dict, num_clusters: int | None = None, *, seed: int = 0,
                  iterations: int = DEFAULT_ITERATIONS, balance: float = DEFAULT_BALANCE) -> dict:
    """Per-site clusters of PHATGOOSE gates (per site ``{"gate": (E, I)}``), standardized as
    they are scored: per site ``{"centroids": (C, I), "members": (C, M)}``."""
    out = {}
    for site, leaf in flatten_sites(gates).items():
        rows = np.asarray(leaf["gate"], np.float32)
        count = num_clusters or default_clusters(rows.shape[0])
        cents, members = cluster_vectors(prepare_router(jnp.asarray(rows)), count, seed=seed,
                                         iterations=iterations, balance=balance)
        out[site] = {"centroids": cents, "members": members}
    return nest_sites(out)


def cluster_library(lib: ExpertLibrary, num_clusters: int | None = None, *, seed: int = 0,
                    iterations: int = DEFAULT_ITERATIONS, balance: float = DEFAULT_BALANCE,
                    overwrite: bool = False) -> dict:
    """Clusters a library's gates per site and stores them in it (``library.clusters``; the
    manifest becomes format version 2). Libraries without clusters route exactly as before.

    Args:
      lib: an open library whose experts all have gates.
      num_clusters: C per site (None: ``default_clusters(E)``); at most E.
      seed, iterations, balance: as ``cluster_vectors``.
      overwrite: replace clusters the library already holds.

    Returns:
      what was done: ``experts``, ``sites``, ``num_clusters``, ``max_members`` (largest
      cluster over the sites), ``seconds`` (loading the gates excluded) and the settings.

    Raises:
      LibraryError: clusters already there (without ``overwrite``), no experts, or experts
        without gates.
    """
    if "clusters" in lib.manifest and not overwrite:
        raise LibraryError(f"{lib.path}: the library already has clusters (overwrite=True, or "
                           "--overwrite, rebuilds them)")
    _, gates = lib.load(gates=True)
    count = num_clusters or default_clusters(len(lib))
    if not 1 <= count <= len(lib):
        raise LibraryError(f"{lib.path}: num_clusters must be in [1, {len(lib)}] (the library's "
                           f"experts); found {count}")
    t0 = time.perf_counter()
    clusters = cluster_gates(gates, count, seed=seed, iterations=iterations, balance=balance)
    seconds = time.perf_counter() - t0
    widest = max(np.shape(v["members"])[1] for v in flatten_sites(clusters).values())
    info = {"vectors": "standardized gates", "seed": seed, "iterations": iterations,
            "balance": balance, "seconds": round(seconds, 3)}
    save_clusters(lib, clusters, lib.names, info)
    return {"experts": len(lib), "sites": len(lib.sites), "num_clusters": count,
            "max_members": int(widest), **info}


def member_table(assign_E: np.ndarray, num_clusters: int) -> np.ndarray:
    """(C, M) int32 members of each cluster, ascending, padded with -1 (M the largest size)."""
    assign_E = np.asarray(assign_E)
    groups = [np.flatnonzero(assign_E == c) for c in range(num_clusters)]
    width = max(1, max(len(g) for g in groups))
    table = np.full((num_clusters, width), -1, np.int32)
    for c, g in enumerate(groups):
        table[c, :len(g)] = g
    return table


# ----------------------------------------------------------------------------------------------
# Run time.


def check_clusters(centroids_CI, members_CM, num_experts: int, d_in: int, where: str) -> None:
    """Raises RoutingError unless the clusters fit a site of E experts and width I: shapes, and
    (when concrete) every expert in exactly one cluster."""
    c_shape, m_shape = np.shape(centroids_CI), np.shape(members_CM)
    if len(c_shape) != 2 or c_shape[1] != d_in or len(m_shape) != 2 or m_shape[0] != c_shape[0] \
            or c_shape[0] < 1:
        raise RoutingError(f"{where}: clusters must be centroids (C, {d_in}) and members (C, M); "
                           f"found {c_shape} and {m_shape}")
    members = np.asarray(members_CM)
    real = np.sort(members[members >= 0])
    if real.size != num_experts or not np.array_equal(real, np.arange(num_experts)):
        raise RoutingError(f"{where}: the clusters' members are not the library's {num_experts} "
                           f"experts each once (found {real.size} entries); rebuild the clusters")


def member_vectors(vectors_EI: Array, members_CM) -> Array:
    """(C, M, I) the router vectors arranged by cluster; padding rows zero."""
    members = jnp.asarray(members_CM)
    rows = jnp.asarray(vectors_EI, jnp.float32)[jnp.maximum(members, 0)]
    return jnp.where((members >= 0)[:, :, None], rows, 0.0)


def _block_rows(num_assign: int, num_clusters: int, width: int) -> int:
    """Token rows per block, a power of two in [8, 128]: a block costs its S token rows plus its
    cluster's M member rows, so with n = A / C pairs per cluster the least
    C * ceil(n / S) * (S + M) is taken (smallest S on ties)."""
    per = max(num_assign, 1) / max(min(num_clusters, num_assign), 1)
    return min((8, 16, 32, 64, 128), key=lambda s: (math.ceil(per / s) * (s + width), s))


def two_level_route(x_NI: Array, table_CMI: Array, centroids_CI: Array, members_CM: Array,
                    top_k: int, n_probe: int, *, scoring: str = "standardized",
                    temperature: float | str = 1.0) -> tuple[Array, Array]:
    """Routes every token to its top-k experts among the members of its n_probe best clusters.

    Args:
      x_NI: (..., I) site inputs.
      table_CMI: (C, M, I) ``member_vectors(vectors, members)``.
      centroids_CI: (C, I) unit centroids; members_CM: (C, M) int32, -1 for padding.
      top_k: k <= n_probe * M (and a cluster set of at least k real experts per token).
      n_probe: clusters kept per token, 1 <= p <= C.
      scoring: ``"standardized"`` (PHATGOOSE, average activation) or ``"abs_dot"`` (Arrow).
      temperature: Arrow's divisor (``formula.arrow_temperature``).

    Returns:
      weights (..., k) float32 and index (..., k) int32, as ``formula.phatgoose_route``.
    """
    num_clusters, width, d_in = np.shape(table_CMI)
    if np.shape(x_NI)[-1] != d_in or np.shape(centroids_CI) != (num_clusters, d_in):
        raise RoutingError(f"two-level routing: x {np.shape(x_NI)}, table {np.shape(table_CMI)} "
                           f"and centroids {np.shape(centroids_CI)} do not fit together")
    if not 1 <= n_probe <= num_clusters:
        raise RoutingError(f"n_probe must be in [1, C={num_clusters}]; found {n_probe!r}")
    if not 1 <= top_k <= n_probe * width:
        raise RoutingError(f"top_k {top_k} exceeds the {n_probe * width} candidates of "
                           f"{n_probe} clusters of {width}")
    divisor = arrow_temperature(temperature, d_in) if scoring == "abs_dot" else 1.0
    lead = np.shape(x_NI)[:-1]
    num_tokens = math.prod(lead)
    weights, index = _two_level(
        jnp.reshape(x_NI, (num_tokens, d_in)), table_CMI, centroids_CI, members_CM,
        top_k=int(top_k), n_probe=int(n_probe), scoring=scoring, divisor=float(divisor))
    return weights.reshape(lead + (top_k,)), index.reshape(lead + (top_k,))


@functools.partial(jax.jit, static_argnames=("top_k", "n_probe", "scoring", "divisor"))
def _two_level(x_NI, table_CMI, centroids_CI, members_CM, *, top_k, n_probe, scoring, divisor):
    num_tokens, d_in = x_NI.shape
    num_clusters, width, _ = table_CMI.shape
    x_NI = x_NI.astype(jnp.float32)
    if scoring == "standardized":
        xs_NI = x_NI - jnp.mean(x_NI, axis=-1, keepdims=True)
        var_N = jnp.mean(xs_NI * xs_NI, axis=-1)
        scale_N = jax.lax.rsqrt(var_N + LN_EPS) / math.sqrt(d_in)
    else:
        xs_NI, scale_N = x_NI, jnp.full((num_tokens,), 1.0 / divisor, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    coarse_NC = jnp.einsum("ni,ci->nc", xs_NI, centroids_CI.astype(jnp.float32), precision=hi)
    if scoring == "abs_dot":
        coarse_NC = jnp.abs(coarse_NC)
    _, probe_Np = jax.lax.top_k(coarse_NC, n_probe)
    dots_NpM = _probe_dots(xs_NI, table_CMI.astype(jnp.float32), probe_Np)
    if scoring == "abs_dot":
        dots_NpM = jnp.abs(dots_NpM)
    member_NpM = jnp.asarray(members_CM, jnp.int32)[probe_Np]
    scores_NK = jnp.where(member_NpM >= 0, dots_NpM * scale_N[:, None, None], -jnp.inf)
    scores_NK = scores_NK.reshape(num_tokens, n_probe * width)
    kept_Nk, slot_Nk = jax.lax.top_k(scores_NK, top_k)
    index_Nk = jnp.take_along_axis(member_NpM.reshape(num_tokens, -1), slot_Nk, axis=1)
    return jax.nn.softmax(kept_Nk, axis=-1), index_Nk


def _probe_dots(xs_NI: Array, table_CMI: Array, probe_Np: Array) -> Array:
    """(N, p, M) dots of each token with the members of its probed clusters, by cluster blocks.

    The N * p (token, cluster) pairs are sorted by cluster and laid out in blocks of S rows,
    each group padded to whole blocks (at most A + C * (S - 1) rows, a static bound); a scan
    walks G blocks per step, gathering their token rows and their clusters' member tables, and
    writes each row's M dots to its pair. Steps past the last used block skip their work.
    """
    num_tokens, d_in = xs_NI.shape
    num_clusters, width, _ = table_CMI.shape
    n_probe = probe_Np.shape[1]
    num_assign = num_tokens * n_probe
    size = _block_rows(num_assign, num_clusters, width)
    max_rows = num_assign + min(num_clusters, num_assign) * (size - 1)
    per_block = 4 * d_in * (size + width)
    per_step = max(1, min(_STEP_BYTES // per_block, -(-max_rows // size)))
    num_steps = -(-max_rows // (size * per_step))
    num_blocks = num_steps * per_step
    num_rows = num_blocks * size

    _, order_A, sorted_cluster_A, counts_C = sort_by_expert(probe_Np, num_clusters)
    padded_C = (counts_C + size - 1) // size * size
    padded_start_C = jnp.cumsum(padded_C) - padded_C
    start_C = jnp.cumsum(counts_C) - counts_C
    row_A = (padded_start_C[sorted_cluster_A] + jnp.arange(num_assign, dtype=jnp.int32)
             - start_C[sorted_cluster_A])
    # The pair each padded row holds; padding rows hold num_assign (dropped on write).
    pair_P = jnp.full((num_rows,), num_assign, jnp.int32).at[row_A].set(order_A.astype(jnp.int32))
    marks_M = jnp.zeros((num_blocks,), jnp.int32).at[padded_start_C // size].add(1, mode="drop")
    cluster_M = jnp.clip(jnp.cumsum(marks_M) - 1, 0, num_clusters - 1)
    used_steps = (jnp.sum(padded_C) + size * per_step - 1) // (size * per_step)

    def work(out_AM, pair_GS, cluster_G):
        token_GS = jnp.minimum(pair_GS // n_probe, num_tokens - 1)
        dots_GSM = jnp.einsum("gsi,gmi->gsm", xs_NI[token_GS], table_CMI[cluster_G],
                              precision=jax.lax.Precision.HIGHEST)
        return out_AM.at[pair_GS.reshape(-1)].set(dots_GSM.reshape(-1, width), mode="drop")

    def step(out_AM, inputs):
        i, pair_GS, cluster_G = inputs
        return jax.lax.cond(i < used_steps, work, lambda o, *_: o, out_AM, pair_GS,
                            cluster_G), None

    out_AM = jnp.zeros((num_assign, width), jnp.float32)
    steps = (pair_P.reshape(num_steps, per_step, size), cluster_M.reshape(num_steps, per_step))
    if num_steps == 1:
        out_AM = work(out_AM, steps[0][0], steps[1][0])
    else:
        out_AM, _ = jax.lax.scan(step, out_AM, (jnp.arange(num_steps),) + steps)
    return out_AM.reshape(num_tokens, n_probe, width)


# ----------------------------------------------------------------------------------------------
# Recall against exact routing.


def route_recall(exact_weights, exact_index, weights, index, *, atol: float = 1e-5
                 ) -> tuple[float, float]:
    """How much of the exact top-k a routing recovers, over the tokens of one site.

    Args:
      exact_weights, exact_index: (..., k) the exact routing; weights, index: (..., k) the other.
      atol: weights within this of each other count as equal. The candidates' scores are
        summed in another order than the exact (N, E) matmul's, so equal choices differ by a
        few 1e-6 in their float32 weights where scores are large.

    Returns:
      (equal, mass): the share of tokens whose chosen expert set equals the exact one with every
      expert's weight equal within ``atol``, and the mean over tokens of the exact weight of the
      exact experts the routing also chose.
    """
    ew, ei = np.asarray(exact_weights, np.float64), np.asarray(exact_index)
    w, i = np.asarray(weights, np.float64), np.asarray(index)
    k = ew.shape[-1]
    ew, ei, w, i = (a.reshape(-1, k) for a in (ew, ei, w, i))
    hit_Nkk = ei[:, :, None] == i[:, None, :]          # exact slot j chosen as slot l
    found_Nk = hit_Nkk.any(axis=2)
    matched_w = np.where(hit_Nkk, w[:, None, :], 0.0).sum(axis=2)
    same = found_Nk.all(axis=1) & (np.abs(matched_w - ew) <= atol).all(axis=1)
    mass = np.where(found_Nk, ew, 0.0).sum(axis=1)
    return float(same.mean()), float(mass.mean())
