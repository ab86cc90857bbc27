"""Hugging Face T5 checkpoints <-> goose-jax parameter pytrees.

Reads a local Hugging Face T5 directory (``config.json`` plus ``model.safetensors``, sharded
safetensors with an index, or ``pytorch_model.bin``) into a plain nested dict of jax arrays, and
writes one back in the layout transformers itself writes. Never touches the network. The files
are read by ``goose_jax.core.tensorfile`` (checked safetensors headers; weights-only torch pickles).

Shapes follow the package legend (the ``goose_jax`` module docstring). Also used here, as in
``goose_jax.models.t5.model``: J = H * K the joined width of all heads (the inner dim), P
relative-position
buckets. Kernels are stored (I, O), the transpose of a PyTorch ``nn.Linear.weight`` (out, in).

Tying. transformers 5 writes ``tie_word_embeddings: true`` into every T5 config and records the
v1.0 / v1.1 difference as ``scale_decoder_outputs``, so the config cannot tell whether the output
head is tied. The weights can: a checkpoint is untied iff it holds an ``lm_head.weight`` that is
not exactly equal to the shared embedding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from goose_jax.core.errors import CheckpointError
from goose_jax.core.progress import progress_bar, progress_enabled
from goose_jax.core.sharding import read_into
from goose_jax.models.config import DTypePolicy
from goose_jax.models.family import (
    Site,
    check_param_tree,
    flatten_paths,
    param_shardings,
    put_path,
)
from goose_jax.models.hf_folder import (
    CONFIG_NAME,
    SAFE_WEIGHTS_NAME,
    SHARD_PATTERNS,
    WEIGHT_FILES,
    bits_equal,
    check_model_folder,
    names_shown,
    read_config_json,
    read_hf_state,
    write_model_folder,
)
from goose_jax.models.scan import per_layer, unstack_layers
from goose_jax.models.t5.config import T5Config
from goose_jax.models.t5.model import param_logical_axes

# Present in checkpoints written by older transformers (or by torch.save of a state dict) and
# never used: the per-stack embeddings are the shared one, and this relative bias was created but
# never applied in cross attention.
_HARMLESS_KEYS = frozenset({
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
})
_LM_HEAD = "lm_head.weight"
_SHARED = "shared.weight"

Params = dict[str, Any]


# --- the name table -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor and the parameter it becomes.

    Attributes:
      hf_key: name in the Hugging Face state dict,
        e.g. ``encoder.block.0.layer.0.SelfAttention.q.weight``.
      path: key path in our params pytree,
        e.g. ``("encoder", "block_0", "self_attn", "q", "kernel")``.
      hf_shape: shape of the Hugging Face tensor.
      transpose: whether the parameter is the transpose of the tensor (linear kernels).
    """

    hf_key: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    transpose: bool

    @property
    def param_shape(self) -> tuple[int, ...]:
        return self.hf_shape[::-1] if self.transpose else self.hf_shape

    @property
    def param_name(self) -> str:
        return "/".join(self.path)


def tensor_specs(cfg: T5Config) -> list[TensorSpec]:
    """Every tensor of a T5 with config ``cfg``, in checkpoint order; ``lm_head`` if untied."""
    D, F, V, J = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.inner_dim
    specs = [TensorSpec(_SHARED, ("shared", "embedding"), (V, D), False)]

    def linear(hf: str, path: tuple[str, ...], d_in: int, d_out: int):
        specs.append(TensorSpec(f"{hf}.weight", (*path, "kernel"), (d_out, d_in), True))

    def norm(hf: str, path: tuple[str, ...]):
        specs.append(TensorSpec(f"{hf}.weight", (*path, "scale"), (D,), False))

    def attention(hf: str, path: tuple[str, ...]):
        for name in ("q", "k", "v"):
            linear(f"{hf}.{name}", (*path, name), D, J)
        linear(f"{hf}.o", (*path, "o"), J, D)

    def ffn(hf: str, path: tuple[str, ...]):
        for name in (("wi_0", "wi_1") if cfg.is_gated else ("wi",)):
            linear(f"{hf}.{name}", (*path, name), D, F)
        linear(f"{hf}.wo", (*path, "wo"), F, D)

    for stack, n_layers in (("encoder", cfg.num_encoder_layers),
                            ("decoder", cfg.num_decoder_layers)):
        # T5 shares one relative-position table per stack; HF keeps it in block 0.
        specs.append(TensorSpec(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (stack, "relpos_bias", "embedding"),
            (cfg.relative_attention_num_buckets, cfg.num_heads), False))
        for i in range(n_layers):
            hf, ours = f"{stack}.block.{i}.layer", (stack, f"block_{i}")
            attention(f"{hf}.0.SelfAttention", (*ours, "self_attn"))
            norm(f"{hf}.0.layer_norm", (*ours, "self_attn_norm"))
            ffn_layer = 1
            if stack == "decoder":
                attention(f"{hf}.1.EncDecAttention", (*ours, "cross_attn"))
                norm(f"{hf}.1.layer_norm", (*ours, "cross_attn_norm"))
                ffn_layer = 2
            ffn(f"{hf}.{ffn_layer}.DenseReluDense", (*ours, "ffn"))
            norm(f"{hf}.{ffn_layer}.layer_norm", (*ours, "ffn_norm"))
        norm(f"{stack}.final_layer_norm", (stack, "final_norm"))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec(_LM_HEAD, ("lm_head", "kernel"), (V, D), True))
    return specs


