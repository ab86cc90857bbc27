"""The one place goose-jax hands a local folder to transformers (or sentence-transformers), and
the rule that it never runs code a folder brings with it.

A Hugging Face folder can name its own Python classes: an ``auto_map`` in ``config.json`` or
``tokenizer_config.json`` points transformers at ``.py`` files beside the weights, which it
imports (after an interactive "run the custom code? [y/N]" prompt when ``trust_remote_code`` is
left unset; any answer on stdin counts). Every tool and API path that loads a tokenizer, config
or model from a folder goes through ``from_pretrained`` here, which refuses such a folder with one
line before transformers reads it, and passes ``trust_remote_code=False`` besides. Goose-jax's
own readers of ``config.json`` (``goose_jax.models.hf_folder.read_config_json``, the retrieval
embedder) refuse it too: a model whose architecture is custom code is not one goose-jax reads
correctly. A test greps the package for any other call.
"""

from __future__ import annotations

import os

from goose_jax.core.errors import CheckpointError
from goose_jax.core.tensorfile import read_json

# The files whose ``auto_map`` makes transformers (or sentence-transformers) import a folder's code.
CODE_NAMING_FILES = ("config.json", "tokenizer_config.json")


def check_no_custom_code(config: dict, path: str, *, error=CheckpointError) -> None:
    """Refuses a parsed ``config.json`` / ``tokenizer_config.json`` (read from ``path``) that
    names custom code with ``auto_map``."""
    if isinstance(config, dict) and "auto_map" in config:
        shown = config["auto_map"]
        shown = ", ".join(map(str, shown)) if isinstance(shown, dict | list) else repr(shown)
        raise error(f"{path}: names custom code (auto_map: {shown[:80]}); goose-jax never runs "
                    "code from a checkpoint: use a folder without auto_map (the tokenizer and "
                    "config of a model transformers knows)")


def refuse_custom_code(folder: str | os.PathLike, *, error=CheckpointError) -> str:
    """The absolute ``folder``, after refusing one whose ``config.json`` or
    ``tokenizer_config.json`` has an ``auto_map`` (or cannot be read as JSON)."""
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    for name in CODE_NAMING_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            check_no_custom_code(read_json(path, error=error), path, error=error)
    modules = os.path.join(folder, "modules.json")  # sentence-transformers' module list
    if os.path.isfile(modules):
        listed = read_json(modules, error=error)
        kinds = [m.get("type") for m in listed if isinstance(m, dict)] if isinstance(
            listed, list) else [None]
        foreign = [k for k in kinds if not str(k).startswith("sentence_transformers.")]
        if foreign:
            raise error(f"{modules}: names a module outside sentence-transformers "
                        f"({foreign[0]!r}); goose-jax never runs code from a checkpoint")
    return folder


def from_pretrained(class_name: str, folder: str | os.PathLike, **kwargs):
    """``transformers.<class_name>.from_pretrained(folder)`` (``"AutoTokenizer"``,
    ``"AutoConfig"``, a model class...) from the local folder only, never running its code.

    Raises:
      CheckpointError: the folder names custom code (see ``refuse_custom_code``).
      ImportError: transformers is not installed.
    """
    import transformers

    folder = refuse_custom_code(folder)
    return getattr(transformers, class_name).from_pretrained(
        folder, local_files_only=True, trust_remote_code=False, **kwargs)


def auto_tokenizer(folder: str | os.PathLike):
    """``transformers.AutoTokenizer`` of a local folder, never running its code."""
    return from_pretrained("AutoTokenizer", folder)


def sentence_transformer(folder: str | os.PathLike, **kwargs):
    """A ``sentence_transformers.SentenceTransformer`` of a local folder, never running the
    folder's code (for comparisons against the JAX embedder)."""
    from sentence_transformers import SentenceTransformer

    folder = refuse_custom_code(folder)
    return SentenceTransformer(folder, local_files_only=True, trust_remote_code=False, **kwargs)
