"""The built-in miniature world: a seeded task generator where the whole method can run offline.

Why it looks like this. Per-token routing can only work when a token's hidden state says which
kind of text it came from. A small byte-level model trained on a few string games does not give
that (its states carry letters, not topics), so the world is built from the other end:

- Words, not bytes. Eight *domains* (animals, food, cities, music, weather, tools, sports,
  clothes), 24 real English words each, disjoint, plus two domains (plants, vehicles) that only
  the base model's pre-training sees. Prompts use a shared set of function words.
- A base pre-trained the way T5 is: span corruption over "documents" drawn from every domain
  (a document mostly stays in one domain, some switch domain half-way, and within a domain it
  mostly keeps to one kind of word, as real text keeps to a topic), plus a generic copy format.
  To fill a masked span the model must know which domain (and kind) the context is in, so its
  token states carry them, as a real T5's carry the topic. No expert task, no prompt and no
  kind name is in the pre-training mixture.
- Every domain word has one of two *kinds* (wild / tame animals, sweet / savory food, ...).
  Eight held-in *tasks*, one per domain, ask about kinds in different formats (is there one of
  kind A, which word is of kind A, are most / all of kind A, what kind is this word), three
  prompt templates each: six are multiple choice (rank classification) and two are generation
  (exact match). One expert each.
- Held-out tasks of three kinds: a held-in task under a *new* template, a held-in task on a list
  that *mixes two domains* at different positions (the case per-token, per-layer routing is
  for), and a *composition* whose answer needs the knowledge of two experts at once.

Every example is a pure function of ``(seed, task, split, index)``; the train, validation and
test splits draw from separate streams. The tokenizer is word-level over the world's fixed
vocabulary. Tasks are ``EvalTask`` s (the same evaluation code runs on real benchmarks) and
``register_seqio_tasks`` registers them as seqio tasks (importing seqio / TensorFlow only then).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from goose_jax.core.errors import DataError
from goose_jax.data.examples import EvalTask, Example, example_target
from goose_jax.data.tasks import example_source, seqio_vocabulary
from goose_jax.data.tokenizers import Tokenizer

DOMAINS: dict[str, tuple[str, ...]] = {
    "animals": ("cat", "dog", "horse", "cow", "sheep", "goat", "pig", "duck", "goose", "swan",
                "owl", "eagle", "fox", "wolf", "bear", "deer", "rabbit", "mouse", "lion",
                "tiger", "zebra", "camel", "otter", "frog"),
    "food": ("bread", "cheese", "apple", "pear", "plum", "grape", "lemon", "melon", "rice",
             "pasta", "soup", "salad", "butter", "honey", "cake", "pie", "bean", "corn",
             "carrot", "onion", "garlic", "pepper", "olive", "egg"),
    "cities": ("paris", "london", "rome", "berlin", "madrid", "lisbon", "vienna", "prague",
               "oslo", "dublin", "athens", "cairo", "tokyo", "delhi", "lima", "quito", "boston",
               "denver", "dallas", "austin", "seattle", "miami", "toronto", "sydney"),
    "music": ("piano", "violin", "guitar", "drum", "flute", "harp", "cello", "trumpet",
              "organ", "banjo", "oboe", "tuba", "viola", "song", "melody", "rhythm", "chord",
              "tempo", "opera", "choir", "ballad", "sonata", "anthem", "lute"),
    "weather": ("rain", "snow", "wind", "storm", "fog", "hail", "frost", "cloud", "thunder",
                "sunshine", "drizzle", "breeze", "gale", "mist", "sleet", "heatwave",
                "blizzard", "monsoon", "tornado", "drought", "rainbow", "lightning", "dew",
                "typhoon"),
    "tools": ("hammer", "saw", "drill", "wrench", "chisel", "pliers", "screw", "nail", "bolt",
              "ladder", "shovel", "rake", "axe", "clamp", "tape", "glue", "brush", "spanner",
              "trowel", "hoe", "sander", "vise", "mallet", "crowbar"),
    "sports": ("soccer", "tennis", "golf", "rugby", "hockey", "cricket", "boxing", "rowing",
               "skiing", "cycling", "chess", "judo", "karate", "fencing", "archery", "polo",
               "diving", "sailing", "surfing", "running", "climbing", "skating", "baseball",
               "volleyball"),
    "clothes": ("shirt", "coat", "hat", "scarf", "glove", "boot", "sock", "dress", "skirt",
                "jacket", "sweater", "vest", "belt", "tie", "shoe", "sandal", "cap", "hood",
                "cloak", "gown", "robe", "apron", "mitten", "blouse"),
}
# Seen only in pre-training: the base knows more of the world than the experts cover.
PRETRAIN_ONLY_DOMAINS: dict[str, tuple[str, ...]] = {
    "plants": ("oak", "pine", "maple", "birch", "willow", "fern", "moss", "ivy", "rose", "tulip",
               "daisy", "lily", "orchid", "cactus", "bamboo", "clover", "thistle", "lotus",
               "poppy", "cedar", "palm", "sage", "mint", "basil"),
    "vehicles": ("car", "bus", "train", "truck", "bicycle", "boat", "ship", "plane", "taxi",
                 "tram", "van", "scooter", "ferry", "yacht", "canoe", "rocket", "jeep", "wagon",
                 "sled", "glider", "tractor", "subway", "kayak", "carriage"),
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SENTINELS = tuple(f"<x{i}>" for i in range(16))
SPECIALS = ("<pad>", "</s>", "<unk>")
# Filler words of pre-training documents (so every prompt word has a trained embedding).
FILLER = ("the", "a", "and", "of", "with", "in", "on", "is", "was", "some", "many", "this",
          "that", "near", "after", "before", "then", "yes", "no", "list", "word", "words",
          "first", "last", "same", "most", "how", "which", "what", "does", "are", "it", "to")


# --- tasks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldTask:
    """One task of the world.

    Attributes:
      name: ``world/<name>`` is its ``EvalTask`` name.
      skill: what the answer is (``any``, ``most``, ``all``, ``which``, ``label``,
        ``label_generate``, ``compose``; see ``_skill``).
      domains: the domain(s) list words are drawn from (two: the list mixes them).
      templates: prompt templates with ``{w}`` (a query word) and ``{L}`` (the list).
      heldout: held-out tasks get no expert and are never trained on.
      expert: for a held-out task, the held-in task(s) whose knowledge it needs.
      kind_of_heldout: ``new_template``, ``mixed_domains`` or ``composition``.
    """

    name: str
    skill: str
    domains: tuple[str, ...]
    templates: tuple[str, ...]
    heldout: bool = False
    expert: str = ""
    kind_of_heldout: str = ""

    @property
    def kind(self) -> str:
        return "generate" if self.skill == "label_generate" else "rank"


# Every domain word has one of two kinds (its "attribute"); the held-in tasks ask about kinds.
# Knowing a word's kind is lexical knowledge a rank-8 LoRA learns in a few hundred steps, while
# exact-match skills over positions (first word, counting, copying, membership) are not learnable
# by a LoRA on a small frozen base whose attention was never trained for them (measured: such
# experts stayed at chance after 150-200 steps at lr 5e-3 and 2e-2). Kind questions are learnable
# only if the base's states keep which word they hold: on a base pre-trained with kind-free
# documents (where word identity within a domain predicts nothing) they also stayed at chance;
# with documents that keep to a kind (``PretrainSource``) every expert reaches 95-100%.
KINDS: dict[str, tuple[str, str, frozenset[str]]] = {
    # domain: (name of kind A, name of kind B, the words of kind A)
    "animals": ("wild", "tame", frozenset(
        "owl eagle fox wolf bear deer lion tiger zebra otter frog swan rabbit mouse".split())),
    "food": ("sweet", "savory", frozenset("apple pear plum grape melon honey cake pie".split())),
    "cities": ("europe", "abroad", frozenset(
        "paris london rome berlin madrid lisbon vienna prague oslo dublin athens".split())),
    "music": ("instrument", "form", frozenset(
        "piano violin guitar drum flute harp cello trumpet organ banjo oboe tuba viola lute"
        .split())),
    "weather": ("violent", "calm", frozenset(
        "storm hail thunder gale blizzard monsoon tornado lightning typhoon heatwave drought"
        .split())),
    "tools": ("sharp", "blunt", frozenset("saw drill chisel axe hoe sander screw nail".split())),
    "sports": ("team", "solo", frozenset(
        "soccer rugby hockey cricket polo baseball volleyball rowing sailing".split())),
    "clothes": ("warm", "light", frozenset(
        "coat scarf glove boot sweater jacket cloak mitten hood".split())),
}


_T = {
    "animals_any": ("is there a wild animal in : {L} ?",
                    "{L} . any wild animal here ?",
                    "among {L} , is one of them wild ?"),
    "food_label": ("{L} . are these sweet or savory ?",
                   "sweet or savory : {L}",
                   "the taste of {L} is"),
    "cities_which": ("which city is in europe : {L} ?",
                     "{L} . the european one is",
                     "pick the city of europe among {L}"),
    "music_most": ("are most of these instruments : {L} ?",
                   "{L} . mostly instruments ?",
                   "is the majority of {L} instruments ?"),
    "weather_all": ("is all of this weather calm : {L} ?",
                    "{L} . all calm ?",
                    "only calm weather in {L} ?"),
    "tools_which": ("which tool is blunt : {L} ?",
                    "{L} . the blunt tool is",
                    "pick the blunt one among {L}"),
    "sports_label": ("{L} . are these team or solo sports ?",
                     "team or solo : {L}",
                     "the sports {L} are played"),
    "clothes_label": ("{L} . are these clothes warm or light ?",
                      "warm or light : {L}",
                      "the clothes {L} feel"),
}
_NEW_TEMPLATES = {
    "animals_any": ("any wild one among {L} ?",),
    "cities_which": ("{L} . pick the european city .",),
    "compose": ("is there a wild animal or a sweet food in : {L} ?",),
}

HELDIN: tuple[WorldTask, ...] = (
    WorldTask("animals_any", "any", ("animals",), _T["animals_any"]),
    WorldTask("food_label", "label", ("food",), _T["food_label"]),
    WorldTask("cities_which", "which", ("cities",), _T["cities_which"]),
    WorldTask("music_most", "most", ("music",), _T["music_most"]),
    WorldTask("weather_all", "all", ("weather",), _T["weather_all"]),
    WorldTask("tools_which", "which", ("tools",), _T["tools_which"]),
    WorldTask("sports_label", "label_generate", ("sports",), _T["sports_label"]),
    WorldTask("clothes_label", "label_generate", ("clothes",), _T["clothes_label"]),
)
HELDOUT: tuple[WorldTask, ...] = (
    WorldTask("animals_any_new_template", "any", ("animals",), _NEW_TEMPLATES["animals_any"],
              True, "animals_any", "new_template"),
    WorldTask("cities_which_new_template", "which", ("cities",),
              _NEW_TEMPLATES["cities_which"], True, "cities_which", "new_template"),
    WorldTask("mixed_animals_any", "any", ("animals", "food"), _T["animals_any"], True,
              "animals_any", "mixed_domains"),
    WorldTask("mixed_sports_label", "label_generate", ("sports", "clothes"),
              _T["sports_label"], True, "sports_label", "mixed_domains"),
    WorldTask("wild_or_sweet", "compose", ("animals", "food"), _NEW_TEMPLATES["compose"],
              True, "animals_any+food_label", "composition"),
)
TASKS: dict[str, WorldTask] = {t.name: t for t in HELDIN + HELDOUT}
SPLITS = {"train": 0, "validation": 1, "test": 2}

# The prompt words of the world's first task set. They keep their ids so that the shipped base
# (pre-trained on this vocabulary) stays valid; words of later tasks are appended at the end.
_BASE_PROMPT_WORDS = (
    "times appear count number contain check whether present comes name item final common "
    "frequent find seen often equal start end at both ends reverse write backwards order remove "
    "repeated keep each once without duplicates tell me occurs among").split()


def _template_words() -> list[str]:
    words: list[str] = []
    for templates in list(_T.values()) + list(_NEW_TEMPLATES.values()):
        for t in templates:
            words += [w for w in t.replace("{w}", " ").replace("{L}", " ").split()]
    return words


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Every token of the world, in id order (deterministic): specials, sentinels, punctuation,
    numbers, filler, the base's prompt words, domain words, ``copy``; then task words."""
    words = list(SPECIALS) + list(SENTINELS) + [",", ".", ":", "?"] + list(NUMBERS)
    words += list(FILLER) + _BASE_PROMPT_WORDS
    for table in (DOMAINS, PRETRAIN_ONLY_DOMAINS):
        for ws in table.values():
            words += list(ws)
    words.append("copy")  # the pre-training mixture's generic copy format
    words += _template_words() + [k for a, b, _ in KINDS.values() for k in (a, b)]
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return tuple(seen)