def linear_sites(cfg: T5Config) -> dict[str, Site]:
    """HF module name -> ``Site`` for every T5 linear layer with a site, in model order."""
    out = {}
    for spec in tensor_specs(cfg):
        if spec.transpose and spec.path[0] in ("encoder", "decoder"):
            d_in, d_out = spec.param_shape
            out[spec.hf_key.removesuffix(".weight")] = Site("/".join(spec.path[:-1]), d_in, d_out)
    return out


# --- pure mapping -------------------------------------------------------------------------------


def _where(state: Mapping[str, Any], key: str, source: str) -> str:
    file_of = getattr(state, "file_of", None)
    return file_of(key) if file_of is not None else source


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    # Lazy states answer from the file header instead of reading the tensor.
    shape_of = getattr(state, "shape_of", None)
    return tuple(shape_of(key) if shape_of is not None else np.shape(state[key]))


def _shared_key(state: Mapping[str, Any]) -> str | None:
    for key in (_SHARED, "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if key in state:
            return key
    return None


def infer_tie_word_embeddings(state: Mapping[str, Any]) -> bool:
    """Whether a Hugging Face T5 state dict has a tied output head.

    Untied iff ``lm_head.weight`` is present and not bit-for-bit equal to the shared embedding
    (``torch.save`` of a tied model stores both, equal).
    """
    if _LM_HEAD not in state:
        return True
    shared = _shared_key(state)
    return shared is not None and bits_equal(state[_LM_HEAD], state[shared])


def hf_state_dict_to_params(cfg: T5Config, state: Mapping[str, Any], *,
                            source: str = "state dict", progress: bool = False,
                            mesh: Mesh | None = None) -> Params:
    """Maps a Hugging Face T5 state dict onto our params pytree.

    One tensor at a time is read, transposed and cast on the host (never a float32 copy of the
    model); with ``mesh``, straight into its layout (``base_shardings``,
    ``core.sharding.read_into``).

    Args:
      cfg: the model's config; ``cfg.tie_word_embeddings`` decides whether ``lm_head`` is read and
        ``cfg.dtype.param`` is the dtype of the result.
      state: tensor name -> array (NumPy, including ``ml_dtypes.bfloat16``); may be a lazy mapping.
        ``shared.weight`` may be absent if ``encoder.embed_tokens.weight`` is present.
      source: the file the state came from, named in error messages.
      progress: draw a tqdm bar over the tensors.
      mesh: lay the parameters out on this (data, model, expert) mesh; it may span processes.

    Returns:
      Nested dict of jax arrays in ``cfg.dtype.param``; see ``tensor_specs`` for names and shapes,
      e.g. ``params["encoder"]["block_0"]["self_attn"]["q"]["kernel"]`` of shape (D, J).

    Raises:
      CheckpointError: tensors missing, unexpected, of the wrong shape or not floating point, or
        an ``lm_head.weight`` different from the embedding while ``cfg`` ties them.
    """
    specs = tensor_specs(cfg)
    lookup = {s.hf_key: s.hf_key for s in specs}
    if _SHARED not in state and _shared_key(state) is not None:
        lookup[_SHARED] = _shared_key(state)
    missing = [s.hf_key for s in specs if lookup[s.hf_key] not in state]
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} tensor(s) that the config requires are missing: "
            f"{names_shown(missing)}; does {CONFIG_NAME} match these weights?")
    allowed = set(lookup.values()) | _HARMLESS_KEYS
    if cfg.tie_word_embeddings and _LM_HEAD in state:
        if not infer_tie_word_embeddings(state):
            raise CheckpointError(
                f"{_where(state, _LM_HEAD, source)}: {_LM_HEAD} differs from the shared embedding "
                "but the config ties them; load with tie_word_embeddings=False")
        allowed.add(_LM_HEAD)
    unexpected = [k for k in state.keys() if k not in allowed]
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} unexpected tensor(s) that a T5 with this config does "
            f"not have: {names_shown(unexpected)}; does {CONFIG_NAME} match these weights?")

    mismatched = [(s.hf_key, _shape(state, lookup[s.hf_key]), s.hf_shape) for s in specs]
    mismatched = [m for m in mismatched if m[1] != m[2]]
    if mismatched:
        shown = "; ".join(f"{key} has shape {found}, expected {want}"
                          for key, found, want in mismatched[:3])
        more = f"; and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        raise CheckpointError(f"{_where(state, lookup[mismatched[0][0]], source)}: tensor shape "
                              f"does not match {CONFIG_NAME}: {shown}{more}")

    param_dtype = np.dtype(cfg.dtype.param)
    shardings = flatten_paths(base_shardings(cfg, mesh)) if mesh is not None else None

    def value(s: TensorSpec) -> np.ndarray:
        x = np.asarray(state[lookup[s.hf_key]])
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise CheckpointError(f"{_where(state, lookup[s.hf_key], source)}: tensor {s.hf_key} "
                                  f"has dtype {x.dtype}, expected a floating-point type")
        # Cast on the host (exact for widening, round-to-nearest-even for narrowing) so that one
        # tensor at a time, not the whole float32 model, passes through memory.
        return np.ascontiguousarray((x.T if s.transpose else x).astype(param_dtype, copy=False))

    params: Params = {}
    for s in progress_bar(specs, "reading tensors", "tensor", progress):
        put_path(params, s.path, jnp.asarray(value(s)) if shardings is None else
             read_into(s.param_shape, shardings[s.path], functools.partial(value, s)))
    return params


