"""The model-family contract: everything that differs between two families, asked of one object.

A family (the T5, the Llama family, ...) is one sub-package of ``goose_jax.models`` that defines
one ``ModelFamily`` subclass; ``goose_jax.models.families`` registers one instance of each. Every
package above ``models`` (experts, the library, routing, evaluation, training, interop, the
pipeline) asks the registry for the family of a config (``models.families.of``) and calls it:
none of them tests a config's type.

What a family answers:

- **architecture**: its config type and the family names it reads, the site names and shapes,
  random init, the logical axes and shapes of every base parameter, how its config is recorded;
- **Hugging Face**: reading and writing a checkpoint folder, and which PyTorch module each site
  is (the PEFT module table);
- **text**: how a tokenizer's special tokens enter its config and its training batches;
- **compute**: the training loss, rank-classification choice scores, greedy generation, and a
  forward pass whose sites see per-token masks (average activations);
- **layout**: whether it runs a scanned, rematerialised layer stack.

Shapes follow the package legend (the ``goose_jax`` module docstring).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from goose_jax.core import sharding
from goose_jax.core.errors import CheckpointError
from goose_jax.models.hf_folder import names_shown
from goose_jax.models.scan import stack_layers

Array = jax.Array
Params = dict[str, Any]


def flatten_paths(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """A nested dict's leaves by key path: ``{("encoder", "block_0", ...): leaf}``."""
    if isinstance(tree, Mapping):
        flat = {}
        for key, value in tree.items():
            flat.update(flatten_paths(value, (*prefix, str(key))))
        return flat
    return {prefix: tree}


