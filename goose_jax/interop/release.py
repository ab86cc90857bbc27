"""The original PHATGOOSE release's checkpoints -> goose-jax experts and gates.

The release (PyTorch) stores all experts of a collection in one state dict. For every adapted T5
linear layer ``<module>`` (Hugging Face module names, e.g.
``encoder.block.0.layer.0.SelfAttention.q``) and every expert i:

    <module>._addons.expert_lora.layer1__{i}          (I, r)       x @ layer1 is the shrink
    <module>._addons.expert_lora.layer2__{i}          (r, O)
    <module>._addons.router.expert_embeddings__{i}    (I,)         the trained gate vector

and the layer computes ``W x + sum_j w_j (x layer1[i_j]) layer2[i_j] / r``. That is goose-jax's
orientation already (``lora_a = layer1``, ``lora_b = layer2``) with scale 1 / r. Expert i is the
i-th dataset of the release's collection list (``RELEASE_EXPERT_SETS``; 36 experts default to the
T0 held-in list, 166 to the full FLAN list). The state dict may also hold base-model weights
(such as ``encoder.embed_tokens.weight``): keys without ``._addons.`` are ignored. A single-expert
checkpoint from gate training, which has ``_addons.expert_lora.expert_input_gate`` instead of
router embeddings, gets that vector as its gate (the release's ``use_input_gate_as_router``).

Loading never executes pickled code: ``goose_jax.core.tensorfile`` reads safetensors, or a torch
file
with ``torch.load(weights_only=True)`` only.

Shapes follow the package legend (the ``goose_jax`` module docstring). Also used here: r an
expert's rank in the release.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from goose_jax.core.errors import AdapterError
from goose_jax.core.progress import progress_bar
from goose_jax.core.tensorfile import read_tensors
from goose_jax.core.trees import nest_sites
from goose_jax.library.stacking import (
    ImportedExperts,
    SiteLoRA,
    library_sites,
    show_names,
    stack_experts,
)
from goose_jax.models.t5.config import T5Config
from goose_jax.models.t5.hf import linear_sites

# The release's expert collections, in its expert order (its dataset dictionaries' keys).
_P3 = (
    "P3Agnews", "P3Amazonpolarity", "P3Cosmosqa", "P3Samsum", "P3Quartz", "P3Ropes",
    "P3Wikibio", "P3Paws", "P3Wikiqa", "P3Socialiqa", "P3Qasc", "P3Quail", "P3Dream", "P3Wiqa",
    "P3Quarel", "P3Sciq", "P3Quoref", "P3Duorc", "P3Rottentomatoes", "P3Yelp", "P3Commongen",
    "P3Gigaword", "P3Xsum", "P3Mrpc", "P3Qqp", "P3Commonsenseqa", "P3Cose", "P3Wikihop",
    "P3Hotpotqa", "P3Appreviews", "P3Trec", "P3Multinews", "P3Imdb", "P3Adversarialqa",
    "P3Cnndailymail", "P3Dbpedia14",
)
_FLAN2021 = tuple("Flanv2zs" + n for n in (
    "Ai2arceasy", "Ai2arcchallenge", "Algebralinear1d", "Boolq", "Coqa", "Defpronounresolution",
    "Drop", "Fixpunct", "GemDart", "Geme2enlg", "Gemwebnlgen", "Gemwikilinguaen", "Gluesst2",
    "Gluecola", "Gluemnli", "Glueqnli", "Gluestsb", "Gluewnli", "Lambada",
    "Naturalquestionsopen", "Newsroom", "Openbookqa", "Opinionabstractidebate",
    "Opinionabstractrottentomatoes", "Paracrawlenes", "Piqa", "Quac", "Sentiment140", "Snli",
    "Squad", "Supergluemultirc", "Supergluerecord", "Triviaqa", "Truecase",
    "Unifiedqascienceinst", "Wordsegment",
))
_NIV2 = tuple("Niv2zs" + n for n in (
    "Translation", "Programexecution", "Questiongeneration", "Sentimentanalysis",
    "Textcategorization", "Textmatching", "Toxiclanguagedetection", "Causeeffectclassification",
    "Informationextraction", "Textualentailment", "Wrongcandidategeneration",
    "Namedentityrecognition", "Commonsenseclassification", "Fillintheblank", "Textcompletion",
    "Sentencecomposition", "Titlegeneration", "Languageidentification",
    "Questionunderstanding", "Sentenceperturbation", "Answerabilityclassification",
    "Summarization", "Coreferenceresolution", "Textqualityevaluation", "Texttocode",
    "Paraphrasing", "Dialoguegeneration", "Questionrewriting", "Wordsemantics", "Postagging",
    "Linguisticprobing", "Storycomposition", "Speakeridentification", "Wordanalogy",
    "Datatotext", "Stereotypedetection", "Negotiationstrategydetection",
    "Dialogueactrecognition", "Genderclassification", "Coherenceclassification", "Explanation",
    "Ethicsclassification", "Wordrelationclassification", "Sentenceordering",
    "Answerverification", "Mathematics", "Intentidentification", "Keywordtagging",
    "Codetotext", "Dialoguestatetracking", "Textsimplification", "Stancedetection",
    "Factverification", "Grammarerrordetection", "Sectionclassification", "Numberconversion",
    "Styletransfer", "Speakerrelationclassification", "Ironydetection",
    "Questiondecomposition", "Overlapextraction", "Grammarerrorcorrection",
    "Spellingerrordetection", "Entitygeneration", "Sentenceexpansion",
    "Discourseconnectiveidentification", "Discourserelationclassification", "Poemgeneration",
    "Entityrelationclassification", "Punctuationerrordetection", "Spamclassification",
    "Paperreview", "Sentencecompression", "Prepositionprediction", "Misc",
))
_ADD1 = (
    "P3Wscfixed", "P3Copa", "P3Hswag", "P3Wic", "P3Racehigh", "P3Racemiddle", "P3Webquestions",
    "Flanv2zsQrecc", "Flanv2zsWikidialog", "Flanv2zsQreccii", "Flanv2zsWikidialogii",
    "Flanv2zsAeslc", "Flanv2zsWmt16translatecsen", "Flanv2zsWmt16translatedeen",
    "Flanv2zsWmt16translateruen", "Flanv2zsWmt16translatefien", "Flanv2zsWmt16translateroen",
    "Flanv2zsWmt16translatetren", "Flanv2zsWmt14translatefren",
)

RELEASE_EXPERT_SETS: dict[str, tuple[str, ...]] = {
    "P3": _P3,                                   # T0 held-in, 36
    "Flanv2": _FLAN2021,                         # 36
    "Niv2": _NIV2,                               # 75 NIv2 task categories
    "Add1": _ADD1,                               # 19
    "P3flanv2": _P3 + _FLAN2021,                 # 72
    "All": _P3 + _FLAN2021 + _NIV2,              # 147
    "Full": _P3 + _FLAN2021 + _NIV2 + _ADD1,     # 166, the FLAN collection
}
# Which list a checkpoint with this many experts is taken to follow when no names are given.
DEFAULT_SET_BY_COUNT = {36: "P3", 72: "P3flanv2", 147: "All", 166: "Full"}

_ADDON = "._addons."
_KEY = re.compile(
    r"(?:.*?\.)?((?:encoder|decoder)\.block\.\d+\.layer\.\d+\.\w+\.\w+)\._addons\."
    r"(expert_lora\.layer1|expert_lora\.layer2|router\.expert_embeddings)__(\d+)")
_INPUT_GATE = re.compile(
    r"(?:.*?\.)?((?:encoder|decoder)\.block\.\d+\.layer\.\d+\.\w+\.\w+)\._addons\."
    r"expert_lora\.expert_input_gate")
_KINDS = {"expert_lora.layer1": "layer1", "expert_lora.layer2": "layer2",
          "router.expert_embeddings": "gate"}


def release_names(names: str | Sequence[str] | None, count: int) -> list[str]:
    """Expert names for a release checkpoint with ``count`` experts.

    Args:
      names: None (the release list with ``count`` entries, see ``DEFAULT_SET_BY_COUNT``), the
        key of a ``RELEASE_EXPERT_SETS`` list, or the names themselves.
      count: the number of experts in the checkpoint.
    """
    if names is None:
        if count not in DEFAULT_SET_BY_COUNT:
            return [f"expert_{i:03d}" for i in range(count)]
        names = DEFAULT_SET_BY_COUNT[count]
    if isinstance(names, str):
        if names not in RELEASE_EXPERT_SETS:
            raise AdapterError(f"unknown release expert list {names!r}; expected one of "
                               f"{sorted(RELEASE_EXPERT_SETS)} or explicit names")
        names = RELEASE_EXPERT_SETS[names]
    names = list(names)
    if len(names) != count:
        raise AdapterError(f"{len(names)} expert names for a checkpoint with {count} experts")
    return names


def import_release(path: str | os.PathLike, cfg: T5Config, *,
                   names: str | Sequence[str] | None = None, rank: int | None = None,
                   scale: float | None = None,
                   sites: Mapping[str, tuple[int, int]] | None = None,
                   progress: bool | None = None) -> ImportedExperts:
    """Imports a release checkpoint into stacked experts and gates.

    Args:
      path: the checkpoint (a torch state dict, e.g. ``best.pt``, or a safetensors file).
      cfg: the base model's config (T5-XL LM-adapt for the release's own checkpoints).
      names: see ``release_names``.
      rank, scale, sites: as in ``import_peft``; by default the checkpoint's rank r, scale 1/r
        and the sites it covers.
      progress: draw a progress bar (default: on a terminal).

    Returns:
      ``ImportedExperts`` with gates (when the checkpoint has router embeddings), names and
      scale 1 / r.

    Raises:
      AdapterError: keys or shapes that do not fit this base model, missing experts, unknown
        ``_addons`` tensors.
      UnsafeCheckpointError: a pickle that is not weights-only.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AdapterError(f"{path}: checkpoint file does not exist")
    tensors = read_tensors(path, error=AdapterError)
    modules = linear_sites(cfg)

    found: dict[str, dict[str, dict[int, np.ndarray]]] = collections.defaultdict(
        lambda: collections.defaultdict(dict))
    input_gates: dict[str, np.ndarray] = {}
    unknown, ignored = [], 0
    for key, value in tensors.items():
        if _ADDON not in key:
            ignored += 1
            continue
        m = _KEY.fullmatch(key)
        if m is not None:
            module, kind, index = m.groups()
            found[module][_KINDS[kind]][int(index)] = value
            continue
        g = _INPUT_GATE.fullmatch(key)
        if g is not None:
            input_gates[g.group(1)] = value
            continue
        unknown.append(key)
    if unknown:
        raise AdapterError(f"{path}: tensors of unknown kind {show_names(unknown)}; expected "
                           "<module>._addons.expert_lora.layer1__i / layer2__i and "
                           "<module>._addons.router.expert_embeddings__i")
    if not found:
        raise AdapterError(f"{path}: no release expert tensors (keys ending in "
                           "_addons.expert_lora.layer1__i); not a PHATGOOSE release checkpoint?")
    outside = [m for m in found if m not in modules]
    if outside:
        raise AdapterError(f"{path}: modules {show_names(outside)} are not linear layers of this "
                           "T5 (a checkpoint for a larger or different model?)")

    E = 1 + max(i for kinds in found.values() for per in kinds.values() for i in per)
    with_gates = any("gate" in kinds for kinds in found.values())
    use_input_gate = not with_gates and E == 1 and bool(input_gates)
    per_expert: list[dict[str, SiteLoRA]] = [{} for _ in range(E)]
    gates: dict[str, np.ndarray] = {}
    ordered = [(module, site) for module, site in modules.items() if module in found]
    for module, site in progress_bar(ordered, "reading sites", "site", progress):
        kinds = found[module]
        for kind in ("layer1", "layer2") + (("gate",) if with_gates else ()):
            absent = [i for i in range(E) if i not in kinds.get(kind, {})]
            if absent:
                raise AdapterError(f"{path}: module {module!r} lacks {kind} of expert(s) "
                                   f"{absent[:8]} (the checkpoint has {E} experts)")
        gate_EI = np.zeros((E, site.d_in), np.float32)
        for i in range(E):
            l1, l2 = kinds["layer1"][i], kinds["layer2"][i]
            if l1.ndim != 2 or l2.ndim != 2 or l1.shape[0] != site.d_in or \
                    l2.shape[1] != site.d_out or l1.shape[1] != l2.shape[0]:
                raise AdapterError(
                    f"{path}: {module}._addons.expert_lora.layer1__{i} / layer2__{i}: expected "
                    f"({site.d_in}, r) and (r, {site.d_out}) for this base model, found "
                    f"{tuple(l1.shape)} and {tuple(l2.shape)} (a checkpoint for a base model "
                    "with other shapes?)")
            r = l1.shape[1]
            per_expert[i][site.name] = SiteLoRA(np.asarray(l1, np.float32),
                                                np.asarray(l2, np.float32), 1.0 / r)
            if with_gates:
                g = kinds["gate"][i]
                if tuple(g.shape) not in ((site.d_in,), (1, site.d_in)):
                    raise AdapterError(
                        f"{path}: {module}._addons.router.expert_embeddings__{i}: expected "
                        f"shape ({site.d_in},), found {tuple(g.shape)}")
                gate_EI[i] = np.asarray(g, np.float32).reshape(-1)
        if use_input_gate and module in input_gates:
            gate_EI[0] = np.asarray(input_gates[module], np.float32).reshape(-1)
        gates[site.name] = gate_EI

    names = release_names(names, E)
    shapes = library_sites(cfg, sites, per_expert)
    experts, R, S, folded = stack_experts(per_expert, shapes, rank=rank, scale=scale)
    has_gates = with_gates or use_input_gate
    gate_tree = None
    if has_gates:
        gate_tree = nest_sites({s: {"gate": gates.get(s, np.zeros((E, d_in), np.float32))}
                                for s, (d_in, _) in shapes.items()})
    base = os.path.basename(path)
    info = [{"source": "phatgoose-release", "checkpoint": base, "release_index": i,
             "data": name, "covered_sites": list(per_expert[i])} for i, name in enumerate(names)]
    notes = []
    if ignored:
        notes.append(f"ignored {ignored} tensor(s) without '_addons' (base-model weights)")
    if not has_gates:
        notes.append("no router embeddings: experts imported without gates (route with "
                     "'arrow', or train gates)")
    if use_input_gate:
        notes.append("single-expert checkpoint: its expert_input_gate becomes the gate")
    if any(folded):
        notes.append(f"ranks differ between sites: scale folded into B at {sum(folded)} "
                     f"(expert, site) pair(s) (library scale {S:g})")
    if list(names) == [f"expert_{i:03d}" for i in range(E)]:
        notes.append(f"no release list has {E} experts: named expert_000 ...; pass names")
    return ImportedExperts(experts, gate_tree, names, S, R, shapes, info, notes)
