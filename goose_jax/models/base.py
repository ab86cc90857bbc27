"""The one way every tool reads the frozen base model and its tokenizer.

A base is named by one string, the ``--base`` of every tool:

- a local Hugging Face directory (or a ``models--org--name`` cache entry) of a T5, or of a
  decoder-only Llama, Qwen2 or Mistral model (its ``config.json``'s ``model_type`` decides),
- a goose-jax (Orbax) model checkpoint written by ``models.checkpoint.save_model`` or goose-convert,
- ``random:PRESET``: a seeded random model of a ``T5Config.preset`` size, or, for a name that is
  not a T5 preset, of a ``DecoderConfig.preset`` size (``random:llama-tiny``,
  ``random:qwen2-0.5b``), for smoke runs.

Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from goose_jax.core import checkpoint as core_checkpoint
from goose_jax.core.errors import CheckpointError, ConfigError
from goose_jax.core.sharding import put_global
from goose_jax.data.tokenizers import ByteTokenizer, load_hf_tokenizer
from goose_jax.models import checkpoint, families
from goose_jax.models.config import DTypePolicy
from goose_jax.models.hf_folder import read_config_json

if TYPE_CHECKING:
    from jax.sharding import Mesh

RANDOM = "random:"


def check_base(spec: str) -> None:
    """Cheap checks of a base spec, without reading the model: not empty, and ``random:...`` or a
    local directory.

    Raises:
      CheckpointError: one line naming the spec and what a base can be.
    """
    if not spec:
        raise CheckpointError("no base model: pass --base DIR (a Hugging Face T5 directory, a "
                              "goose-jax model checkpoint or random:PRESET)")
    if not spec.startswith(RANDOM) and not os.path.isdir(spec):
        raise CheckpointError(f"{spec}: --base is not a local directory (a Hugging Face T5 or "
                              "goose-jax checkpoint; nothing is downloaded) nor random:PRESET")


def load_base(spec: str, *, dtype: str | None = None, seed: int = 0, min_vocab_size: int = 0,
              mesh: Mesh | None = None) -> tuple[families.ModelConfig, dict]:
    """(cfg, params) of the base model ``spec`` (see the module doc).

    With ``mesh`` the parameters come back as global arrays laid out by the one rules table
    (``models.families.base_shardings``), each process holding only its devices' slices: a Hugging
    Face directory is read one tensor at a time straight into that layout; a goose-jax
    checkpoint is restored by Orbax with those target shardings (each process reads only its
    chunks); a ``random:`` base is drawn on the host, then placed.

    Args:
      spec: a directory or ``random:PRESET``.
      dtype: ``float32`` or ``bfloat16``: parameter and compute dtype of a Hugging Face
        directory (default: float32). A goose-jax checkpoint keeps the dtypes it was saved with.
      seed: the seed of a ``random:`` base.
      min_vocab_size: a ``random:`` base's vocabulary is grown to at least this (so that a
        tokenizer's ids fit).
      mesh: lay the parameters out on this (data, model, expert) mesh; it may span processes.

    Raises:
      CheckpointError: an empty spec, a path that is not a local directory, an unknown preset, or
        any unreadable file (naming the file).
    """
    check_base(spec)
    policy = DTypePolicy(dtype, dtype) if dtype else None
    if spec.startswith(RANDOM):
        cfg = random_config(spec)
        cfg = cfg.replace(vocab_size=max(cfg.vocab_size, min_vocab_size))
        params = families.init_params(cfg, seed)
        if mesh is not None:
            params = put_global(params, families.base_shardings(cfg, mesh))
        return cfg, params
    if core_checkpoint.is_checkpoint(spec):
        shardings = None if mesh is None else _checkpoint_shardings(spec, mesh)
        return checkpoint.load_model(spec, shardings=shardings)
    return load_hf_model(spec, dtype=policy, mesh=mesh)


def load_hf_model(path: str, *, dtype: DTypePolicy | None = None, mesh: Mesh | None = None
                  ) -> tuple[families.ModelConfig, dict]:
    """(cfg, params) of a local Hugging Face directory: a Llama, Qwen2 or Mistral model when its
    ``config.json``'s ``model_type`` says so, else a T5 (whose loader says what is wrong with a
    directory that is neither).

    Args:
      path: the directory (or a ``models--org--name`` cache entry).
      dtype: the dtype policy of the returned config; parameters are cast to its param dtype.
        Default: float32.
      mesh: lay the parameters out on this mesh (see ``load_base``).

    Raises:
      CheckpointError: any unreadable or inconsistent file, naming it.
    """
    return _hf_family(path).load_hf(path, dtype=dtype, mesh=mesh)


def random_config(spec: str) -> families.ModelConfig:
    """The config of a ``random:PRESET`` base: the first registered family's preset of that name
    (a T5 size), else another family's (``llama-tiny``, ``llama-3-8b``, ...)."""
    name = spec[len(RANDOM):]
    first, *others = families.REGISTRY
    try:
        return first.preset(name)
    except ValueError as first_error:
        for fam in others:
            try:
                return fam.preset(name)
            except ValueError:
                continue
        raise CheckpointError(f"base {spec!r}: {first_error}; nor is it a decoder-only preset "
                              "(llama-tiny, llama-3-8b, ...)") from None


