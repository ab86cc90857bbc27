"""The miniature world: deterministic examples whose answers are right, a closed vocabulary, and
a pre-training mixture that holds none of the expert tasks."""

import re
from collections import Counter

import numpy as np
import pytest

from goose_jax.core.errors import DataError
from goose_jax.data import world
from goose_jax.data.examples import example_target


def _parse(task: world.WorldTask, text: str) -> dict:
    """Recovers the template, list and query word from a prompt (independently of the generator:
    each template becomes a regular expression)."""
    for t, template in enumerate(task.templates):
        pattern = re.escape(template).replace(r"\{L\}", r"(?P<L>[a-z ]+?)").replace(
            r"\{w\}", r"(?P<w>[a-z]+)")
        m = re.fullmatch(pattern, text)
        if m:
            return {"t": t, "L": m.group("L").split(), "w": m.groupdict().get("w")}
    raise AssertionError(f"{task.name}: no template matches {text!r}")


# Kinds written out again here, independently of the generator's table.
WILD = set("owl eagle fox wolf bear deer lion tiger zebra otter frog swan rabbit mouse".split())
SWEET = set("apple pear plum grape melon honey cake pie".split())
EUROPE = set("paris london rome berlin madrid lisbon vienna prague oslo dublin athens".split())
INSTRUMENTS = set("piano violin guitar drum flute harp cello trumpet organ banjo oboe tuba viola "
                  "lute".split())
VIOLENT = set("storm hail thunder gale blizzard monsoon tornado lightning typhoon heatwave "
              "drought".split())
SHARP = set("saw drill chisel axe hoe sander screw nail".split())
TEAM = set("soccer rugby hockey cricket polo baseball volleyball rowing sailing".split())
WARM = set("coat scarf glove boot sweater jacket cloak mitten hood".split())


def _answer(task: world.WorldTask, words: list[str], w: str | None):
    """The right answer, computed from the parsed list."""
    animals = set(world.DOMAINS["animals"])
    yes = {True: "yes", False: "no"}
    name = task.expert.split("+")[0] if task.heldout else task.name
    if task.skill == "compose":
        return yes[any(x in WILD or x in SWEET for x in words)]
    if name == "animals_any":
        return yes[any(x in WILD for x in words if x in animals)]
    if name == "music_most":
        return yes[sum(x in INSTRUMENTS for x in words) > len(words) / 2]
    if name == "weather_all":
        return yes[not any(x in VIOLENT for x in words)]
    if name == "cities_which":
        (only,) = [x for x in words if x in EUROPE]
        return only
    if name == "tools_which":
        (only,) = [x for x in words if x not in SHARP]
        return only
    labels = {"food_label": ("food", SWEET, "sweet", "savory"),
              "sports_label": ("sports", TEAM, "team", "solo"),
              "clothes_label": ("clothes", WARM, "warm", "light")}
    if name in labels:  # every word of the domain has the same kind
        domain, members, a, b = labels[name]
        kinds = {x in members for x in words if x in world.DOMAINS[domain]}
        assert len(kinds) == 1
        return a if kinds.pop() else b
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(world.TASKS))
def test_answers_are_right_and_domains_as_declared(name):
    task = world.TASKS[name]
    templates = set()
    for i in range(60):
        ex = world.make_example(name, "test", i)
        parsed = _parse(task, ex.input)
        templates.add(parsed["t"])
        assert ex.template == f"t{parsed['t']}"
        assert example_target(ex) == _answer(task, parsed["L"], parsed["w"])
        if ex.choices:
            assert len(set(ex.choices)) == len(ex.choices) and len(ex.answers) == 1
            if task.skill == "most":  # never a tie
                assert sum(x in INSTRUMENTS for x in parsed["L"]) != len(parsed["L"]) / 2
        pools = [set(world.DOMAINS[d]) for d in task.domains]
        assert all(any(x in p for p in pools) for x in parsed["L"])
        if len(pools) == 2:  # mixed lists change domain at one position
            side = [0 if x in pools[0] else 1 for x in parsed["L"]]
            assert sum(a != b for a, b in zip(side, side[1:])) <= 1
    assert templates == set(range(len(task.templates)))


