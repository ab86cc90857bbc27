"""Which PyTorch module of each model family a PEFT LoRA sits on, and which goose-jax site that is.

A PEFT adapter names the ``nn.Linear`` modules it adapts by their names in the Hugging Face
model (``encoder.block.0.layer.0.SelfAttention.q`` in ``T5ForConditionalGeneration``,
``model.layers.0.self_attn.q_proj`` in ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and
``MistralForCausalLM``). That name table, and the few facts PEFT itself keys on the model type
(its default targets, the task type of a saved adapter), are the only things the PEFT interop
(``goose_jax.interop.peft``) needs to know per family; they live here, taken from each family's
one checkpoint name table (``models.t5.hf.tensor_specs``, ``models.llama.hf.tensor_map``).
"""

from __future__ import annotations

import dataclasses
import json
import os

from goose_jax.models import families
from goose_jax.models.family import Site

# Hugging Face ``model_type`` values of each family (a T5 checkpoint may be any of these).
_MODEL_TYPES = {t: (fam.names[0] if len(fam.names) == 1 else t)
                for fam in families.REGISTRY for t in fam.hf_model_types}


@dataclasses.dataclass(frozen=True)
class ModuleTable:
    """The PEFT view of one base model.

    Attributes:
      family: the model family (``goose_jax.models.families``).
      label: the family for messages (``"T5"``, ``"Llama"``, ...).
      sites: HF module name -> ``Site`` for every linear layer with a site, in model order.
      no_site: modules a LoRA could target that have no site (embeddings, the output head).
      default_targets: PEFT's targets for this model type when a config names none.
      task_type: the PEFT task type of an exported adapter.
      example: a module name, for messages.
    """

    family: str
    label: str
    sites: dict[str, Site]
    no_site: tuple[str, ...]
    default_targets: tuple[str, ...]
    task_type: str

    @property
    def example(self) -> str:
        return next(iter(self.sites))


def module_table(cfg: families.ModelConfig) -> ModuleTable:
    """The PEFT module table of the model ``cfg`` configures."""
    fam = families.of(cfg)
    name = fam.name_of(cfg)
    return ModuleTable(name, fam.label(name), fam.peft_sites(cfg), fam.peft_no_site,
                       fam.peft_default_targets, fam.peft_task_type)


def recorded_family(base_model_name_or_path) -> tuple[str | None, str | None]:
    """(family, model_type) of the base an adapter records, when that is a local model folder
    whose ``config.json`` names its ``model_type``; (None, None) when it cannot be told (a Hub
    name, a folder no longer there). A ``model_type`` of no supported family gives (None, it).
    """
    if not isinstance(base_model_name_or_path, str) or not base_model_name_or_path:
        return None, None
    file = os.path.join(base_model_name_or_path, "config.json")
    try:
        with open(file, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None, None
    if not isinstance(model_type, str):
        return None, None
    return _MODEL_TYPES.get(model_type), model_type
