"""Whole-model routing: every method of the paper as a site adapter plus its variable trees.

Shapes follow the package legend (the ``goose_jax`` module docstring). Also used here: S a
site's sequence length (L at T5 encoder sites, T at T5 decoder sites and at every site of a
decoder-only model).

A ``Routed`` bundles what the model API (``gj.t5_logits`` / ``gj.generate_greedy`` for a T5,
``gj.decoder_logits`` / ``gj.generate_decoder_greedy`` for a decoder-only model) needs to run
the base model under a method: a hashable ``adapter`` (static under jit) and the variable
``collections`` it reads (the expert library, router vectors). Build one with ``build_routed``:

    routed = build_routed("phatgoose", cfg, experts, gates=gates, top_k=2, scale=1 / 16)
    logits = gj.t5_logits(cfg, params, ids, dec, mask, routing=routed)      # a T5Config
    logits = gj.decoder_logits(cfg, params, ids, mask, routing=routed)      # a DecoderConfig

Every method works on either family: the adapters only see a site's input, and the library is
checked against the family's own sites (``models.families.site_shapes``).

Methods (PHATGOOSE.md sections 5-6):
  ``phatgoose``           per-token top-k against standardized trained gates;
  ``average_activation``  the same scoring against each expert's mean site input (prototypes);
  ``arrow``               per-token top-k of ``|x . u|``, u the top singular vector of A B;
  ``merged``              one LoRA equal to the average of the experts' products (rank E*R);
  ``merged_factors``      A and B averaged separately (the original release's weaker variant);
  ``uniform``             every expert with weight 1/E;
  ``single``              one expert everywhere (oracle / best-individual tables);
  ``example``             one expert per example at every site, chosen by the caller;
  ``retrieval``           ``example`` under the paper's name (choices from
  ``goose_jax.routing.retrieval``);
  ``base``                no experts.

All validation (k against E, an empty library, non-finite router vectors, a library whose site
shapes disagree with the model) happens here, eagerly, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from goose_jax.core import sharding
from goose_jax.core.errors import LibraryMismatchError
from goose_jax.core.trees import flatten_sites, nest_sites
from goose_jax.experts.lora import EXPERTS, LoRAAdapter, lora_delta
from goose_jax.models import families
from goose_jax.models.families import ModelConfig
from goose_jax.models.sites import TELEMETRY
from goose_jax.routing import expert_parallel
from goose_jax.routing import formula as routing
from goose_jax.routing import two_level as two_level_routing
from goose_jax.routing.two_level import TwoLevel

Array = jax.Array

ROUTER = "router"
METHODS = ("phatgoose", "average_activation", "arrow", "merged", "merged_factors", "uniform",
           "single", "example", "retrieval", "base")
PER_EXAMPLE = ("example", "retrieval")  # methods whose caller picks one expert per example



@dataclasses.dataclass(frozen=True)
class RoutedAdapter:
    """Site adapter that routes every token among the experts of its site.

    Reads ``experts/<site>/lora_a, lora_b`` and ``router/<site>/vectors`` (E, I). For
    ``scoring="standardized"`` the vectors are already standardized
    (``routing.formula.prepare_router``);
    for ``scoring="abs_dot"`` they are Arrow's unit vectors. For ``scoring="example"`` the
    router entry is ``router/<site>/example_index`` (B,) and each example uses one expert.
    ``temperature`` divides the ``abs_dot`` scores (``routing.formula.arrow_scores``: a float, or
    ``"release"`` for ``10 * sqrt(I)``).
    With ``telemetry`` each site sows per-expert counts of its top-1 choices, the mean top-1
    weight and the mean routing entropy into the ``intermediates`` collection, from the routing
    the forward computes anyway. When the site has a ``telemetry/<site>/mask`` variable (shaped
    like the site input's leading axes, 1 for a real token), only masked-in tokens count, so
    padding never enters the statistics.

    ``num_experts`` (0: all) is the number of real experts when the stack is padded
    (``core.sharding.pad_experts``): the rest are never routed to. With a ``mesh`` whose ``expert``
    axis is larger than 1, the library is split over it and each site routes and combines
    without gathering it (``goose_jax.routing.expert_parallel``); without one, the site runs on
    whatever
    layout jit gives it.

    ``n_probe`` > 0 routes in two levels (``goose_jax.routing.two_level``): the site reads
    ``router/<site>/centroids`` (C, I), ``members`` (C, M) and ``table`` (C, M, I) instead of
    ``vectors``, and each token takes its exact top-k among the members of its ``n_probe`` best
    clusters.
    """

    scale: float
    top_k: int = 2
    scoring: str = "standardized"
    backend: str = "auto"
    telemetry: bool = False
    temperature: float | str = 1.0
    num_experts: int = 0
    mesh: Any = None
    n_probe: int = 0

    def __call__(self, module, x: Array, y: Array) -> Array:
        if not module.has_variable(EXPERTS, "lora_a"):
            return y
        a_EIR = module.get_variable(EXPERTS, "lora_a")
        b_ERO = module.get_variable(EXPERTS, "lora_b")
        num_real = self.num_experts or a_EIR.shape[0]
        if self.mesh is not None:
            router = module.get_variable(
                ROUTER, "example_index" if self.scoring == "example" else "vectors")
            delta, route = expert_parallel.routed_delta(self, x, router, a_EIR, b_ERO)
            if self.telemetry and self.scoring != "example":
                _sow_stats(module, route, num_real)
            return y + delta.astype(y.dtype)
        if self.scoring == "example":
            idx_B = module.get_variable(ROUTER, "example_index")
            # One expert per example: gather its factors, then a batched rank-R product.
            h = jnp.einsum("bsi,bir->bsr", x, a_EIR[idx_B].astype(x.dtype),
                           preferred_element_type=jnp.float32)
            out = jnp.einsum("bsr,bro->bso", h.astype(x.dtype), b_ERO[idx_B].astype(x.dtype),
                             preferred_element_type=jnp.float32)
            return y + (out * self.scale).astype(y.dtype)
        if self.n_probe:
            weights, index = two_level_routing.two_level_route(
                x, module.get_variable(ROUTER, "table"), module.get_variable(ROUTER, "centroids"),
                module.get_variable(ROUTER, "members"), self.top_k, self.n_probe,
                scoring=self.scoring, temperature=self.temperature)
            # No full score row exists in two levels; telemetry reads only weights and index.
            route = routing.RouteOutput(weights=weights, index=index, scores=weights)
        else:
            route = self._exact_route(module, x, a_EIR.shape[0], num_real)
        delta = routing.combine_lora(x, a_EIR, b_ERO, route.weights, route.index, self.scale,
                                     backend=self.backend)
        if self.telemetry:
            _sow_stats(module, route, num_real)
        return y + delta.astype(y.dtype)

    def _exact_route(self, module, x: Array, stacked: int, num_real: int):
        vectors_EI = module.get_variable(ROUTER, "vectors")
        if self.scoring == "standardized":
            scores = routing.phatgoose_scores(x, vectors_EI, gates_normed=True)
        else:
            scores = routing.arrow_scores(x, vectors_EI, temperature=self.temperature)
        if num_real < stacked:
            scores = expert_parallel.mask_padding(scores, 0, num_real)
        return routing.topk_softmax(scores, self.top_k)


def _sow_stats(module, route, num_experts: int) -> None:
    # The top-1 expert is index[..., 0] of topk_softmax: the argmax of the router scores.
    w_Nk = route.weights.reshape(-1, route.weights.shape[-1])
    top1_N = route.index.reshape(-1, route.index.shape[-1])[:, 0]
    if module.has_variable(TELEMETRY, "mask"):
        mask_N = module.get_variable(TELEMETRY, "mask").astype(jnp.float32).reshape(-1)
    else:
        mask_N = jnp.ones(top1_N.shape, jnp.float32)
    counts_E = jnp.zeros((num_experts,), jnp.float32).at[top1_N].add(mask_N)
    entropy_N = -jnp.sum(w_Nk * jnp.log(jnp.clip(w_Nk, 1e-12)), axis=-1)
    real = jnp.maximum(jnp.sum(mask_N), 1.0)
    module.sow("intermediates", "top1_counts", counts_E)
    module.sow("intermediates", "mean_top1_weight", jnp.sum(w_Nk[:, 0] * mask_N) / real)
    module.sow("intermediates", "mean_entropy", jnp.sum(entropy_N * mask_N) / real)


@dataclasses.dataclass(frozen=True)
class Routed:
    """An adapter and the variable trees it reads; pass as ``routing=`` to the model API."""

    method: str
    adapter: Any
    collections: dict

    def with_example_index(self, index_B) -> Routed:
        """For ``example`` / ``retrieval``: the expert each example of the next batch uses."""
        if self.method not in PER_EXAMPLE:
            raise LibraryMismatchError(f"with_example_index is for methods {PER_EXAMPLE}, not "
                                       f"{self.method!r}")
        index_B = jnp.asarray(index_B, jnp.int32)
        router = nest_sites({name: {"example_index": index_B}
                             for name in flatten_sites(self.collections[EXPERTS])})
        return dataclasses.replace(self, collections={**self.collections, ROUTER: router})


def _num_experts(experts: dict) -> int:
    flat = flatten_sites(experts)
    if not flat:
        raise LibraryMismatchError("the expert library is empty: no site has experts")
    sizes = {np.shape(leaf["lora_a"])[0] for leaf in flat.values()}
    if len(sizes) != 1:
        raise LibraryMismatchError(f"sites disagree on the number of experts: {sorted(sizes)}")
    (E,) = sizes
    if E == 0:
        raise LibraryMismatchError("the expert library is empty (E = 0)")
    return E


def check_library(cfg: ModelConfig, experts: dict) -> int:
    """Checks every site's A and B against the model's site shapes (a T5 or a decoder-only
    model, ``models.families.site_shapes``); returns E."""
    shapes = families.site_shapes(cfg)
    for name, leaf in flatten_sites(experts).items():
        if name not in shapes:
            raise LibraryMismatchError(
                f"expert site {name!r} does not exist in this base model (a library for a "
                f"different architecture?); the model has e.g. {next(iter(shapes))!r}")
        d_in, d_out = shapes[name]
        a, b = np.shape(leaf["lora_a"]), np.shape(leaf["lora_b"])
        if len(a) != 3 or len(b) != 3 or a[1] != d_in or b[2] != d_out or a[2] != b[1] \
                or a[0] != b[0]:
            raise LibraryMismatchError(
                f"site {name}: expected lora_a (E, {d_in}, R) and lora_b (E, R, {d_out}) for this "
                f"base model; found {a} and {b} (a library for a different base model?)")
    return _num_experts(experts)


def _check_vectors(name: str, vectors, E: int, d_in: int, what: str) -> None:
    arr = np.asarray(vectors)
    if arr.shape != (E, d_in):
        raise LibraryMismatchError(f"site {name}: {what} must have shape ({E}, {d_in}); "
                                   f"found {arr.shape}")
    if not np.isfinite(arr.astype(np.float32)).all():
        bad = np.flatnonzero(~np.isfinite(arr.astype(np.float32)).all(axis=1))
        raise LibraryMismatchError(f"site {name}: {what} contain NaN or inf (experts "
                                   f"{bad.tolist()[:10]})")


def build_routed(method: str, cfg: ModelConfig, experts: dict | None = None, *,
                 gates: dict | None = None, prototypes: dict | None = None, top_k: int = 2,
                 scale: float = 1 / 16, expert: int | None = None, backend: str = "auto",
                 telemetry: bool = False, temperature: float | str = 1.0, mesh=None,
                 num_experts: int | None = None, two_level: TwoLevel | None = None) -> Routed:
    """Everything ``gj.t5_logits(..., routing=...)`` (or, on a decoder-only model,
    ``gj.decoder_logits`` / ``gj.generate_decoder_greedy``) needs to run ``method``.

    Args:
      method: one of ``METHODS``.
      cfg: the base model config, a ``T5Config`` or a ``DecoderConfig`` (the library is checked
        against the family's site shapes).
      experts: stacked expert tree (per site ``lora_a`` (E, I, R), ``lora_b`` (E, R, O)); host
        arrays, or arrays already placed on ``mesh``. Its leading axis may be padded with zero
        experts (``core.sharding.pad_experts``) when ``num_experts`` says how many are real.
      gates: per-site ``gate`` (E, I), for ``phatgoose`` (rows past the real experts ignored).
      prototypes: per-site ``gate`` (E, I) mean activations, for ``average_activation``
        (``compute_average_activations``).
      top_k: experts per token for the per-token methods.
      scale: the LoRA scale of the library (1/r for PHATGOOSE experts).
      expert: the expert index, for ``single``.
      backend: combination backend of ``routing.formula.combine_lora``.
      telemetry: sow routing statistics (per-token methods).
      temperature: for ``arrow``, the divisor of ``|x . u|`` before the softmax: 1.0 (the
        default, as mttl and the paper's formula), a float > 0, or ``"release"`` for the
        original release's ``10 * sqrt(d_in)`` per site, which makes the top-k weights near
        even. It never changes which experts are kept.
      mesh: a ``core.sharding.make_mesh`` mesh: the collections are placed on it, the library's
        expert axis over ``expert`` (padded to a multiple of it with inert experts), and with
        an ``expert`` axis larger than 1 the per-token and per-example methods route without
        gathering the library (``goose_jax.routing.expert_parallel``). None: left where they are.
      num_experts: the real experts of a library whose leading axis is already padded (None:
        every expert of ``experts`` is real).
      two_level: route ``phatgoose``, ``average_activation`` or ``arrow`` in two levels
        (``routing.two_level.TwoLevel``: clusters kept per token, and the library's stored
        clusters or how to cluster the router vectors here). None (the default): exact routing.
        Not with an ``expert`` mesh axis larger than 1.

    Raises:
      LibraryMismatchError: unknown method, bad k, empty or mismatched library, NaN vectors.
      RoutingError: an Arrow temperature that is neither a number > 0 nor ``"release"``.
    """
    if method not in METHODS:
        raise LibraryMismatchError(f"unknown routing method {method!r}; expected one of "
                                   f"{list(METHODS)}")
    if method == "base":
        return Routed("base", None, {})
    if experts is None:
        raise LibraryMismatchError(f"method {method!r} needs an expert library")
    stacked = check_library(cfg, experts)
    E = stacked if num_experts is None else num_experts
    if isinstance(E, bool) or not isinstance(E, int) or not 1 <= E <= stacked:
        raise LibraryMismatchError(f"num_experts must be an integer in [1, {stacked}] (the "
                                   f"library's stacked experts); found {num_experts!r}")
    X = expert_parallel.expert_axis_size(mesh)
    if two_level is not None and (X > 1 or method not in ("phatgoose", "average_activation",
                                                          "arrow")):
        raise LibraryMismatchError(
            f"two-level routing is for phatgoose, average_activation and arrow without an "
            f"expert mesh axis; found method {method!r}, expert axis {X}")
    lib = sharding.pad_experts(experts, X) if X > 1 else experts
    padded = _num_experts(lib) > E
    flat = flatten_sites(lib)
    # Expert parallel only where the split library is routed per token or per example.
    routed = {"num_experts": E if padded else 0, "mesh": mesh if X > 1 else None}
    if method in ("phatgoose", "average_activation", "arrow"):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
            raise LibraryMismatchError(f"top_k must be an integer in [1, E={E}]; found {top_k!r}")
    if method in ("phatgoose", "average_activation"):
        source = gates if method == "phatgoose" else prototypes
        what = "gate vectors" if method == "phatgoose" else "average activations"
        if source is None:
            raise LibraryMismatchError(f"method {method!r} needs {what} for every site")
        src = flatten_sites(source)
        vectors = {}
        for name, leaf in flat.items():
            if name not in src:
                raise LibraryMismatchError(f"site {name}: the library has experts but no {what}")
            rows = src[name]["gate"]
            if np.shape(rows)[0] in (stacked, _num_experts(lib)):   # a padded stack's rows
                rows = rows[:E]
            _check_vectors(name, rows, E, np.shape(leaf["lora_a"])[1], what)
            # Standardized from the real experts only, then padded: a padding row is never
            # routed to (its score is masked), so it only has to exist.
            vectors[name] = {"vectors": _pad_rows(routing.prepare_router(jnp.asarray(rows)),
                                                  np.shape(leaf["lora_a"])[0])}
        if two_level is not None:
            vectors = _two_level_router(vectors, two_level, E, top_k, "standardized")
            routed["n_probe"] = two_level.n_probe
        adapter = RoutedAdapter(scale, top_k, "standardized", backend, telemetry, **routed)
        return _placed(method, adapter, {EXPERTS: lib, ROUTER: nest_sites(vectors)}, mesh)
    if method == "arrow":
        temperature = routing.check_temperature(temperature)
        vectors = {name: {"vectors": _arrow_vectors(leaf["lora_a"], leaf["lora_b"], E)}
                   for name, leaf in flat.items()}
        if two_level is not None:
            vectors = _two_level_router(vectors, two_level, E, top_k, "abs_dot")
            routed["n_probe"] = two_level.n_probe
        adapter = RoutedAdapter(scale, top_k, "abs_dot", backend, telemetry, temperature,
                                **routed)
        return _placed(method, adapter, {EXPERTS: lib, ROUTER: nest_sites(vectors)}, mesh)
    if method == "merged":
        merged = merge_products(lib, E)
        if mesh is not None:   # the concatenated rank axis (E*R) over ``expert`` where it divides
            specs = nest_sites({name: {"lora_a": P(None, None, "expert"),
                                       "lora_b": P(None, "expert", None)}
                                for name in flatten_sites(merged)})
            merged = sharding.shard_params(merged, specs, mesh)
        return Routed(method, LoRAAdapter(scale, "sum"), {EXPERTS: merged})
    if method == "merged_factors":
        mean = (lambda v: jnp.sum(v, axis=0, keepdims=True) / E) if padded else (
            lambda v: jnp.mean(v, axis=0, keepdims=True))
        merged = {name: {k: mean(v) for k, v in leaf.items() if k in ("lora_a", "lora_b")}
                  for name, leaf in flat.items()}
        return _placed(method, LoRAAdapter(scale, "sum"), {EXPERTS: nest_sites(merged)}, mesh,
                       replicated=True)
    if method == "uniform":
        if not padded:
            return _placed(method, LoRAAdapter(scale, "mean"), {EXPERTS: lib}, mesh)
        # The mean over the real experts: padding experts add zero to the sum.
        return _placed(method, LoRAAdapter(scale / E, "sum"), {EXPERTS: lib}, mesh)
    if method == "single":
        if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < E:
            raise LibraryMismatchError(
                f"method 'single' needs expert in [0, {E}); found {expert!r}")
        one = {name: {k: v[expert:expert + 1] for k, v in leaf.items()
                      if k in ("lora_a", "lora_b")} for name, leaf in flat.items()}
        return _placed(method, LoRAAdapter(scale, "sum"), {EXPERTS: nest_sites(one)}, mesh,
                       replicated=True)
    # "example", "retrieval": the caller supplies each example's expert (with_example_index).
    adapter = RoutedAdapter(scale, 1, "example", backend, **routed)
    return _placed(method, adapter, {EXPERTS: lib}, mesh)


def _two_level_router(vectors: dict, option: TwoLevel, num_real: int, top_k: int,
                      scoring: str) -> dict:
    """Per site the two-level router entries (centroids, members, member table) from the
    site's router vectors (its first ``num_real`` rows the real experts): the option's stored
    clusters, checked against the site, or a clustering of the vectors made here."""
    stored = flatten_sites(option.clusters) if option.clusters is not None else None
    out = {}
    for name, entry in vectors.items():
        real_EI = entry["vectors"][:num_real]
        if stored is None:
            count = option.num_clusters or two_level_routing.default_clusters(num_real)
            try:
                centroids, members = two_level_routing.cluster_vectors(
                    real_EI, count, scoring=scoring, seed=option.seed,
                    iterations=option.iterations, balance=option.balance)
            except routing.RoutingError as e:
                raise LibraryMismatchError(f"site {name}: {e}") from None
        elif name not in stored:
            raise LibraryMismatchError(f"site {name}: the stored clusters have no entry for it")
        else:
            centroids, members = stored[name]["centroids"], stored[name]["members"]
        try:
            two_level_routing.check_clusters(centroids, members, num_real, real_EI.shape[1],
                                             f"site {name}")
        except routing.RoutingError as e:
            raise LibraryMismatchError(str(e)) from None
        sizes = np.sort(np.sum(np.asarray(members) >= 0, axis=1))
        # Every token's candidates must hold k experts: the n_probe smallest clusters do.
        if isinstance(option.n_probe, bool) or not isinstance(option.n_probe, int) or \
                not 1 <= option.n_probe <= len(sizes) or top_k > sizes[:option.n_probe].sum():
            raise LibraryMismatchError(
                f"site {name}: n_probe must be an int in [1, C={len(sizes)}] whose smallest "
                f"clusters hold top_k={top_k} experts; found {option.n_probe!r}")
        members = jnp.asarray(members, jnp.int32)
        out[name] = {"centroids": jnp.asarray(centroids, jnp.float32), "members": members,
                     "table": two_level_routing.member_vectors(real_EI, members)}
    return out


def _pad_rows(x, rows: int):
    """``x`` (n, ...) with zero rows appended up to ``rows``."""
    extra = rows - x.shape[0]
    return x if not extra else jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])


def _placed(method: str, adapter, collections: dict, mesh, replicated: bool = False) -> Routed:
    """A ``Routed`` whose collections are on ``mesh``: each leaf's leading expert axis over
    ``expert`` (the rules table), or whole on every device for a one-expert tree."""
    if mesh is not None:
        collections = (sharding.replicate(collections, mesh) if replicated
                       else sharding.shard_experts(collections, mesh))
    return Routed(method, adapter, collections)


def _arrow_vectors(a_EIR, b_ERO, num_real: int | None = None) -> Array:
    """Arrow vectors with zero rows for experts absent at a site (all-zero A or B) and for
    padding experts (index >= ``num_real``).

    An imported adapter that does not cover a site holds zeros there; its singular vector would
    be an arbitrary direction that still wins tokens. A zero row scores 0, the lowest possible.
    """
    present_E = (jnp.abs(a_EIR).max(axis=(1, 2)) > 0) & (jnp.abs(b_ERO).max(axis=(1, 2)) > 0)
    if num_real is not None:
        present_E = present_E & (jnp.arange(present_E.shape[0]) < num_real)
    return routing.arrow_vectors(a_EIR, b_ERO) * present_E[:, None]


def merge_products(experts: dict, num_experts: int | None = None) -> dict:
    """The exact average of the experts' products as one rank-E*R expert.

    ``mean_e A_e B_e = [A_1 ... A_E] [B_1; ...; B_E] / E``: concatenate A along the rank axis and
    B along the rank axis divided by E. Returns a tree with E = 1. ``num_experts``: the real
    experts of a padded stack (the padding adds zero columns and is not counted in the mean).
    """
    out = {}
    for name, leaf in flatten_sites(experts).items():
        a_EIR, b_ERO = jnp.asarray(leaf["lora_a"]), jnp.asarray(leaf["lora_b"])
        E, I, R = a_EIR.shape
        a_cat = jnp.transpose(a_EIR, (1, 0, 2)).reshape(1, I, E * R)
        b_cat = (b_ERO / (num_experts or E)).reshape(1, E * R, b_ERO.shape[-1])
        out[name] = {"lora_a": a_cat, "lora_b": b_cat}
    return nest_sites(out)


# --- average activation -----------------------------------------------------------------------


POOLINGS = ("example", "token")


@dataclasses.dataclass(frozen=True)
class _CaptureAdapter:
    """Applies the active expert's LoRA and sows each site's per-example masked input sums
    (B, I) and token counts (B,).

    Each site's ``capture/<site>/mask`` (B, S) says which of its tokens count (on a T5, encoder
    tokens for encoder sites and cross-attention k / v, target tokens for other decoder sites;
    on a decoder-only model, every real token of the sequence).
    """

    scale: float

    def __call__(self, module, x, y):
        if not module.has_variable(EXPERTS, "lora_a"):
            return y
        y = y + lora_delta(x.astype(y.dtype), module.get_variable(EXPERTS, "lora_a"),
                           module.get_variable(EXPERTS, "lora_b"), None, self.scale).astype(y.dtype)
        mask_BS = module.get_variable("capture", "mask").astype(jnp.float32)
        module.sow("intermediates", "sum",
                   jnp.einsum("bs,bsi->bi", mask_BS, x.astype(jnp.float32)))
        module.sow("intermediates", "count", jnp.sum(mask_BS, axis=1))
        return y


def _pool(sum_BI: Array, count_B: Array, pooling: str) -> tuple[Array, Array]:
    """A batch's share of the prototype: (numerator (I,), denominator ()).

    ``token``: the masked sum over all tokens and their number. ``example``: the sum of the
    examples' own masked means and the number of examples with at least one token (an example
    with none, a padding row, is left out).
    """
    if pooling == "token":
        return jnp.sum(sum_BI, axis=0), jnp.sum(count_B)
    real_B = (count_B > 0).astype(jnp.float32)
    mean_BI = sum_BI / jnp.maximum(count_B, 1.0)[:, None]
    return jnp.einsum("b,bi->i", real_B, mean_BI), jnp.sum(real_B)


def compute_average_activations(cfg: ModelConfig, params: dict, experts: dict, batches, *,
                                scale: float = 1 / 16, pooling: str = "example") -> dict:
    """Average-activation router vectors: per expert and site, the mean site input.

    Expert n's prototypes are computed with expert n's LoRA active, over its own examples: the
    inputs each site reads while that expert is trained. On a T5, decoder sites are
    teacher-forced and read non-pad target tokens, encoder sites (and cross-attention k / v)
    non-pad input tokens. On a decoder-only model every site reads the one sequence, and every
    real token of it counts, prompt and target alike: those are the inputs the site processes
    in training (the loss is on the target tokens, but they attend to the prompt's keys and
    values, which the site's LoRA shapes), the T5's rule of "every token the site reads" carried
    over, and the routed model scores every token it routes (prompt and continuation) against
    these prototypes, so they average the same kind of input.

    Args:
      cfg: base model config (a T5 or decoder-only family); params: base parameters;
        experts: stacked library (E experts).
      batches: a sequence of length E; ``batches[n]`` is an iterable of batches for expert n:
        on a T5 ``(input_ids_BL, enc_mask_BL, decoder_input_ids_BT, dec_mask_BT)``; on a
        decoder-only model ``(input_ids_BT, mask_BT)``, prompt and target in one sequence
        padded on either side (mask 1 for a real token).
      scale: LoRA scale.
      pooling: ``"example"`` (the original release's): each example's masked mean over its
        tokens, then the mean over examples (an example with no token at a site is left out);
        ``"token"``: one masked mean over every token of every example, so long examples
        weigh more.

    Returns:
      per-site ``{"gate": (E, I)}`` float32 tree, ready for ``build_routed("average_activation",
      ..., prototypes=...)``.

    Raises:
      LibraryMismatchError: an unknown pooling, a batch source per expert missing, a batch of
        the wrong arity for the family, or an expert with no token to average.
    """
    if pooling not in POOLINGS:
        raise LibraryMismatchError(f"unknown pooling {pooling!r}; expected one of "
                                   f"{list(POOLINGS)}")
    E = check_library(cfg, experts)
    if len(batches) != E:
        raise LibraryMismatchError(f"need one batch source per expert ({E}); found {len(batches)}")
    flat = flatten_sites(experts)
    forward, arity = _capture_forward(cfg, flat, float(scale))

    @jax.jit
    def sums(params, one, *batch):
        _, state = forward({"params": params, EXPERTS: one}, *batch)
        inter = flatten_sites(state["intermediates"])
        return {name: _pool(inter[name]["sum"][0], inter[name]["count"][0], pooling)
                for name in flat}

    out = {name: np.zeros((E, np.shape(leaf["lora_a"])[1]), np.float32)
           for name, leaf in flat.items()}
    for n in range(E):
        one = nest_sites({name: {k: leaf[k][n:n + 1] for k in ("lora_a", "lora_b")}
                          for name, leaf in flat.items()})
        total = {name: 0.0 for name in flat}
        count = {name: 0.0 for name in flat}
        for batch in batches[n]:
            if len(batch) != len(arity):
                raise LibraryMismatchError(
                    f"expert {n}: a batch must be ({', '.join(arity)}) for a "
                    f"{families.describe(families.family(cfg))} model; found {len(batch)} arrays")
            res = sums(params, one, *(jnp.asarray(a, jnp.int32) if "ids" in name
                                      else jnp.asarray(a) for name, a in zip(arity, batch)))
            for name, (s, c) in res.items():
                total[name] = total[name] + np.asarray(s, np.float64)
                count[name] += float(c)
        for name in flat:
            if count[name] == 0:
                raise LibraryMismatchError(f"expert {n}: no tokens to average at site {name} "
                                           "(empty batches?)")
            out[name][n] = total[name] / count[name]
    return nest_sites({name: {"gate": jnp.asarray(v)} for name, v in out.items()})


def _capture_forward(cfg: ModelConfig, flat: dict, scale: float):
    """``(forward(variables, *batch) -> (out, state), names of the batch's arrays)``: the model
    under ``_CaptureAdapter`` with every site's ``capture`` mask set from the batch (the
    family's ``masked_forward``)."""
    return families.of(cfg).masked_forward(cfg, _CaptureAdapter(scale), tuple(flat), "capture")