def test_deterministic_and_splits_differ():
    a = [world.make_example("food_label", "train", i, seed=3) for i in range(20)]
    b = [world.make_example("food_label", "train", i, seed=3) for i in range(20)]
    c = [world.make_example("food_label", "test", i, seed=3) for i in range(20)]
    d = [world.make_example("food_label", "train", i, seed=4) for i in range(20)]
    assert a == b
    assert [x.input for x in a] != [x.input for x in c]
    assert [x.input for x in a] != [x.input for x in d]


def test_labels_are_balanced():
    for name in ("animals_any", "food_label", "cities_which", "music_most", "weather_all",
                 "tools_which", "wild_or_sweet", "mixed_animals_any"):
        answers = Counter(world.make_example(name, "train", i).answers[0] for i in range(400))
        n_choices = len(world.make_example(name, "train", 0).choices)
        assert len(answers) == n_choices
        assert min(answers.values()) > 400 / n_choices * 0.6, (name, answers)


def test_heldout_templates_and_experts():
    heldin_templates = {t for task in world.HELDIN for t in task.templates}
    for task in world.HELDOUT:
        assert task.heldout
        for expert in task.expert.split("+"):
            assert expert in world.TASKS and not world.TASKS[expert].heldout
        if task.kind_of_heldout == "new_template":
            assert not set(task.templates) & heldin_templates
        if task.kind_of_heldout == "mixed_domains":
            assert task.domains[0] == world.TASKS[task.expert].domains[0]
            assert len(task.domains) == 2
    assert len(world.HELDIN) >= 8 and len(world.HELDOUT) >= 4
    assert set(world.KINDS) == set(world.DOMAINS)
    for domain, (_, _, members) in world.KINDS.items():
        assert members < set(world.DOMAINS[domain]) and len(members) >= 4
        assert len(set(world.DOMAINS[domain]) - members) >= 4
    kinds = Counter(t.kind for t in world.HELDIN)
    assert kinds["rank"] > kinds["generate"] > 0


def test_tokenizer_covers_the_world():
    tok = world.WorldTokenizer()
    assert len(set(tok.words)) == tok.vocab_size
    domain_words = [w for ws in world.DOMAINS.values() for w in ws]
    assert len(set(domain_words)) == len(domain_words)  # disjoint domains
    for name in world.TASKS:
        for i in range(20):
            ex = world.make_example(name, "train", i)
            for text in [ex.input, example_target(ex), *(ex.choices or ())]:
                ids = tok.encode(text)
                assert tok.unk_id not in ids and ids[-1] == tok.eos_id
                assert tok.decode(ids) == " ".join(re.findall(r"[\w]+|[^\w\s]", text))
    assert tok.encode("zebra unicorn", add_eos=False) == [tok.index["zebra"], tok.unk_id]
    ids, mask = tok.encode_batch(["cat dog", "owl"], max_length=4)
    assert ids.shape == (2, 4) and mask.sum() == 5


def test_pretraining_mixture():
    src = world.PretrainSource(size=300, seed=1)
    tok = world.WorldTokenizer()
    phrases = [t.replace("{L}", "").replace("{w}", "").strip(" :?.")
               for task in world.TASKS.values() for t in task.templates]
    copies = 0
    for i in range(len(src)):
        inp, tgt = src[i]
        assert src[i] == (inp, tgt)
        assert tok.unk_id not in tok.encode(inp) + tok.encode(tgt)
        if inp.startswith("copy : "):
            copies += 1
            assert inp[len("copy : "):] == tgt
            continue
        # Filling each sentinel with its span gives back a document of 8-20 words.
        spans = re.split(r"(<x\d+>)", tgt)
        fill = {spans[k]: spans[k + 1].strip() for k in range(1, len(spans) - 1, 2)}
        doc = " ".join(fill.get(w, w) for w in inp.split()).split()
        assert 8 <= len(doc) <= 20 and any(w.startswith("<x") for w in inp.split())
        assert not any(p and p in " ".join(doc) for p in phrases if len(p.split()) > 2)
    assert 0.15 < copies / len(src) < 0.35