def base_shardings(cfg: T5Config, mesh: Mesh) -> Params:
    """The ``NamedSharding`` of every T5 parameter on ``mesh`` (``family.param_shardings``)."""
    return param_shardings({s.path: s.param_shape for s in tensor_specs(cfg)},
                           param_logical_axes(cfg), cfg.dtype.param, mesh)


def validate_params(cfg: T5Config, params: Params, *, source: str = "params") -> None:
    """Checks that ``params`` has exactly the names and shapes a T5 with ``cfg`` needs.

    Raises:
      CheckpointError: naming ``source`` and the first missing, unexpected or misshapen entries.
    """
    check_param_tree({s.path: s.param_shape for s in tensor_specs(cfg)}, params, source=source)


def params_to_hf_state_dict(cfg: T5Config, params: Params, *,
                            progress: bool = False) -> dict[str, np.ndarray]:
    """Maps our params pytree onto the Hugging Face T5 state dict that transformers writes.

    The key set is what ``T5ForConditionalGeneration.save_pretrained`` (transformers 5) writes:
    ``shared.weight``, every block, the final norms, and ``lm_head.weight`` when untied; no
    ``encoder/decoder.embed_tokens.weight``. One addition: a tied model without output scaling
    also gets ``lm_head.weight`` (equal to ``shared.weight``), because transformers 4 ties and
    scales from one flag and can only load that model untied (see ``save_hf_t5``).

    Args:
      cfg: the model's config.
      params: our params pytree (see ``tensor_specs``); arrays keep their dtype.
      progress: draw a tqdm bar over the tensors.

    Returns:
      Tensor name -> C-contiguous NumPy array (bfloat16 as ``ml_dtypes.bfloat16``).

    Raises:
      CheckpointError: ``params`` does not fit ``cfg``.
    """
    validate_params(cfg, params)
    flat = flatten_paths(params)
    state = {}
    for s in progress_bar(tensor_specs(cfg), "converting tensors", "tensor", progress):
        value = np.asarray(flat[s.path])
        state[s.hf_key] = np.ascontiguousarray(value.T if s.transpose else value)
    if cfg.tie_word_embeddings and not cfg.scale_decoder_outputs:
        state[_LM_HEAD] = state[_SHARED].copy()
    return state