class WorldTokenizer(Tokenizer):
    """Word-level tokenizer over ``vocabulary()``: lower-cased, punctuation split off."""

    pad_id, eos_id, unk_id = 0, 1, 2

    def __init__(self):
        self.words = vocabulary()
        self.index = {w: i for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words)

    def _ids(self, text: str) -> list[int]:
        tokens = re.findall(r"<x\d+>|[\w]+|[^\w\s]", text.lower())
        return [self.index.get(t, self.unk_id) for t in tokens]

    def _text(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids if 2 < i < self.vocab_size)


# --- example generation --------------------------------------------------------------------------


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng((seed,) + parts)


def _task_id(name: str) -> int:
    return list(TASKS).index(name) + 1


def _split(domain: str) -> tuple[list[str], list[str]]:
    a, b, members = KINDS[domain]
    words = DOMAINS[domain]
    return [w for w in words if w in members], [w for w in words if w not in members]


def _list_with(rng, domain: str, n: int, n_a: int, other: str | None = None) -> list[str]:
    """n distinct words of ``domain``, exactly ``n_a`` of kind A; with ``other``, the list is
    cut in two halves (random order) and the second half holds ``other`` 's words (their kinds
    do not matter), so domains change at one position inside the sequence."""
    pos, neg = _split(domain)
    own = list(rng.choice(pos, size=n_a, replace=False)) + list(
        rng.choice(neg, size=n - n_a, replace=False))
    own = [str(own[i]) for i in rng.permutation(len(own))]
    if other is None:
        return own
    extra = [str(x) for x in rng.choice(DOMAINS[other], size=int(rng.integers(2, 4)),
                                        replace=False)]
    return own + extra if rng.random() < 0.5 else extra + own


