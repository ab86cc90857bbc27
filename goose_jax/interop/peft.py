"""Hugging Face PEFT LoRA adapters for T5 <-> goose-jax experts.

A PEFT adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``, a torch pickle). For each adapted ``nn.Linear`` named ``<module>`` (the
module names of ``T5ForConditionalGeneration``, e.g. ``encoder.block.0.layer.0.SelfAttention.q``)
it holds ``base_model.model.<module>.lora_A.weight`` (r, d_in) and ``...lora_B.weight``
(d_out, r), and the layer computes ``W x + B A x * s`` with ``s = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA; ``rank_pattern`` / ``alpha_pattern`` override r and alpha
per module (regular expressions matched, as PEFT does, against the end of the module name).
goose-jax stores the same expert as ``lora_a = A^T`` (D, R) and ``lora_b = B^T`` (R, O) at the
matching site (``encoder/block_0/self_attn/q``); ``goose_jax.interop.hf.tensor_specs`` is the one
name table.

Many adapters become one stacked library (leading expert axis E) with one rank R and one scale S:
  - rank: R is the largest rank found; a smaller rank r is zero-padded exactly (A gets R - r zero
    columns, B gets R - r zero rows), so ``(x A) B`` is unchanged;
  - scale: S is the scale shared by the most (adapter, site) pairs (or the one asked for); where
    an adapter's scale s differs, ``s / S`` is folded into its B. That is exact in real
    arithmetic and costs one float32 rounding of B (none when ``s / S`` is a power of two); the
    pairs that already have scale S are stored bit for bit;
  - coverage: a site an adapter does not target gets zero A and B (exactly no contribution);
    ``ImportedExperts.info[n]["covered_sites"]`` lists the sites expert n really has.

Loading never executes pickled code: safetensors are read by a small header parser, torch files
only with ``torch.load(weights_only=True)`` (torch imported only then), and any other pickle is
refused with ``UnsafeCheckpointError``. ``fan_in_fan_out`` changes nothing for T5: its layers are
``nn.Linear``, for which PEFT itself resets the flag, and the stored A / B shapes are the same.

Legend: E experts, D d_in of a site, O d_out, R (common) LoRA rank, r one adapter's rank.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from goose_jax.config import T5Config
from goose_jax.errors import AdapterError, UnsafeCheckpointError
from goose_jax.experts import DEFAULT_SITES, LoRAConfig, nest_sites, peft_scale
from goose_jax.interop.hf import (
    _one_line,
    progress_enabled,
    resolve_hf_dir,
    tensor_specs,
    torch_to_numpy,
)

ADAPTER_CONFIG = "adapter_config.json"
SAFE_WEIGHTS = "adapter_model.safetensors"
TORCH_WEIGHTS = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
# PEFT's default targets for T5 when a config gives none.
T5_DEFAULT_TARGETS = ("q", "v")

# Options that add weights or change the layer's function in ways a LoRA site cannot hold.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA bias terms",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}
_SHOWN = 4


def _show(items: Iterable[str]) -> str:
    items = list(items)
    text = ", ".join(repr(x) for x in items[:_SHOWN])
    return text + (f" (and {len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def progress_bar(items, desc: str, unit: str, enabled: bool | None = None):
    """``items`` wrapped in a tqdm bar when drawing one makes sense (a terminal, not quiet)."""
    if enabled is None:
        enabled = progress_enabled()
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False)


# --- the T5 module table ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Site:
    """A T5 linear layer that has a goose-jax site: its site name and (d_in, d_out)."""

    name: str
    d_in: int
    d_out: int


def linear_sites(cfg: T5Config) -> dict[str, Site]:
    """HF module name -> ``Site`` for every T5 linear layer with a site, in model order."""
    out = {}
    for spec in tensor_specs(cfg):
        if spec.transpose and spec.path[0] in ("encoder", "decoder"):
            d_in, d_out = spec.param_shape
            out[spec.hf_key.removesuffix(".weight")] = Site("/".join(spec.path[:-1]), d_in, d_out)
    return out


# Modules of ``T5ForConditionalGeneration`` a LoRA could target that have no site.
NO_SITE_MODULES = ("shared", "encoder.embed_tokens", "decoder.embed_tokens",
                   "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
                   "decoder.block.0.layer.0.SelfAttention.relative_attention_bias", "lm_head")


# --- reading tensors without executing code -----------------------------------------------------

_SAFE_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "BOOL": "bool"}


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only NumPy view (bfloat16 via ml_dtypes).

    The file is memory-mapped; nothing is copied until a tensor is used.

    Raises:
      AdapterError: the file is truncated or its header is not valid safetensors.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        start = 8 + n
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if size > start else \
            np.zeros(0, np.uint8)
        out = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            dtype = _np_dtype(_SAFE_DTYPES[entry["dtype"]])
            shape = tuple(int(s) for s in entry["shape"])
            lo, hi = (int(v) for v in entry["data_offsets"])
            if not 0 <= lo <= hi <= data.size or hi - lo != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {key!r}: data offsets {lo}..{hi} do not fit its "
                                 f"shape {shape} and dtype {entry['dtype']}")
            out[key] = data[lo:hi].view(dtype).reshape(shape)
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                           f"{type(e).__name__}: {_one_line(e)}") from None


def read_torch_weights(path: str) -> dict[str, np.ndarray]:
    """A torch state dict read with ``weights_only=True``, as NumPy arrays (no copies).

    Raises:
      UnsafeCheckpointError: the pickle references code (a class or function) to run.
      AdapterError: torch is missing, the file is not a weights-only torch checkpoint, or it
        holds something other than a flat dict of tensors.
    """
    import pickle

    try:
        import torch
    except ImportError:
        raise AdapterError(f"{path}: reading a torch pickle needs torch, which is not installed; "
                           "convert the file to safetensors") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True,
                            mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        message = _one_line(e)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if found:
            raise UnsafeCheckpointError(
                f"{path}: refused: this pickle is not weights-only; loading it would import and "
                f"run {found.group(1)}. goose-jax never executes code from a checkpoint: re-save "
                "the tensors as safetensors (or with torch.save of a plain state dict)") from None
        raise AdapterError(f"{path}: refused: not a weights-only torch checkpoint (a pickle "
                           "torch cannot read without executing code, or a corrupt file); "
                           "goose-jax reads safetensors or torch.load(weights_only=True) files "
                           "only") from None
    except Exception as e:  # torch raises RuntimeError / EOFError / zip errors for bad files
        raise AdapterError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                           f"{type(e).__name__}: {_one_line(e)}") from None
    if not isinstance(loaded, Mapping):
        raise AdapterError(f"{path}: expected a state dict (name -> tensor), found "
                           f"{type(loaded).__name__}")
    out = {}
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise AdapterError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = torch_to_numpy(value)
    return out


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """A weights file by its contents: safetensors, else a weights-only torch pickle."""
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors starts with a little-endian header length followed by '{'.
    if len(head) == 9 and head[8:9] == b"{":
        return read_safetensors(path)
    return read_torch_weights(path)


# --- PEFT's module matching, as PEFT does it ------------------------------------------------------


def _layer_index(name: str, layers_pattern) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m:
                break
    return int(m.group("idx")) if m else None


def is_targeted(config: Mapping[str, Any], name: str, site_names: Iterable[str] = ()) -> bool:
    """Whether PEFT's ``LoraConfig`` in ``config`` puts a LoRA on module ``name``.

    ``target_modules`` as a string is a regular expression full-matched against the module name
    (``"all-linear"``: every linear layer but the output head, i.e. ``site_names``); as a list,
    a module is targeted when its name equals an entry or ends with ``"." + entry``, then
    filtered by ``layers_to_transform`` / ``layers_pattern``. ``exclude_modules`` wins.
    """
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    targets = config.get("target_modules")
    if targets is None:
        targets = list(T5_DEFAULT_TARGETS)
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return name in set(site_names)
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(name, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def pattern_value(patterns: Mapping[str, Any] | None, name: str, default):
    """The value of the first ``rank_pattern`` / ``alpha_pattern`` key matching ``name``'s end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# --- one adapter ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SiteLoRA:
    """One expert at one site, goose-jax orientation: ``y += (x @ lora_a) @ lora_b * scale``.

    Attributes:
      lora_a: (D, r) float32.
      lora_b: (r, O) float32.
      scale: the adapter's own scale at this site.
    """

    lora_a: np.ndarray
    lora_b: np.ndarray
    scale: float


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
    """A PEFT LoRA adapter read from disk and mapped onto a T5's sites.

    Attributes:
      path: the adapter directory.
      config: ``adapter_config.json`` as a dict.
      weights_file: the file the tensors came from.
      sites: site name -> ``SiteLoRA``, in model order (only the sites the adapter targets).
    """

    path: str
    config: dict
    weights_file: str
    sites: dict[str, SiteLoRA]

    @property
    def name(self) -> str:
        return default_expert_name(self.path)