def put_path(tree: Params, path: tuple[str, ...], leaf: Any) -> None:
    """Sets ``leaf`` at key path ``path`` of a nested dict, making the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = leaf


def param_shardings(shapes: Mapping[tuple[str, ...], tuple[int, ...]], axes: Params, dtype,
                    mesh: Mesh) -> Params:
    """The ``NamedSharding`` of every parameter of ``shapes`` (key path -> shape) on ``mesh``,
    from its logical ``axes`` (a tree like the params) and the one rules table."""
    abstract: Params = {}
    for path, shape in shapes.items():
        put_path(abstract, path, jax.ShapeDtypeStruct(shape, np.dtype(dtype)))
    return sharding.param_shardings(abstract, axes, mesh)


def check_param_tree(expected: Mapping[tuple[str, ...], tuple[int, ...]], params: Params, *,
                     source: str = "params") -> None:
    """Checks that ``params`` has exactly the leaves of ``expected`` (key path -> shape), of
    those shapes: the params check of every model family (``ModelFamily.validate_params``).

    Raises:
      CheckpointError: naming ``source`` and the first missing, unexpected or misshapen entries.
    """
    flat = flatten_paths(params)
    missing = ["/".join(p) for p in expected if p not in flat]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} parameter(s) missing for this config: "
                              f"{names_shown(missing)}")
    unexpected = ["/".join(p) for p in flat if p not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected parameter(s) for this "
                              f"config: {names_shown(unexpected)}")
    for path, want in expected.items():
        shape = tuple(np.shape(flat[path]))
        if shape != tuple(want):
            raise CheckpointError(f"{source}: parameter {'/'.join(path)} has shape {shape}, "
                                  f"expected {tuple(want)} from the config")


@dataclasses.dataclass(frozen=True)
class Site:
    """A linear layer of a Hugging Face model that is a goose-jax site: the site's name and
    (d_in, d_out)."""

    name: str
    d_in: int
    d_out: int


class ModelFamily(abc.ABC):
    """One model family. Subclasses set the class attributes and implement every method."""

    #: The family names this object answers for (``"t5"``; ``"llama"``, ``"qwen2"``, ...).
    names: tuple[str, ...] = ()
    #: The frozen config dataclass of the family.
    config_type: type = object
    #: Whether the model is one decoder reading prompt and answer as one sequence.
    decoder_only: bool = False
    #: ``config.json`` ``model_type`` values the family reads.
    hf_model_types: tuple[str, ...] = ()
    #: A regular expression full-matching every site name of the family.
    sites_pattern: str = ""
    #: Whether the layer stack can run scanned (``scan_layers``), and rematerialised (``remat``).
    scans: bool = False
    remats: bool = False
    #: PEFT: the HF modules that are never sites, the default targets and the PEFT task type.
    peft_no_site: tuple[str, ...] = ()
    peft_default_targets: tuple[str, ...] = ()
    peft_task_type: str = ""

    # --- architecture ----------------------------------------------------------------------

    def name_of(self, cfg: Any) -> str:
        """The family name of ``cfg`` (one of ``names``)."""
        return self.names[0]

    def describe(self, name: str) -> str:
        """The family for messages (``"T5"``, ``"decoder-only (llama)"``)."""
        return name

    @abc.abstractmethod
    def preset(self, name: str) -> Any:
        """The config of a named size (``random:NAME`` bases); ValueError for an unknown one."""

    @abc.abstractmethod
    def config_from_hf_dict(self, d: Mapping[str, Any], *, source: str) -> Any:
        """The config of a Hugging Face ``config.json`` dict of this family."""

    @abc.abstractmethod
    def site_shapes(self, cfg: Any) -> dict[str, tuple[int, int]]:
        """Every adapter site, ``{name: (I, O)}``, from the config alone."""

    @abc.abstractmethod
    def init_params(self, cfg: Any, seed: int = 0) -> Params:
        """Random base parameters."""

    @abc.abstractmethod
    def param_logical_axes(self, cfg: Any) -> Params:
        """The logical axis names of every base parameter, a tree like the params."""

    @abc.abstractmethod
    def param_shapes(self, cfg: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
        """Every base parameter's key path and shape: what ``validate_params`` checks."""

    @abc.abstractmethod
    def summary(self, cfg: Any) -> str:
        """The family and depth for one-line model descriptions (``"12+12 layers"``)."""

    def validate_params(self, cfg: Any, params: Params, *, source: str = "params") -> None:
        """Checks that ``params`` has exactly the names and shapes ``cfg``'s model needs.

        Raises:
          CheckpointError: naming ``source`` and the first missing, unexpected or misshapen
            entries.
        """
        check_param_tree(self.param_shapes(cfg), params, source=source)

    def base_shardings(self, cfg: Any, mesh: Mesh) -> Params:
        """The ``NamedSharding`` of every base parameter on ``mesh``: the parameters' logical
        axes mapped by the one rules table (``core.sharding.param_shardings``), from shapes alone;
        a tree like the params."""
        return param_shardings(self.param_shapes(cfg), self.param_logical_axes(cfg),
                               cfg.dtype.param, mesh)

    # --- Hugging Face ----------------------------------------------------------------------

    @abc.abstractmethod
    def load_hf(self, path: str, *, dtype=None, mesh: Mesh | None = None) -> tuple[Any, Params]:
        """``(cfg, params)`` of a local Hugging Face checkpoint folder of this family, the
        parameters cast to ``dtype.param`` and, with ``mesh``, laid out on it
        (``base_shardings``)."""

    @abc.abstractmethod
    def save_hf(self, cfg: Any, params: Params, path: str, *,
                overwrite: bool = False) -> list[str]:
        """Writes ``params`` as a Hugging Face checkpoint folder transformers loads; returns the
        files written."""

    @abc.abstractmethod
    def peft_sites(self, cfg: Any) -> dict[str, Site]:
        """The Hugging Face module name (``encoder.block.0.layer.0.SelfAttention.q``) of every
        linear layer that is a site, in model order: what PEFT adapters name."""

    def label(self, name: str) -> str:
        """The family as its users name it (``"T5"``, ``"Llama"``)."""
        return name

    # --- text ------------------------------------------------------------------------------

    def with_tokenizer(self, cfg: Any, tokenizer: Any) -> Any:
        """The config training and scoring run with once the tokenizer is known (special token
        ids the tokenizer decides); the config itself by default."""
        return cfg

    def batch_encoding(self, cfg: Any, tokenizer: Any) -> dict[str, Any]:
        """How training batches encode inputs (``data.batching.Batcher`` keyword arguments)."""
        return {}

    def eval_prefix(self, cfg: Any, tokenizer: Any) -> list[int]:
        """Token ids every evaluated prompt starts with."""
        return []

    def encode_prompt(self, tokenizer: Any, text: str, max_length: int,
                      prefix: list[int]) -> list[int]:
        """An evaluated input's token ids, at most ``max_length`` (with ``prefix``)."""
        ids = tokenizer.encode(text, add_eos=True)
        return ids if len(ids) <= max_length else ids[:max_length - 1] + [tokenizer.eos_id]

    # --- compute ---------------------------------------------------------------------------

    def training_layout(self, cfg: Any, variables: dict, remat: str) -> tuple[Any, dict]:
        """The config and variables a training step runs: ``remat`` applied, and the trees
        stacked along the layers when the model scans them."""
        model = cfg if remat == "none" else cfg.replace(remat=remat)
        if getattr(model, "scan_layers", False):
            variables = stack_layers(variables, model)
        return model, variables

    @abc.abstractmethod
    def token_nll(self, cfg: Any, variables: dict, batch: dict, adapter=None, *,
                  remat: str = "none") -> tuple[Array, Array]:
        """Training loss: summed target-token cross-entropy and the number of target tokens of a
        batch (``inputs`` (B, L), ``input_mask`` (B, L), ``targets`` (B, T))."""

    @abc.abstractmethod
    def choice_scorer(self, fast_compile: bool) -> Callable:
        """Rank classification: ``score(cfg, adapter, enc_vars, dec_vars, ids_BL, mask_BL,
        tgt_BCT, tmask_BCT, *, naive, sites) -> (nll_BC, counts)``, jitted."""

    def eval_config(self, cfg: Any, tokenizer: Any) -> Any:
        """The config greedy generation runs with in evaluation (where it stops)."""
        return cfg

    @abc.abstractmethod
    def generate(self, cfg: Any, params: Params, ids_BL, max_new_tokens: int, mask_BL, *,
                 adapter=None, collections: dict | None = None, fast_compile: bool = False,
                 telemetry: bool = False, check_finite: bool = False, mesh: Mesh | None = None):
        """Greedy generation, as the family's ``generate_*_greedy`` returns it."""

    @abc.abstractmethod
    def masked_forward(self, cfg: Any, adapter, sites, collection: str
                       ) -> tuple[Callable, tuple[str, ...]]:
        """``(forward(variables, *batch) -> (out, state), names of the batch's arrays)``: the
        model under ``adapter``, each of ``sites`` given, in collection ``collection``, the
        ``{"mask": ...}`` of the tokens it reads (``intermediates`` mutable)."""

    @abc.abstractmethod
    def activation_batch(self, cfg: Any, batch: dict, tokenizer: Any) -> tuple:
        """One training micro-batch (``inputs``, ``input_mask``, ``targets``, as NumPy arrays)
        as ``masked_forward``'s batch arrays, the tokens each site reads marked as training
        reads them."""