def _skill(task: WorldTask, rng) -> tuple[dict, tuple[str, ...] | None, int, str]:
    """(template fields, choices, answer index, reference) for one example."""
    s, domain = task.skill, task.domains[0]
    other = task.domains[1] if len(task.domains) > 1 else None
    a, b, _ = KINDS[domain]
    n = int(rng.integers(3, 6))
    if s == "any":  # yes iff some word is of kind A
        yes = rng.random() < 0.5
        words = _list_with(rng, domain, n, int(rng.integers(1, 3)) if yes else 0, other)
        return {"L": words}, ("yes", "no"), 0 if yes else 1, ""
    if s in ("most", "all"):  # most: over half are kind A; all: every word is kind B
        yes = rng.random() < 0.5
        if s == "most":
            n_a = int(rng.integers(n // 2 + 1, n + 1)) if yes else int(rng.integers(0, -(-n // 2)))
        else:
            n_a = 0 if yes else int(rng.integers(1, 3))
        return {"L": _list_with(rng, domain, n, n_a, other)}, ("yes", "no"), 0 if yes else 1, ""
    if s == "which":  # 4 words, exactly one of the asked kind (A for cities, B for tools)
        pos, neg = _split(domain)
        asked, rest = (pos, neg) if task.name.startswith("cities") else (neg, pos)
        words = [str(rng.choice(asked))] + [str(x) for x in rng.choice(rest, size=3,
                                                                         replace=False)]
        perm = rng.permutation(4)
        words = [words[i] for i in perm]
        return {"L": words}, tuple(words), int(np.argmin(perm)), ""
    if s in ("label", "label_generate"):  # the kind shared by every domain word of the list
        kind_a = rng.random() < 0.5
        words = _list_with(rng, domain, n, n if kind_a else 0, other)
        kind = a if kind_a else b
        if s == "label":
            return {"L": words}, (a, b), 0 if kind_a else 1, ""
        return {"L": words}, None, 0, kind
    if s == "compose":  # a wild animal or a sweet food: kinds from two experts
        b_domain = task.domains[1]
        yes = rng.random() < 0.5
        hits = int(rng.integers(0, 3)) if yes else 0
        n_a1 = int(rng.integers(0, hits + 1)) if yes else 0
        n_a2 = hits - n_a1 if yes else 0
        if yes and hits == 0:
            n_a1 = 1
        first = _list_with(rng, domain, int(rng.integers(2, 4)), n_a1)
        second = _list_with(rng, b_domain, int(rng.integers(2, 4)), n_a2)
        words = first + second if rng.random() < 0.5 else second + first
        return {"L": words}, ("yes", "no"), 0 if yes else 1, ""
    raise DataError(f"world task {task.name}: unknown skill {s!r}")


def make_example(name: str, split: str, index: int, seed: int = 0) -> Example:
    """Example ``index`` of task ``name`` in ``split``: a pure function of its arguments."""
    task = get_world_task(name)
    if split not in SPLITS:
        raise DataError(f"world: unknown split {split!r}; known: {sorted(SPLITS)}")
    rng = _rng(seed, _task_id(name), SPLITS[split], index)
    fields, choices, answer, reference = _skill(task, rng)
    t = int(rng.integers(0, len(task.templates)))
    text = task.templates[t].replace("{L}", " ".join(fields["L"])).replace(
        "{w}", fields.get("w", ""))
    if choices is None:
        return Example(text, None, (), (reference,), f"world/{name}", f"t{t}", f"{split}-{index}")
    return Example(text, tuple(choices), (answer,), (), f"world/{name}", f"t{t}",
                   f"{split}-{index}")


def get_world_task(name: str) -> WorldTask:
    """The miniature world's task ``name`` (``world/`` prefix optional); raises DataError for an
    unknown name."""
    name = name.removeprefix("world/")
    if name not in TASKS:
        raise DataError(f"unknown world task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


class TaskSource:
    """``(input, target)`` training pairs of one task (``data.batching.ExampleSource``)."""

    def __init__(self, name: str, size: int, split: str = "train", seed: int = 0):
        self.name, self.size, self.split, self.seed = name, size, split, seed
        self.path = f"world/{name}:{split}"

    def __len__(self) -> int:
        return self.size

    @functools.lru_cache(maxsize=8192)  # noqa: B019 -- examples are small and re-read per epoch
    def __getitem__(self, index: int) -> tuple[str, str]:
        ex = make_example(self.name, self.split, int(index), self.seed)
        return ex.input, example_target(ex)


class PretrainSource:
    """The base model's pre-training mixture: span corruption over domain documents (75%) and
    a generic copy format (25%). ``(input, target)`` strings with sentinel tokens."""

    def __init__(self, size: int, seed: int = 0, noise: float = 0.15, mean_span: float = 2.0):
        self.size, self.seed, self.noise, self.mean_span = size, seed, noise, mean_span
        every = {**DOMAINS, **PRETRAIN_ONLY_DOMAINS}
        self.names, self.domains = list(every), list(every.values())
        self.path = "world/pretrain"

    def __len__(self) -> int:
        return self.size

    def _segment_words(self, rng, d: int) -> list[str]:
        """The words one segment draws from: a task domain's segment mostly keeps to one kind
        (80% of segments), so kinds show up as co-occurrence, as topics do in real text."""
        words = self.domains[d]
        name = self.names[d]
        if name not in KINDS or rng.random() < 0.2:
            return list(words)
        members = KINDS[name][2]
        kind_a = rng.random() < 0.5
        return [w for w in words if (w in members) == kind_a]

    def document(self, rng) -> list[str]:
        n = int(rng.integers(8, 21))
        picks = rng.choice(len(self.domains), size=2, replace=False)
        switch = int(rng.integers(n // 3, n)) if rng.random() < 0.3 else n
        pools = [self._segment_words(rng, int(d)) for d in picks]
        words = []
        for i in range(n):
            if rng.random() < 0.25:
                words.append(str(rng.choice(FILLER)))
                continue
            pool = pools[0] if i < switch else pools[1]
            d = int(picks[0] if i < switch else picks[1])
            # 15% of a segment's domain words ignore its kind.
            words.append(str(rng.choice(self.domains[d] if rng.random() < 0.15 else pool)))
        return words

    def __getitem__(self, index: int) -> tuple[str, str]:
        rng = _rng(self.seed, 0, 9, int(index))
        words = self.document(rng)
        if rng.random() < 0.25:
            return "copy : " + " ".join(words), " ".join(words)
        n = len(words)
        masked = np.zeros(n, bool)
        n_mask = max(1, int(round(n * self.noise)))
        while masked.sum() < n_mask:
            length = max(1, int(rng.poisson(self.mean_span)))
            start = int(rng.integers(0, n))
            masked[start:start + length] = True
        inp, tgt, k, i = [], [], 0, 0
        while i < n:
            if masked[i] and k < len(SENTINELS):
                inp.append(SENTINELS[k])
                tgt.append(SENTINELS[k])
                while i < n and masked[i]:
                    tgt.append(words[i])
                    i += 1
                k += 1
            else:
                inp.append(words[i])
                i += 1
        return " ".join(inp), " ".join(tgt)


# --- evaluation tasks ----------------------------------------------------------------------------


def eval_tasks(names: Sequence[str] | None = None, *, split: str = "test", size: int = 64,
               seed: int = 0) -> list[EvalTask]:
    """``EvalTask`` s of the world (all held-in then held-out tasks when ``names`` is None)."""
    tasks = [get_world_task(n) for n in (names or list(TASKS))]

    def loader(name: str) -> Callable[[], list[Example]]:
        return lambda: [make_example(name, split, i, seed) for i in range(size)]

    return [EvalTask(f"world/{t.name}", f"world/{t.name}", t.kind,
                     "accuracy" if t.kind == "rank" else "exact_match", loader(t.name),
                     max_new_tokens=4, source=f"the miniature world (seed {seed}, {split})")
            for t in tasks]


def register_seqio_tasks(seed: int = 0, size: int = 256, vocabulary=None) -> list[str]:
    """Registers every world task as a seqio task ``world_<name>`` (splits train / validation /
    test, ``size`` examples each) plus mixtures ``world_heldin`` and ``world_heldout``.

    Imports seqio and TensorFlow. ``vocabulary``: a seqio vocabulary (default: bytes).
    """
    import seqio


    vocab = seqio_vocabulary(vocabulary)
    features = {k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")}
    names = []
    for t in HELDIN + HELDOUT:
        name = f"world_{t.name}"
        if name in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove(name)

        def load(split, _t=t.name):
            return [make_example(_t, split, i, seed) for i in range(size)]

        seqio.TaskRegistry.add(name, source=example_source(load, list(SPLITS)),
                               output_features=features,
                               preprocessors=[seqio.preprocessors.tokenize,
                                              seqio.preprocessors.append_eos])
        names.append(name)
    for mix, group in (("world_heldin", HELDIN), ("world_heldout", HELDOUT)):
        if mix in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.remove(mix)
        seqio.MixtureRegistry.add(mix, [f"world_{t.name}" for t in group], default_rate=1.0)
    return names