def default_expert_name(path: str) -> str:
    """A library name for an adapter directory: its base name (the model name for a Hugging
    Face cache entry ``models--org--name``), with characters a library refuses replaced."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    base = parts[-1]
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            base = part.split("--")[-1]
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", base).lstrip("_.+-")
    return name[:128] or "adapter"


def _describe_origin(config: Mapping[str, Any]) -> str:
    return (f"base_model_name_or_path={config.get('base_model_name_or_path')!r}, "
            f"task_type={config.get('task_type')!r}")


def read_adapter_config(path: str) -> dict:
    """``adapter_config.json`` of an adapter directory, checked to be a LoRA PEFT uses plainly.

    Raises:
      AdapterError: missing or unreadable file, a PEFT type other than LoRA, or an option that
        a LoRA site cannot represent (DoRA, LoRA bias, modules_to_save, ...).
    """
    if not os.path.isdir(path):
        raise AdapterError(f"{path}: adapter directory does not exist (goose-jax reads local "
                           "directories only and never downloads)")
    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(file):
        raise AdapterError(f"{file}: missing; a PEFT adapter directory needs {ADAPTER_CONFIG}")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise AdapterError(f"{file}: cannot read as JSON: {_one_line(e)}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterError(f"{file}: not a PEFT adapter config (no 'peft_type')")
    peft_type = str(config["peft_type"])
    if peft_type.upper() != "LORA":
        raise AdapterError(f"{file}: peft_type: expected 'LORA', found {peft_type!r}; goose-jax "
                           "experts are LoRA adapters and cannot hold other adapter types")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{file}: {key}={config[key]!r}: {what} is not supported; "
                               "goose-jax experts are plain LoRA on linear layers")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{file}: r: expected a positive integer, found {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{file}: lora_alpha: expected a number, found {alpha!r}")
    return config


def _weights_file(path: str) -> str:
    for name in (SAFE_WEIGHTS, TORCH_WEIGHTS):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return file
    raise AdapterError(f"{path}: no adapter weights (looked for {SAFE_WEIGHTS}, {TORCH_WEIGHTS})")


def load_peft_adapter(path: str | os.PathLike, cfg: T5Config) -> PeftAdapter:
    """Reads a PEFT LoRA adapter directory and maps it onto the sites of a T5 with ``cfg``.

    Args:
      path: the adapter directory (or a Hugging Face cache entry ``models--org--name``).
      cfg: the base model's config; every adapted module must be one of its linear layers,
        with the same d_in / d_out.

    Returns:
      A ``PeftAdapter`` whose sites hold float32 ``lora_a`` (D, r), ``lora_b`` (r, O), scale.

    Raises:
      AdapterError: naming the file and the expected and found values, for an adapter of
        another architecture, for a base with other shapes, an adapter type other than LoRA,
        unsupported options, or config and weights that disagree.
      UnsafeCheckpointError: an ``adapter_model.bin`` that is not a weights-only pickle.
    """
    path = resolve_hf_dir(path) if os.path.isdir(path) else os.fspath(path)
    config = read_adapter_config(path)
    cfg_file = os.path.join(path, ADAPTER_CONFIG)
    file = _weights_file(path)
    tensors = read_tensors(file)
    sites = linear_sites(cfg)
    origin = _describe_origin(config)

    # The modules the config targets, among every module a LoRA could sit on.
    targeted = [m for m in (*sites, *NO_SITE_MODULES) if is_targeted(config, m, sites)]
    if not targeted:
        raise AdapterError(
            f"{cfg_file}: target_modules={config.get('target_modules')!r} match no module of "
            f"this T5 (an adapter for another architecture? {origin}); T5 modules look like "
            f"'encoder.block.0.layer.0.SelfAttention.q'")
    no_site = [m for m in targeted if m not in sites]
    if no_site:
        raise AdapterError(f"{cfg_file}: targets {_show(no_site)}, which are not attention or "
                           "feed-forward linear layers; goose-jax experts live only on those")

    # The tensors, grouped by module.
    factors: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        name = key.removeprefix(KEY_PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if m is None:
            raise AdapterError(f"{file}: tensor {key!r} is not a LoRA A / B weight of a linear "
                               "layer (DoRA magnitudes, biases, embeddings and saved modules "
                               "are not supported)")
        module, which = m.groups()
        if module not in sites:
            raise AdapterError(
                f"{file}: tensor {key!r}: module {module!r} is not a linear layer of this T5 "
                f"(an adapter for another architecture? {origin})")
        factors[module][which] = value
    extra = [m for m in factors if m not in targeted]
    if extra:
        raise AdapterError(f"{file}: has weights for {_show(extra)}, which {cfg_file} does not "
                           "target: config and weights disagree")
    missing = [m for m in targeted if m not in factors]
    if missing:
        raise AdapterError(f"{file}: no weights for {_show(missing)}, which {cfg_file} targets "
                           "(an incomplete adapter?)")

    use_rslora = bool(config.get("use_rslora", False))
    out: dict[str, SiteLoRA] = {}
    for module, site in sites.items():
        if module not in factors:
            continue
        pair = factors[module]
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{file}: module {module!r} has lora_{''.join(pair)} but not "
                               f"lora_{'B' if 'A' in pair else 'A'}")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != site.d_in or b.shape[0] != site.d_out \
                or b.shape[1] != a.shape[0]:
            raise AdapterError(
                f"{file}: module {module!r}: expected lora_A (r, {site.d_in}) and lora_B "
                f"({site.d_out}, r) for this base model, found {a.shape} and {b.shape} (an "
                f"adapter for a base model with other shapes? {origin})")
        for x in (a, b):
            if not (np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"):
                raise AdapterError(f"{file}: module {module!r}: dtype {x.dtype} is not "
                                   "floating point")
        rank = a.shape[0]
        want = pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
        if rank != want:
            raise AdapterError(f"{file}: module {module!r}: rank {rank}, but {cfg_file} says "
                               f"{want} (r / rank_pattern): config and weights disagree")
        alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        # Copies: the tensors may be read-only views of a memory-mapped file.
        out[site.name] = SiteLoRA(np.array(a, np.float32).T, np.array(b, np.float32).T,
                                  peft_scale(rank, float(alpha), use_rslora))
    return PeftAdapter(path, config, file, out)


# --- many experts into one stacked library ------------------------------------------------------


@dataclasses.dataclass
class ImportedExperts:
    """Experts stacked on a leading axis, ready for ``build_routed`` or an ``ExpertLibrary``.

    Attributes:
      experts: per site ``lora_a`` (E, D, R) and ``lora_b`` (E, R, O), float32 NumPy.
      gates: per site ``gate`` (E, D) float32, or None.
      names: the E expert names.
      scale: the one LoRA scale of every expert (see the module doc for how it is kept).
      rank: R.
      sites: the library's sites, ``{name: (d_in, d_out)}`` in model order.
      info: per expert, JSON facts: ``covered_sites`` (the sites it really has), ``source``, ...
      notes: remarks for a person (folded scales, ignored tensors).
    """

    experts: dict
    gates: dict | None
    names: list[str]
    scale: float
    rank: int
    sites: dict[str, tuple[int, int]]
    info: list[dict]
    notes: list[str] = dataclasses.field(default_factory=list)


def stack_experts(per_expert: Sequence[Mapping[str, SiteLoRA]],
                  shapes: Mapping[str, tuple[int, int]], *, rank: int | None = None,
                  scale: float | None = None) -> tuple[dict, int, float, list[int]]:
    """Stacks experts given per site onto one rank and one scale, exactly (module doc).

    Args:
      per_expert: for each expert, site -> ``SiteLoRA`` (sites it lacks get zeros).
      shapes: the stacked sites and their (d_in, d_out), in order.
      rank: R (default: the largest rank found); smaller ranks are zero-padded.
      scale: S (default: the scale shared by the most (expert, site) pairs).

    Returns:
      (experts tree, R, S, per expert the number of sites whose B absorbed ``s / S``).
    """
    found = [lora.lora_a.shape[1] for sites in per_expert for lora in sites.values()]
    if not found:
        raise AdapterError("nothing to import: no expert has a LoRA at any site")
    R = max(found) if rank is None else int(rank)
    if max(found) > R:
        raise AdapterError(f"an expert has rank {max(found)}, more than the library's rank {R}")
    if scale is None:
        counts = collections.Counter(lora.scale for sites in per_expert
                                     for lora in sites.values())
        scale = max(counts, key=counts.get)  # ties: the first scale seen
    S = float(scale)
    E = len(per_expert)
    tree, folded = {}, [0] * E
    for site, (d_in, d_out) in shapes.items():
        a = np.zeros((E, d_in, R), np.float32)
        b = np.zeros((E, R, d_out), np.float32)
        for n, sites in enumerate(per_expert):
            lora = sites.get(site)
            if lora is None:
                continue
            r = lora.lora_a.shape[1]
            a[n, :, :r] = lora.lora_a
            if lora.scale == S:
                b[n, :r] = lora.lora_b
            else:
                b[n, :r] = lora.lora_b.astype(np.float64) * (lora.scale / S)
                folded[n] += 1
        tree[site] = {"lora_a": a, "lora_b": b}
    return nest_sites(tree), R, S, folded


def union_sites(cfg: T5Config, per_expert: Iterable[Mapping[str, Any]]
                ) -> dict[str, tuple[int, int]]:
    """The sites any expert has, with their shapes, in model order."""
    used = set().union(*(set(sites) for sites in per_expert))
    return {s.name: (s.d_in, s.d_out) for s in linear_sites(cfg).values() if s.name in used}


def library_sites(cfg: T5Config, sites: Mapping | None,
                  per_expert: Sequence[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """The sites of the library to import into: ``sites`` (checked to hold every expert's
    sites), or by default the union of the experts' sites."""
    if sites is None:
        return union_sites(cfg, per_expert)
    out = {k: tuple(v) for k, v in sites.items()}
    for n, expert in enumerate(per_expert):
        outside = [s for s in expert if s not in out]
        if outside:
            raise AdapterError(f"expert {n} has LoRA at sites the library lacks: "
                               f"{_show(outside)}")
    return out


