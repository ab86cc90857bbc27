"""Hugging Face PEFT LoRA adapters <-> goose-jax experts, for every model family.

A PEFT adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``, a torch pickle). For each adapted ``nn.Linear`` named ``<module>`` (the
module names of the Hugging Face model: ``encoder.block.0.layer.0.SelfAttention.q`` in a T5,
``model.layers.0.self_attn.q_proj`` in a Llama, Qwen2 or Mistral) it holds
``base_model.model.<module>.lora_A.weight`` (r, I) and ``...lora_B.weight`` (O, r), and the
layer computes ``W x + B A x * s`` with ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
rsLoRA; ``rank_pattern`` / ``alpha_pattern`` override r and alpha per module (regular
expressions matched, as PEFT does, against the end of the module name). goose-jax stores the
same expert as ``lora_a = A^T`` (I, r) and ``lora_b = B^T`` (r, O) at the matching site
(``encoder/block_0/self_attn/q``, ``layers_0/self_attn/q``); ``goose_jax.interop.peft_modules``
holds the per-family module table, the only thing that differs between families.

Many adapters become one stacked library with one rank R and one scale S
(``goose_jax.library.stacking``), whatever their per-module ranks and alphas: a module of rank
r < R is zero-padded (exact), and a module whose own scale s (its alpha over r or sqrt(r))
differs from S has ``s / S`` folded into its B (one float32 rounding). Export inverts this:
trailing zero rank components are dropped per module and ``rank_pattern`` / ``alpha_pattern``
give each module the library scale.

Loading never executes pickled code: ``goose_jax.core.tensorfile`` reads safetensors through a
checked header parser and torch files only with ``torch.load(weights_only=True)`` (torch imported
only then), and refuses any other pickle with ``UnsafeCheckpointError``. ``fan_in_fan_out``
changes nothing: every adapted layer of the supported families is an ``nn.Linear``, for which
PEFT itself resets the flag (creating or loading), and the stored A / B shapes are the same.
``bias="all"`` / ``"lora_only"`` make PEFT save trained base-model biases: refused where the
weights hold any (a Llama has none to save, and its adapter is plain LoRA).

Shapes follow the package legend (the ``goose_jax`` module docstring); R is the common LoRA rank
of a stacked library. Also used here: r one adapter's rank.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from goose_jax.core.errors import AdapterError
from goose_jax.core.progress import progress_bar
from goose_jax.core.tensorfile import read_json, read_tensors
from goose_jax.core.trees import flatten_sites
from goose_jax.experts.lora import peft_scale
from goose_jax.interop.peft_modules import module_table, recorded_family
from goose_jax.library.stacking import (
    ImportedExperts,
    SiteLoRA,
    library_sites,
    show_names,
    stack_experts,
)
from goose_jax.library.store import ExpertLibrary
from goose_jax.models import families
from goose_jax.models.hf_folder import (
    check_model_folder,
    resolve_hf_dir,
    write_model_folder,
)

ADAPTER_CONFIG = "adapter_config.json"
SAFE_WEIGHTS = "adapter_model.safetensors"
TORCH_WEIGHTS = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"

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


def is_targeted(config: Mapping[str, Any], name: str, site_names: Iterable[str] = (),
                default_targets: Sequence[str] = ("q", "v")) -> bool:
    """Whether PEFT's ``LoraConfig`` in ``config`` puts a LoRA on module ``name``.

    ``target_modules`` as a string is a regular expression full-matched against the module name
    (``"all-linear"``: every linear layer but the output head, i.e. ``site_names``); as a list,
    a module is targeted when its name equals an entry or ends with ``"." + entry``, then
    filtered by ``layers_to_transform`` / ``layers_pattern``; none: ``default_targets`` (PEFT's
    for the model type). ``exclude_modules`` wins.
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
        targets = list(default_targets)
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
class PeftAdapter:
    """A PEFT LoRA adapter read from disk and mapped onto a base model's sites.

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
    config = read_json(file, error=AdapterError)
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
    if not _is_number(alpha) or alpha == 0:
        raise AdapterError(f"{file}: lora_alpha: expected a finite non-zero number, found "
                           f"{alpha!r}")
    for key in ("target_modules", "exclude_modules"):  # a regex, a list of names, or none
        value = config.get(key)
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as e:
                raise AdapterError(f"{file}: {key}={value!r} is not a regular expression: "
                                   f"{e}") from None
        elif value is not None and not (isinstance(value, list)
                                        and all(isinstance(v, str) for v in value)):
            raise AdapterError(f"{file}: {key}: expected a regular expression or a list of "
                               f"module names (strings), found {value!r}")
    layers = config.get("layers_to_transform")
    if layers is not None and not _is_int(layers) and not (
            isinstance(layers, list) and all(_is_int(v) for v in layers)):
        raise AdapterError(f"{file}: layers_to_transform: expected a layer index or a list of "
                           f"them, found {layers!r}")
    pattern = config.get("layers_pattern")
    if pattern is not None and not isinstance(pattern, str) and not (
            isinstance(pattern, list) and all(isinstance(v, str) for v in pattern)):
        raise AdapterError(f"{file}: layers_pattern: expected a string or a list of strings, "
                           f"found {pattern!r}")
    for key, ok, want in (("rank_pattern", lambda v: _is_int(v) and v >= 1, "ranks >= 1"),
                          ("alpha_pattern", lambda v: _is_number(v) and v != 0,
                           "finite non-zero alphas")):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not (isinstance(patterns, dict) and all(ok(v) for v in patterns.values())):
            raise AdapterError(f"{file}: {key}: expected an object of module patterns to "
                               f"{want}, found {patterns!r}")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise AdapterError(f"{file}: {key}: {pattern!r} is not a regular expression: "
                                   f"{e}") from None
    return config


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _weights_file(path: str) -> str:
    for name in (SAFE_WEIGHTS, TORCH_WEIGHTS):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            return file
    raise AdapterError(f"{path}: no adapter weights (looked for {SAFE_WEIGHTS}, {TORCH_WEIGHTS})")


def _check_family(config: Mapping[str, Any], cfg_file: str, table) -> None:
    # Module names and shapes can coincide across families (a Llama and a Mistral of the same
    # sizes); the base recorded in the config tells them apart when it is a local folder.
    found, model_type = recorded_family(config.get("base_model_name_or_path"))
    if model_type is not None and found != table.family:
        raise AdapterError(
            f"{cfg_file}: made on a {model_type!r} base (base_model_name_or_path="
            f"{config.get('base_model_name_or_path')!r}), but the base given is "
            f"{families.describe(table.family)}: pass the base the adapter was trained on")


def load_peft_adapter(path: str | os.PathLike, cfg: families.ModelConfig) -> PeftAdapter:
    """Reads a PEFT LoRA adapter directory and maps it onto the sites of the model ``cfg``
    configures (a T5, or a Llama-family decoder: ``goose_jax.models.families``).

    Args:
      path: the adapter directory (or a Hugging Face cache entry ``models--org--name``).
      cfg: the base model's config; every adapted module must be one of its linear layers,
        with the same input and output widths (I, O). When the adapter records its base as a
        local folder, that base must be of the same family.

    Returns:
      A ``PeftAdapter`` whose sites hold float32 ``lora_a`` (I, r), ``lora_b`` (r, O), scale.

    Raises:
      AdapterError: naming the file and the expected and found values, for an adapter of
        another architecture or family, for a base with other shapes, an adapter type other
        than LoRA, unsupported options (trained biases among them), or config and weights
        that disagree.
      UnsafeCheckpointError: an ``adapter_model.bin`` that is not a weights-only pickle.
    """
    path = resolve_hf_dir(path) if os.path.isdir(path) else os.fspath(path)
    config = read_adapter_config(path)
    cfg_file = os.path.join(path, ADAPTER_CONFIG)
    file = _weights_file(path)
    table = module_table(cfg)
    _check_family(config, cfg_file, table)
    tensors = read_tensors(file, error=AdapterError)
    sites, label = table.sites, table.label
    origin = _describe_origin(config)

    # The modules the config targets, among every module a LoRA could sit on.
    targeted = [m for m in (*sites, *table.no_site)
                if is_targeted(config, m, sites, table.default_targets)]
    if not targeted:
        raise AdapterError(
            f"{cfg_file}: target_modules={config.get('target_modules')!r} match no module of "
            f"this {label} (an adapter for another architecture? {origin}); {label} modules "
            f"look like {table.example!r}")
    no_site = [m for m in targeted if m not in sites]
    if no_site:
        raise AdapterError(f"{cfg_file}: targets {show_names(no_site)}, which are not attention or "
                           "feed-forward linear layers; goose-jax experts live only on those")

    # The tensors, grouped by module.
    factors: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        name = key.removeprefix(KEY_PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if m is None and re.search(r"(^|\.)bias$", name) and config.get("bias") not in (None,
                                                                                      "none"):
            raise AdapterError(
                f"{file}: tensor {key!r}: bias={config['bias']!r} trained base-model biases, "
                "which a LoRA expert cannot hold; train the adapter with bias='none'")
        if m is None:
            raise AdapterError(f"{file}: tensor {key!r} is not a LoRA A / B weight of a linear "
                               "layer (DoRA magnitudes, biases, embeddings and saved modules "
                               "are not supported)")
        module, which = m.groups()
        if module not in sites:
            raise AdapterError(
                f"{file}: tensor {key!r}: module {module!r} is not a linear layer of this "
                f"{label} (an adapter for another architecture? {origin})")
        factors[module][which] = value
    extra = [m for m in factors if m not in targeted]
    if extra:
        raise AdapterError(f"{file}: has weights for {show_names(extra)}, which {cfg_file} does "
                           "not target: config and weights disagree")
    missing = [m for m in targeted if m not in factors]
    if missing:
        raise AdapterError(f"{file}: no weights for {show_names(missing)}, which {cfg_file} "
                           "targets (an incomplete adapter?)")

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


# --- many adapters into stacked experts ---------------------------------------------------------


def import_peft(paths: Sequence[str | os.PathLike], cfg: families.ModelConfig, *,
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
        raise AdapterError(f"duplicate expert names {show_names(duplicates)}; pass names= "
                           "(--names)")
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


def _used_rank(a_Ir: np.ndarray, b_rO: np.ndarray) -> int:
    """The rank once trailing components that are zero in both A and B are dropped."""
    live = np.any(a_Ir != 0, axis=0) | np.any(b_rO != 0, axis=1)
    idx = np.flatnonzero(live)
    return int(idx[-1]) + 1 if idx.size else 0


def save_peft_adapter(cfg: families.ModelConfig, sites: Mapping[str, tuple[np.ndarray, np.ndarray]],
                      scale: float, out_dir: str | os.PathLike, *,
                      base_model_name_or_path: str | None = None,
                      overwrite: bool = False) -> list[str]:
    """Writes one expert as a PEFT LoRA adapter directory that ``PeftModel.from_pretrained``
    loads onto the Hugging Face model with config ``cfg`` (a T5 or a Llama-family decoder).

    Sites whose A and B are all zero are left out; trailing rank components that are zero in
    both A and B are dropped per site (``rank_pattern`` / ``alpha_pattern`` keep the scale), so
    re-importing gives back the same arrays bit for bit.

    Args:
      cfg: the base model's config.
      sites: site name -> (lora_a (I, r), lora_b (r, O)).
      scale: the expert's LoRA scale.
      out_dir: the directory to write (created).
      base_model_name_or_path: recorded in the config (PEFT uses it only when no base model is
        passed).
      overwrite: replace an existing adapter in ``out_dir``.

    Returns:
      The paths written.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_adapter_folder(out_dir, overwrite=overwrite)
    table = module_table(cfg)
    modules = {s.name: module for module, s in table.sites.items()}
    unknown = [s for s in sites if s not in modules]
    if unknown:
        raise AdapterError(f"sites {show_names(unknown)} do not exist in this base model")
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
        "peft_type": "LORA", "task_type": table.task_type,
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
    return write_model_folder(out_dir, SAFE_WEIGHTS, tensors, ADAPTER_CONFIG,
                              json.dumps(config, indent=2) + "\n", superseded=(TORCH_WEIGHTS,))


def check_adapter_folder(out_dir: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Fails before any work unless a PEFT adapter may be written to ``out_dir``.

    Raises:
      AdapterError: ``out_dir`` is a file or lies below one, or already holds an adapter (its
        config or weights) and ``overwrite`` is False.
    """
    check_model_folder(out_dir, (ADAPTER_CONFIG, SAFE_WEIGHTS, TORCH_WEIGHTS),
                       overwrite=overwrite, what="a PEFT adapter", error=AdapterError)


def export_peft(library, name: str, out_dir: str | os.PathLike, *,
                base_model_name_or_path: str | None = None,
                overwrite: bool = False) -> list[str]:
    """Writes expert ``name`` of an ``ExpertLibrary`` (or a library path) as a PEFT adapter.

    The adapter has the library's scale (``lora_alpha / r``); gates have no PEFT form and are
    not written. ``base_model_name_or_path`` defaults to the one recorded at import, if any.

    Returns:
      The paths written.
    """

    check_adapter_folder(out_dir, overwrite=overwrite)
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