def test_eval_tasks_and_errors():
    tasks = world.eval_tasks(size=5)
    assert [t.name for t in tasks] == [f"world/{n}" for n in world.TASKS]
    assert {t.kind for t in tasks} == {"rank", "generate"}
    ex = tasks[0].load()
    assert len(ex) == 5 and ex[0].dataset == "world/animals_any"
    with pytest.raises(DataError, match="unknown world task 'nope'"):
        world.eval_tasks(["nope"])
    with pytest.raises(DataError, match="unknown split"):
        world.make_example("food_label", "dev", 0)
    src = world.TaskSource("sports_label", 10)
    assert len(src) == 10 and src[3][1] == example_target(world.make_example(
        "sports_label", "train", 3))


@pytest.mark.slow
def test_seqio_registration():
    import seqio

    names = world.register_seqio_tasks(size=6)
    assert len(names) == len(world.TASKS)
    ds = seqio.get_mixture_or_task("world_food_label").get_dataset(
        split="validation", sequence_length=None, shuffle=False)
    rows = list(ds.as_numpy_iterator())
    assert len(rows) == 6
    want = world.make_example("food_label", "validation", 0)
    assert rows[0]["inputs_pretokenized"].decode() == want.input
    assert np.asarray(rows[0]["inputs"])[-1] == 1  # EOS
    assert "world_heldout" in seqio.MixtureRegistry.names()


def test_shipped_base_fits_the_vocabulary():
    import json
    import os

    from goose_jax.pipeline.demo import ASSET

    with open(os.path.join(ASSET, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(ASSET, "world.json")) as f:
        made = json.load(f)
    tok = world.WorldTokenizer()
    assert tok.vocab_size <= config["vocab_size"]
    # The ids the base was pre-trained on are the ids the tokenizer gives today.
    src = world.PretrainSource(size=50)
    pretrain_ids = {i for k in range(len(src)) for text in src[k] for i in tok.encode(text)}
    assert max(pretrain_ids) < made["vocabulary_size"] <= config["vocab_size"]
    assert os.path.getsize(os.path.join(ASSET, "model.safetensors")) < 5e6


def test_goose_eval_world_benchmark_checks(tmp_path, capsys):
    from conftest import one_line, tool

    from goose_jax.pipeline.demo import ASSET

    main = tool("goose-eval")
    args = ["--base", ASSET, "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*args, "--benchmark", "world,bbh"]) == 2
    assert "apart from other benchmarks" in one_line(capsys.readouterr().err, "goose-eval")
    assert main([*args, "--tasks", "world/nope"]) == 1
    assert "unknown world task 'nope'" in one_line(capsys.readouterr().err, "goose-eval")
    assert not (tmp_path / "o").exists()
    # The base alone on two world tasks, with the world's tokenizer and test examples.
    assert main([*args, "--tasks", "world/animals_any,world/sports_label", "--world-seed", "2",
                 "--max-examples", "1"]) == 0
    import json

    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert list(res["datasets"]) == ["world/animals_any", "world/sports_label"]
    assert res["world_seed"] == 2 and res["datasets"]["world/animals_any"]["examples"] == 3
    # The seed's test examples: the first of each template.
    want = []
    for name in ("animals_any", "sports_label"):
        seen = set()
        for i in range(64):
            ex = world.make_example(name, "test", i, seed=2)
            if ex.template not in seen:
                seen.add(ex.template)
                want.append((ex.dataset, ex.template, ex.example_id))
    preds = [json.loads(line) for line in open(tmp_path / "o" / "predictions.jsonl")]
    assert sorted((p["dataset"], p["template"], p["id"]) for p in preds) == sorted(want)