def import_peft(paths: Sequence[str | os.PathLike], cfg: T5Config, *,
                names: Sequence[str] | None = None, rank: int | None = None,
                scale: float | None = None, sites: Mapping[str, tuple[int, int]] | None = None,
                progress: bool | None = None) -> ImportedExperts:
    """Imports PEFT LoRA adapters (one expert each) into one stacked set of experts.

    Args:
      paths: adapter directories, in expert order.
      cfg: the base model's config.
      names: expert names (default: each directory's base name).
      rank: pad every expert to this rank (default: the largest rank found).
      scale: the library scale (default: the scale most (adapter, site) pairs have).
      sites: the library's sites (default: every site any adapter targets).
      progress: draw a progress bar (default: on a terminal).

    Returns:
      ``ImportedExperts`` with ``gates=None``; ``info[n]`` holds the adapter's PEFT settings
      and ``covered_sites``.

    Raises:
      AdapterError, UnsafeCheckpointError: see ``load_peft_adapter``; also for duplicate names.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise AdapterError("no adapter directories given")
    adapters = [load_peft_adapter(p, cfg)
                for p in progress_bar(paths, "reading adapters", "adapter", progress)]
    names = [a.name for a in adapters] if names is None else list(names)
    if len(names) != len(adapters):
        raise AdapterError(f"{len(names)} names for {len(adapters)} adapters")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AdapterError(f"duplicate expert names {_show(duplicates)}; pass names= (--names)")
    per_expert = [a.sites for a in adapters]
    shapes = library_sites(cfg, sites, per_expert)
    experts, R, S, folded = stack_experts(per_expert, shapes, rank=rank, scale=scale)
    info, notes = [], []
    for adapter, name, n_folded in zip(adapters, names, folded):
        c = adapter.config
        info.append({
            "source": "peft", "adapter": os.path.basename(os.path.normpath(adapter.path)),
            "base_model_name_or_path": c.get("base_model_name_or_path"),
            "peft": {k: c.get(k) for k in ("r", "lora_alpha", "use_rslora", "rank_pattern",
                                           "alpha_pattern", "target_modules")},
            "covered_sites": list(adapter.sites),
        })
        ranks = {lora.lora_a.shape[1] for lora in adapter.sites.values()}
        if ranks != {R}:
            notes.append(f"{name}: rank {_ranks(ranks)} zero-padded to {R}")
        if n_folded:
            notes.append(f"{name}: scale folded into B at {n_folded} site(s) "
                         f"(library scale {S:g})")
        if len(adapter.sites) < len(shapes):
            notes.append(f"{name}: covers {len(adapter.sites)} of {len(shapes)} sites (zeros "
                         "elsewhere)")
    return ImportedExperts(experts, None, names, S, R, shapes, info, notes)


def _ranks(ranks: set[int]) -> str:
    return "/".join(str(r) for r in sorted(ranks))


# --- writing an expert library ------------------------------------------------------------------


def sites_pattern(cfg: T5Config, sites: Iterable[str]) -> str:
    """A ``LoRAConfig.sites`` expression selecting exactly ``sites``."""
    sites = list(sites)
    every = [s.name for s in linear_sites(cfg).values()]
    if sites == every:
        return DEFAULT_SITES
    return "|".join(re.escape(s) for s in sites)


def write_library(imported: ImportedExperts, out: str | os.PathLike, cfg: T5Config,
                  params: Any, *, append: bool = False, overwrite: bool = False,
                  progress: bool | None = None):
    """Writes imported experts into an ``ExpertLibrary`` (created, or opened with ``append``).

    With ``append`` the library must already have the imported rank, scale and sites (import
    with ``rank=lib.rank, scale=lib.scale, sites=lib.sites``). Each expert's manifest entry
    gets ``imported.info`` (``covered_sites`` only where an expert lacks some library sites).

    Returns:
      The ``ExpertLibrary``.
    """
    from goose_jax.library import ExpertLibrary

    if append and os.path.isfile(os.path.join(os.fspath(out), "manifest.json")):
        lib = ExpertLibrary.open(out, cfg, params)
        if lib.rank != imported.rank or lib.scale != imported.scale or \
                lib.sites != imported.sites:
            raise AdapterError(f"{lib.path}: rank / scale / sites of the library "
                               f"({lib.rank}, {lib.scale:g}, {len(lib.sites)} sites) differ from "
                               f"the import ({imported.rank}, {imported.scale:g}, "
                               f"{len(imported.sites)} sites)")
    else:
        lora = LoRAConfig(rank=imported.rank, sites=sites_pattern(cfg, imported.sites),
                          scale=imported.scale)
        lib = ExpertLibrary.create(out, cfg, params, lora)
    items = list(enumerate(imported.names))
    for n, name in progress_bar(items, "writing experts", "expert", progress):
        entry = dict(imported.info[n])
        if len(entry.get("covered_sites", ())) == len(imported.sites):
            entry.pop("covered_sites")
        lib.add(name, imported.experts, imported.gates, index=n, info=entry,
                overwrite=overwrite)
    return lib


# --- export -------------------------------------------------------------------------------------


def _alpha_for(scale: float, rank: int) -> float:
    """An ``lora_alpha`` with ``alpha / rank == scale`` exactly in float64, as PEFT computes it."""
    alpha = scale * rank
    for _ in range(8):
        got = alpha / rank
        if got == scale:
            return alpha
        alpha = float(np.nextafter(alpha, np.inf if got < scale else -np.inf))
    return scale * rank


def _used_rank(a_DR: np.ndarray, b_RO: np.ndarray) -> int:
    """The rank once trailing components that are zero in both A and B are dropped."""
    live = np.any(a_DR != 0, axis=0) | np.any(b_RO != 0, axis=1)
    idx = np.flatnonzero(live)
    return int(idx[-1]) + 1 if idx.size else 0


def save_peft_adapter(cfg: T5Config, sites: Mapping[str, tuple[np.ndarray, np.ndarray]],
                      scale: float, out_dir: str | os.PathLike, *,
                      base_model_name_or_path: str | None = None,
                      overwrite: bool = False) -> list[str]:
    """Writes one expert as a PEFT LoRA adapter directory that ``PeftModel.from_pretrained``
    loads onto the HF T5 with config ``cfg``.

    Sites whose A and B are all zero are left out; trailing rank components that are zero in
    both A and B are dropped per site (``rank_pattern`` / ``alpha_pattern`` keep the scale), so
    re-importing gives back the same arrays bit for bit.

    Args:
      cfg: the base model's config.
      sites: site name -> (lora_a (D, R), lora_b (R, O)).
      scale: the expert's LoRA scale.
      out_dir: the directory to write (created).
      base_model_name_or_path: recorded in the config (PEFT uses it only when no base model is
        passed).
      overwrite: replace an existing adapter in ``out_dir``.

    Returns:
      The paths written.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    cfg_file = os.path.join(out_dir, ADAPTER_CONFIG)
    if os.path.exists(cfg_file) and not overwrite:
        raise AdapterError(f"{out_dir}: already holds a PEFT adapter (overwrite=True, or "
                           "--overwrite, replaces it)")
    modules = {s.name: module for module, s in linear_sites(cfg).items()}
    unknown = [s for s in sites if s not in modules]
    if unknown:
        raise AdapterError(f"sites {_show(unknown)} do not exist in this base model")
    tensors, ranks = {}, {}
    for site, (a, b) in sites.items():
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        r = _used_rank(a, b)
        if r == 0:
            continue
        module = modules[site]
        ranks[module] = r
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a[:, :r].T)
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b[:r].T)
    if not ranks:
        raise AdapterError("the expert is zero at every site: nothing to export")
    top = collections.Counter(ranks.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": top, "lora_alpha": _alpha_for(scale, top),
        "target_modules": list(ranks),
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != top},
        "alpha_pattern": {re.escape(m): _alpha_for(scale, r) for m, r in ranks.items()
                          if r != top},
        "use_rslora": False, "fan_in_fan_out": False, "bias": "none", "lora_dropout": 0.0,
        "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True,
    }
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, SAFE_WEIGHTS)
    tmp = weights + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, weights)
    with open(cfg_file + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    os.replace(cfg_file + ".tmp", cfg_file)
    return [cfg_file, weights]


def export_peft(library, name: str, out_dir: str | os.PathLike, *,
                base_model_name_or_path: str | None = None,
                overwrite: bool = False) -> list[str]:
    """Writes expert ``name`` of an ``ExpertLibrary`` (or a library path) as a PEFT adapter.

    The adapter has the library's scale (``lora_alpha / r``); gates have no PEFT form and are
    not written. ``base_model_name_or_path`` defaults to the one recorded at import, if any.

    Returns:
      The paths written.
    """
    from goose_jax.experts import flatten_sites
    from goose_jax.library import ExpertLibrary

    lib = library if isinstance(library, ExpertLibrary) else ExpertLibrary.open(library)
    entry = lib.info(name)
    experts, _ = lib.load([name], gates=False)
    flat = flatten_sites(experts)
    sites = {site: (np.asarray(leaf["lora_a"][0]), np.asarray(leaf["lora_b"][0]))
             for site, leaf in flat.items()}
    if base_model_name_or_path is None:
        base_model_name_or_path = entry.get("base_model_name_or_path")
    return save_peft_adapter(lib.base_config, sites, lib.scale, out_dir,
                             base_model_name_or_path=base_model_name_or_path,
                             overwrite=overwrite)
