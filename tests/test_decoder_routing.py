"""Every routing method over a decoder-only model (the first decoder family's tiny preset, the
tiny Llama: routing is the same code for every family, and each check compiles the model
several times), against a NumPy re-implementation of each site's routing and LoRA combination
run inside the same base model.

The base model is checked against transformers in tests/test_decoder.py; here the reference
replaces only what routing does at a site (``NumpySites``): the scores, the top-k and its
softmax, and the weighted sum of the experts' LoRA products, in float64, from the raw gates,
prototypes or LoRA factors (nothing from ``goose_jax.routing.formula``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import needs_8_devices
from family_cases import FIRST, FIRST_RANDOM_BASE, family_of, logits_of

import goose_jax as gj
from goose_jax.core import sharding
from goose_jax.experts import lora as ex
from goose_jax.models import families
from goose_jax.models import sites as site_api
from goose_jax.routing import methods as routers
from goose_jax.routing.methods import build_routed

FAM = family_of(FIRST)
CFG = FAM.preset(FIRST_RANDOM_BASE.removeprefix("random:"))
decoder_logits = logits_of(FIRST)
E, R = 5, 4
SCALE = 1 / R
ATOL = 1e-5


def _sharpen(path, leaf):
    # Kernels and the embedding at std 0.3 instead of 0.02: logits far enough apart that a wrong
    # routing choice shows, and greedy tokens that are not near ties.
    return leaf * 15.0 if str(path[-1].key) in ("kernel", "embedding") else leaf


def _library(E: int, seed: int):
    rng = np.random.default_rng(seed)
    lib = ex.init_experts(CFG, ex.LoRAConfig(rank=R), E, seed)
    # Non-zero B (fresh experts have B = 0 and would all be the base model).
    lib = jax.tree.map(lambda x: np.asarray(x) + 0.2 * rng.standard_normal(x.shape, np.float32),
                       lib)
    gates = jax.tree.map(lambda g: rng.standard_normal(g.shape).astype(np.float32),
                         ex.init_gates(lib))
    return lib, gates


def _batch(rng, rows: int, length: int):
    """Random tokens with right padding in row 1 and left padding in row 2."""
    ids = rng.integers(3, CFG.vocab_size, (rows, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, length - 3:] = 0
    mask[2, :4] = 0
    return ids * mask, mask


@pytest.fixture(scope="module")
def world():
    params = jax.tree_util.tree_map_with_path(_sharpen, families.init_params(CFG, 0))
    lib, gates = _library(E, 1)
    ids, mask = _batch(np.random.default_rng(0), 3, 10)
    return params, lib, gates, ids, mask


def _ln(v):
    v = v - v.mean(-1, keepdims=True)
    return v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-5)


@dataclasses.dataclass(eq=False)
class NumpySites:
    """Reference site adapter, run eagerly: per token, the method's weight of every expert, and
    ``y + sum_e w_e (x A_e) B_e * scale``, in NumPy float64.

    ``vectors``: per site, the raw gates or prototypes (E, I) (``phatgoose``), or None to use the
    top singular vector of ``A_e B_e`` (``arrow``); ``example`` (B,): one expert per row;
    neither: every expert with weight 1/E (``merged``). Records each site's inputs and the
    argmax of its scores.
    """

    lib: dict
    top_k: int = 2
    vectors: dict | None = None
    arrow: bool = False
    example: np.ndarray | None = None
    inputs: dict = dataclasses.field(default_factory=dict)
    top1: dict = dataclasses.field(default_factory=dict)

    def __call__(self, module, x, y):
        site = "/".join(module.path)
        leaf = ex.flatten_sites(self.lib)[site]
        a, b = np.asarray(leaf["lora_a"], np.float64), np.asarray(leaf["lora_b"], np.float64)
        x64 = np.asarray(x, np.float64)
        self.inputs[site] = x64
        w = self._weights(site, x64, a, b)
        per_expert = np.einsum("bser,ero->bseo", np.einsum("bsi,eir->bser", x64, a), b)
        delta = np.einsum("bse,bseo->bso", w, per_expert) * SCALE
        return y + jnp.asarray(delta, y.dtype)

    def _weights(self, site, x, a, b):
        n = a.shape[0]
        if self.example is not None:
            return np.broadcast_to(np.eye(n)[self.example][:, None], x.shape[:2] + (n,))
        if self.vectors is None and not self.arrow:
            return np.full(x.shape[:2] + (n,), 1.0 / n)
        if self.arrow:
            u = np.stack([np.linalg.svd(a[e] @ b[e])[0][:, 0] for e in range(n)])
            scores = np.abs(x @ u.T)
        else:
            g = np.asarray(ex.flatten_sites(self.vectors)[site]["gate"], np.float64)
            scores = _ln(x) @ _ln(g).T / np.sqrt(x.shape[-1])
        self.top1[site] = np.argmax(scores, -1)
        keep = np.argsort(-scores, axis=-1, kind="stable")[..., :self.top_k]
        kept = np.take_along_axis(scores, keep, -1)
        p = np.exp(kept - kept.max(-1, keepdims=True))
        w = np.zeros(scores.shape)
        np.put_along_axis(w, keep, p / p.sum(-1, keepdims=True), -1)
        return w


def _reference(params, ids, mask, sites: NumpySites):
    """The model run eagerly with ``sites`` as its adapter (``masked_forward`` of no site)."""
    forward, _ = FAM.masked_forward(CFG, sites, (), site_api.TELEMETRY)
    return np.asarray(forward({"params": params}, jnp.asarray(ids), jnp.asarray(mask))[0])


def _logits(params, ids, mask, routed):
    return np.asarray(decoder_logits(CFG, params, ids, mask, routing=routed))


@pytest.mark.parametrize("method, k", [("phatgoose", 2), ("phatgoose", 1), ("arrow", 2),
                                       ("average_activation", 2), ("merged", 0)])
def test_routed_logits_equal_the_numpy_sites(world, method, k):
    params, lib, gates, ids, mask = world
    routed = build_routed(method, CFG, lib, gates=gates, prototypes=gates, top_k=max(k, 1),
                          scale=SCALE)
    ref = NumpySites(lib, top_k=k, vectors=gates if k and method != "arrow" else None,
                     arrow=method == "arrow")
    want = _reference(params, ids, mask, ref)
    got = _logits(params, ids, mask, routed)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    base = _logits(params, ids, mask, None)
    assert np.abs(got - base).max() > 1e-2   # the experts changed the model


@pytest.mark.parametrize("method", ["example", "retrieval", "single"])
def test_per_example_methods_equal_the_numpy_sites(world, method):
    params, lib, _, ids, mask = world
    choice = np.array([3, 0, 4]) if method != "single" else np.array([2, 2, 2])
    routed = build_routed(method, CFG, lib, scale=SCALE, expert=2)
    if method != "single":
        routed = routed.with_example_index(choice)
    want = _reference(params, ids, mask, NumpySites(lib, example=choice))
    np.testing.assert_allclose(_logits(params, ids, mask, routed), want, rtol=0, atol=ATOL)


def test_telemetry_counts_the_real_tokens_of_the_sequence(world):
    """The sowed top-1 counts at every site are the NumPy argmax counts over the real tokens
    (``sequence_telemetry_masks``): padding never counts."""
    params, lib, gates, ids, mask = world
    routed = build_routed("phatgoose", CFG, lib, gates=gates, scale=SCALE, telemetry=True)
    sites = list(ex.flatten_sites(lib))
    forward, _ = FAM.masked_forward(CFG, routed.adapter, sites, site_api.TELEMETRY)
    _, state = forward({"params": params, **routed.collections}, jnp.asarray(ids),
                       jnp.asarray(mask))
    counts = site_api.collect_counts(state)
    ref = NumpySites(lib, vectors=gates)
    _reference(params, ids, mask, ref)
    assert set(counts) == set(sites) == set(ref.top1)
    for site in sites:
        want = np.bincount(ref.top1[site][mask == 1], minlength=E)
        np.testing.assert_array_equal(np.asarray(counts[site]), want, err_msg=site)
        assert want.sum() == mask.sum() < mask.size


def test_average_activations_average_every_real_token(world):
    """Each expert's prototypes, at every site, are its site inputs with its own LoRA active
    (NumPy), averaged over the real tokens of its batches, prompt and target alike, per token
    or per row (a row with no real token left out). Routing by them equals the NumPy sites."""
    params, lib, _, ids, mask = world
    rng = np.random.default_rng(7)
    batches = []
    for _ in range(E):
        first = _batch(rng, 3, 8)
        ids2, mask2 = _batch(rng, 4, 6)
        mask2[3] = 0   # a padding row
        batches.append([first, (ids2 * mask2, mask2)])
    rows = {}   # site -> per expert, per row: the inputs at its real tokens
    for n in range(E):
        for b_ids, b_mask in batches[n]:
            ref = NumpySites(lib, example=np.full(b_ids.shape[0], n))
            _reference(params, b_ids, b_mask, ref)
            for site, x in ref.inputs.items():
                rows.setdefault(site, [[] for _ in range(E)])[n] += [
                    x[r][b_mask[r] == 1] for r in range(len(b_ids))]
    for pooling in ("token", "example"):
        protos = routers.compute_average_activations(CFG, params, lib, batches, scale=SCALE,
                                                     pooling=pooling)
        got = ex.flatten_sites(protos)
        assert set(got) == set(rows)
        for site, per_expert in rows.items():
            want = [np.concatenate(r).mean(0) if pooling == "token" else
                    np.mean([x.mean(0) for x in r if len(x)], axis=0) for r in per_expert]
            np.testing.assert_allclose(np.asarray(got[site]["gate"]), np.stack(want), rtol=0,
                                       atol=ATOL, err_msg=f"{pooling} {site}")
    wanted = ex.nest_sites({site: {"gate": np.stack([np.mean([x.mean(0) for x in r if len(x)],
                                                             axis=0) for r in per_expert])}
                            for site, per_expert in rows.items()})
    routed = build_routed("average_activation", CFG, lib, prototypes=protos, scale=SCALE)
    np.testing.assert_allclose(_logits(params, ids, mask, routed),
                               _reference(params, ids, mask, NumpySites(lib, vectors=wanted)),
                               rtol=0, atol=ATOL)
    with pytest.raises(routers.LibraryMismatchError, match=r"\(input_ids_BT, mask_BT\)"):
        routers.compute_average_activations(CFG, params, lib, [[(ids, mask, ids, mask)]] * E)


def _stepwise_greedy(params, ids, mask, routed, steps: int):
    """Greedy tokens by recomputing the routed logits of the whole sequence at every step: the
    prompt left-aligned, the new tokens written after it, the rest padding."""
    rows, length = ids.shape
    seq = np.zeros((rows, length + steps), np.int32)
    seq_mask = np.zeros_like(seq)
    ends = []
    for r in range(rows):
        real = ids[r][mask[r] == 1]
        seq[r, length - len(real):length] = real
        seq_mask[r, length - len(real):length] = 1
        ends.append(length)
    out = np.full((rows, steps), CFG.pad_token_id, np.int32)
    done = np.zeros(rows, bool)
    for i in range(steps):
        logits = _logits(params, seq, seq_mask, routed)
        tok = np.argmax(logits[np.arange(rows), np.array(ends) + i - 1], -1)
        tok = np.where(done, CFG.pad_token_id, tok)
        out[:, i] = tok
        done |= tok == CFG.eos_token_id
        seq[:, length + i] = tok
        seq_mask[:, length + i] = 1
    return out


def test_routed_generation_equals_stepwise_argmax(world):
    params, lib, gates, ids, mask = world
    routed = build_routed("phatgoose", CFG, lib, gates=gates, scale=SCALE)
    toks = np.asarray(FAM.generate(CFG, params, ids, 6, mask, adapter=routed.adapter,
                                   collections=routed.collections))
    np.testing.assert_array_equal(toks, _stepwise_greedy(params, ids, mask, routed, 6))
    assert (toks != _stepwise_greedy(params, ids, mask, None, 6)).any()   # routing mattered


@needs_8_devices
def test_expert_mesh_equals_no_mesh(world):
    """6 experts on data=2, expert=4 (padded to 8): both per-token scorings (PHATGOOSE's, which
    average activation shares, and Arrow's), per-example routing and merged give the logits,
    and PHATGOOSE the greedy tokens, of the run without a mesh."""
    params = world[0]
    lib, gates = _library(6, 3)
    ids, mask = _batch(np.random.default_rng(4), 4, 9)
    mesh = sharding.make_mesh(data=2, expert=4)
    on_mesh = sharding.shard_params(params, families.param_logical_axes(CFG), mesh)
    put = lambda a: jax.device_put(jnp.asarray(a), sharding.batch_sharding(mesh))  # noqa: E731
    for method in ("phatgoose", "arrow", "example", "merged"):
        plain, split = (build_routed(method, CFG, lib, gates=gates, scale=SCALE, mesh=m)
                        for m in (None, mesh))
        if method == "example":
            plain, split = (r.with_example_index([5, 0, 3, 1]) for r in (plain, split))
        if method != "merged":
            assert split.adapter.mesh is mesh and split.adapter.num_experts == 6
        want = _logits(params, ids, mask, plain)
        got = _logits(on_mesh, put(ids), put(mask), split)
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=method)
        if method == "phatgoose":
            np.testing.assert_array_equal(
                np.asarray(FAM.generate(CFG, on_mesh, put(ids), 5, put(mask),
                                        adapter=split.adapter, collections=split.collections)),
                np.asarray(FAM.generate(CFG, params, ids, 5, mask, adapter=plain.adapter,
                                        collections=plain.collections)), err_msg=method)


def test_a_library_of_the_other_family_is_refused(world):
    _, lib, gates, _, _ = world
    with pytest.raises(routers.LibraryMismatchError, match="does not exist in this base model"):
        build_routed("phatgoose", gj.T5Config.preset("tiny"), lib, gates=gates)