# --- loading and saving (folders: goose_jax.models.hf_folder) ------------------------------------


def read_hf_config(path: str | os.PathLike) -> T5Config:
    """Reads ``config.json`` from a checkpoint directory (tying still as the file states it).

    Raises:
      CheckpointError: the file is missing, not JSON, or not a T5 config.
    """
    d, config_path = read_config_json(path)
    try:
        return T5Config.from_hf_dict(d, source=config_path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load_hf_t5(path: str | os.PathLike, *, dtype: DTypePolicy | None = None,
               mesh: Mesh | None = None) -> tuple[T5Config, Params]:
    """Loads a local Hugging Face T5 checkpoint directory.

    Args:
      path: a directory with ``config.json`` and weights (see ``read_hf_state``), or a Hugging
        Face cache entry ``models--org--name`` (its ``refs/main`` snapshot is used).
      dtype: dtype policy of the returned config; parameters are cast to ``dtype.param``.
        Default: float32 parameters and compute, whatever the file stores.
      mesh: read each tensor straight into its layout on this mesh (``base_shardings``).

    Returns:
      (cfg, params): ``cfg.tie_word_embeddings`` is decided from the weights (see module doc);
      params is a nested dict of jax arrays, e.g. ``shared/embedding`` (V, D),
      ``encoder/block_0/self_attn/q/kernel`` (D, H*K), ``lm_head/kernel`` (D, V) when untied.

    Raises:
      CheckpointError: naming the file and the problem, for any bad input.
    """
    cfg = read_hf_config(path)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    state, source = read_hf_state(path)
    cfg = cfg.replace(tie_word_embeddings=infer_tie_word_embeddings(state))
    params = hf_state_dict_to_params(cfg, state, source=source, progress=progress_enabled(),
                                     mesh=mesh)
    return cfg, params


def check_hf_folder(path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Fails before any work unless ``save_hf_t5`` may write ``path`` (see
    ``check_model_folder``)."""
    check_model_folder(path, WEIGHT_FILES, overwrite=overwrite)


def save_hf_t5(cfg: T5Config, params: Params, path: str | os.PathLike, *,
               overwrite: bool = False) -> list[str]:
    """Writes a Hugging Face T5 checkpoint directory: ``config.json`` + ``model.safetensors``.

    transformers 4 and 5 both load the result as this model. ``config.json`` is
    ``cfg.to_hf_dict()``, whose ``tie_word_embeddings`` equals ``scale_decoder_outputs`` because
    transformers 4 derives both tying and output scaling from that one flag (transformers 5 reads
    ``scale_decoder_outputs`` and unties whenever ``lm_head.weight`` differs from the embedding).
    Consequences: a tied model without scaling is written with an explicit ``lm_head.weight``
    equal to the embedding (it loads tied in transformers 5, untied-but-equal in 4); an untied
    model *with* scaling cannot be expressed for transformers 4 (it loads correctly in 5).

    Args:
      cfg: the model's config.
      params: our params pytree; tensors are written in their own dtype.
      path: output directory, created if needed (see ``write_model_folder``: crash-safe).
      overwrite: replace a model the directory already holds (its other weight files, sharded
        or pickled, are removed); without it such a directory is refused.

    Returns:
      The paths written.

    Raises:
      CheckpointError: ``params`` does not fit ``cfg``, or ``path`` cannot take the model (see
        ``check_model_folder``).
    """
    check_hf_folder(path, overwrite=overwrite)
    # HF checkpoints are per layer: a scanned model's stacked blocks are unstacked first.
    state = params_to_hf_state_dict(per_layer(cfg), unstack_layers(params),
                                    progress=progress_enabled())
    text = json.dumps(cfg.to_hf_dict(), indent=2, sort_keys=True) + "\n"
    return write_model_folder(path, SAFE_WEIGHTS_NAME, state, CONFIG_NAME, text,
                              superseded=(*WEIGHT_FILES, *SHARD_PATTERNS))