def _hf_family(spec: str):
    """The family of a Hugging Face directory (by its config.json's ``model_type``); the first
    registered (the T5) when it has no readable config (whose loader then says why)."""
    try:
        d, source = read_config_json(spec)
    except CheckpointError:  # the T5 loader reports it, in one line
        return families.REGISTRY[0]
    if not isinstance(d, dict):
        return families.REGISTRY[0]
    try:
        return families.for_hf_dict(d, source=source)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _checkpoint_shardings(spec: str, mesh: Mesh):
    """The target shardings of a goose-jax model checkpoint's params on ``mesh``, from the
    architecture its metadata records; None when that is unreadable (``load_model`` then says
    what is wrong with it)."""
    try:
        cfg = checkpoint.read_model_config(spec)
    except CheckpointError:
        return None
    return families.base_shardings(cfg, mesh)


def load_tokenizer(spec: str | None, cfg: families.ModelConfig | None = None, *,
                   byte: bool = False):
    """The tokenizer of a base: the byte-level one, or the Hugging Face tokenizer in ``spec``.

    Padding follows one rule: batches are padded with the tokenizer's pad id and the model's
    losses and generation treat its ``pad_token_id`` as padding, so the two must be one id. A
    tokenizer without a padding token (most Llama-family tokenizers) pads with the model's
    ``pad_token_id``; one with its own must agree with the model's, else it is refused.

    Args:
      spec: the directory holding the tokenizer files (usually the base's).
      cfg: the base's config (T5 or decoder-only); when given, its ``pad_token_id`` pads for a
        tokenizer without a padding token, and must equal the padding token of one with.
      byte: the byte-level tokenizer (needs no files).

    Raises:
      CheckpointError: no tokenizer files, a tokenizer without EOS, without a padding token
        and no ``cfg``, or a pad id that differs from the model's.
    """
    if byte:
        return ByteTokenizer()
    if not spec or spec.startswith(RANDOM):
        raise CheckpointError(f"base {spec!r} has no tokenizer: use the byte-level tokenizer")
    tok = load_hf_tokenizer(spec, pad_id=None if cfg is None else cfg.pad_token_id)
    if cfg is not None and tok.pad_id != cfg.pad_token_id:
        raise CheckpointError(f"{spec}: tokenizer pad id {tok.pad_id} differs from the model's "
                              f"pad_token_id {cfg.pad_token_id}; make them one id (pad_token in "
                              "tokenizer_config.json, or pad_token_id in config.json)")
    return tok
