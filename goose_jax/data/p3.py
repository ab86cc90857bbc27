"""P3 (bigscience/P3) in its released layout, read from local disk with TensorFlow.

Layout: one folder per prompted task, ``<root>/data/<dataset>_<subset>_<template>/`` (``<root>``
itself may hold the folders), as seqio caches write them:

    super_glue_rte_GPT_3_style/
        train.tfrecord-00000-of-00001   validation.tfrecord-00000-of-00001
        info.train.json  info.validation.json  stats.train.json  stats.validation.json

Features: ``inputs`` / ``targets`` (int token ids), ``inputs_pretokenized`` /
``targets_pretokenized`` (strings), ``answer_choices`` (string list) for tasks with choices, and
for ``<task>_score_eval`` folders one record per (example, choice) with ``idx`` = [example,
choice], ``is_correct`` and ``weight``. ``info.<split>.json`` gives each feature's dtype and shape
(int32 and bool are stored as int64 in the records).

Template names cannot be listed offline (promptsource is not needed), so tasks are discovered
on disk by the folder prefix of each dataset (``DatasetPrefix``) with explicit tables for the
11 T0 held-out and the 36 T0 held-in datasets. TensorFlow is imported inside functions only.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
from collections.abc import Iterator

from goose_jax.core.errors import DataError
from goose_jax.data.examples import Example

SCORE_EVAL = "_score_eval"
# Features stored as one value per record (used when a folder has no info.<split>.json).
_SCALARS = ("inputs_pretokenized", "targets_pretokenized", "is_correct", "weight")


@dataclasses.dataclass(frozen=True)
class DatasetPrefix:
    """How the P3 folders of one dataset are named: ``<prefix><template><suffix>``.

    Attributes:
      prefix: folder name prefix, e.g. ``super_glue_rte_``.
      suffix: folder name suffix before ``_score_eval`` (ANLI rounds: ``_r1``).
      splits: evaluation splits in order of preference (the first present is used).
      exclude: templates left out (the original evaluation drops four COPA templates).
    """

    prefix: str
    suffix: str = ""
    splits: tuple[str, ...] = ("validation",)
    exclude: tuple[str, ...] = ()


# T0 held-out (PHATGOOSE.md section 7): every original-task template, validation split
# (StoryCloze 2016: test, as the original evaluation).
T0_HELDOUT: dict[str, DatasetPrefix] = {
    "rte": DatasetPrefix("super_glue_rte_"),
    "hellaswag": DatasetPrefix("hellaswag_"),
    "copa": DatasetPrefix("super_glue_copa_", exclude=(
        "_which_may_be_caused_by", "_What_could_happen_next_C1_or_C2_",
        "_As_a_result_C1_or_C2_", "_why_C1_or_C2")),
    "wic": DatasetPrefix("super_glue_wic_"),
    "winogrande": DatasetPrefix("winogrande_winogrande_xl_"),
    "cb": DatasetPrefix("super_glue_cb_"),
    "story_cloze": DatasetPrefix("story_cloze_2016_", splits=("test", "validation")),
    "anli_r1": DatasetPrefix("anli_", suffix="_r1"),
    "anli_r2": DatasetPrefix("anli_", suffix="_r2"),
    "anli_r3": DatasetPrefix("anli_", suffix="_r3"),
    "wsc": DatasetPrefix("super_glue_wsc.fixed_"),
}

# T0 held-in, the 36 expert datasets, in the original release's expert order.
_TEST_SPLIT = ("test", "validation")
T0_HELDIN: dict[str, DatasetPrefix] = {
    "ag_news": DatasetPrefix("ag_news_", splits=_TEST_SPLIT),
    "amazon_polarity": DatasetPrefix("amazon_polarity_", splits=_TEST_SPLIT),
    "cosmos_qa": DatasetPrefix("cosmos_qa_"),
    "samsum": DatasetPrefix("samsum_"),
    "quartz": DatasetPrefix("quartz_"),
    "ropes": DatasetPrefix("ropes_"),
    "wiki_bio": DatasetPrefix("wiki_bio_"),
    "paws": DatasetPrefix("paws_labeled_final_"),
    "wiki_qa": DatasetPrefix("wiki_qa_"),
    "social_i_qa": DatasetPrefix("social_i_qa_"),
    "qasc": DatasetPrefix("qasc_"),
    "quail": DatasetPrefix("quail_"),
    "dream": DatasetPrefix("dream_"),
    "wiqa": DatasetPrefix("wiqa_"),
    "quarel": DatasetPrefix("quarel_"),
    "sciq": DatasetPrefix("sciq_"),
    "quoref": DatasetPrefix("quoref_"),
    "duorc": DatasetPrefix("duorc_ParaphraseRC_"),
    "rotten_tomatoes": DatasetPrefix("rotten_tomatoes_"),
    "yelp_review_full": DatasetPrefix("yelp_review_full_", splits=_TEST_SPLIT),
    "common_gen": DatasetPrefix("common_gen_"),
    "gigaword": DatasetPrefix("gigaword_"),
    "xsum": DatasetPrefix("xsum_"),
    "mrpc": DatasetPrefix("glue_mrpc_"),
    "qqp": DatasetPrefix("glue_qqp_"),
    # P3 has no CommonsenseQA folders (only CoS-E's, below): the build takes it from the
    # Hugging Face copy.
    "commonsense_qa": DatasetPrefix("commonsense_qa_"),
    "cos_e": DatasetPrefix("cos_e_v1.11_"),
    "wiki_hop": DatasetPrefix("wiki_hop_original_"),
    # P3 stores its HotpotQA templates under KILT's closed-book copy of the dataset (the release
    # trains on hotpot_qa/fullwiki with its context paragraphs: the build takes that copy).
    "hotpot_qa": DatasetPrefix("kilt_tasks_hotpotqa_"),
    "app_reviews": DatasetPrefix("app_reviews_"),
    "trec": DatasetPrefix("trec_", splits=_TEST_SPLIT),
    "multi_news": DatasetPrefix("multi_news_"),
    "imdb": DatasetPrefix("imdb_", splits=_TEST_SPLIT),
    # P3 publishes adversarial QA as its three subsets (dbidaf, dbert, droberta); the
    # release's adversarialQA is their union.
    "adversarial_qa": DatasetPrefix("adversarial_qa_"),
    "cnn_dailymail": DatasetPrefix("cnn_dailymail_3.0.0_"),
    "dbpedia_14": DatasetPrefix("dbpedia_14_", splits=_TEST_SPLIT),
}


# --- folders ------------------------------------------------------------------------------------


def data_dir(root: str | os.PathLike) -> str:
    """The folder that holds the task folders: ``<root>/data`` if present, else ``<root>``."""
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise DataError(f"{root}: P3 directory does not exist (expected the P3 release with "
                        "one folder per prompted task under data/)")
    sub = os.path.join(root, "data")
    return sub if os.path.isdir(sub) else root


def list_tasks(root: str | os.PathLike) -> list[str]:
    """Every P3 task folder name under ``root``, sorted."""
    folder = data_dir(root)
    return sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))


def templates(root: str | os.PathLike, spec: DatasetPrefix,
              score_eval: bool | None = None) -> dict[str, str]:
    """``{template: folder}`` for one dataset.

    Args:
      root: the P3 root.
      spec: the dataset's folder naming.
      score_eval: True: only ``_score_eval`` folders; False: only plain ones; None: prefer the
        ``_score_eval`` folder of a template and fall back to the plain one.
    """
    found: dict[str, dict[bool, str]] = {}
    for name in list_tasks(root):
        if not name.startswith(spec.prefix):
            continue
        base, is_score = name, name.endswith(SCORE_EVAL)
        if is_score:
            base = base[:-len(SCORE_EVAL)]
        if spec.suffix:
            if not base.endswith(spec.suffix):
                continue
            base = base[:-len(spec.suffix)]
        template = base[len(spec.prefix):]
        if template and template not in spec.exclude:
            found.setdefault(template, {})[is_score] = name
    out = {}
    for template, kinds in sorted(found.items()):
        if score_eval is None:
            out[template] = kinds.get(True) or kinds[False]
        elif score_eval in kinds:
            out[template] = kinds[score_eval]
    return out


def task_dir(root: str | os.PathLike, task: str) -> str:
    """The folder of P3 task ``task`` under ``root``; raises DataError when it does not exist."""
    path = os.path.join(data_dir(root), task)
    if not os.path.isdir(path):
        raise DataError(f"{path}: P3 task folder does not exist")
    return path


def splits(path: str) -> list[str]:
    """The splits that have TFRecord shards in a task folder."""
    names = {os.path.basename(f).split(".tfrecord")[0]
             for f in glob.glob(os.path.join(path, "*.tfrecord*"))}
    return sorted(names)


def pick_split(path: str, preferred: tuple[str, ...]) -> str:
    """The first of ``preferred`` that has TFRecord shards in ``path``; raises DataError when none
    has."""
    have = splits(path)
    for s in preferred:
        if s in have:
            return s
    raise DataError(f"{path}: none of the splits {list(preferred)} has TFRecord files "
                    f"(found splits: {have or 'none'})")


def _shards(path: str, split: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, f"{split}.tfrecord*")))
    if not files:
        raise DataError(f"{path}: no {split}.tfrecord-* files (found splits: "
                        f"{splits(path) or 'none'})")
    return files


# --- reading ------------------------------------------------------------------------------------


def feature_spec(path: str, split: str) -> dict[str, dict]:
    """``{feature: {"dtype", "shape"}}`` from ``info.<split>.json``, else from the first record."""
    info = os.path.join(path, f"info.{split}.json")
    if os.path.isfile(info):
        try:
            with open(info, encoding="utf-8") as f:
                feats = json.load(f)["features"]
            return {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in feats.items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{info}: unreadable P3 info file ({type(e).__name__}: {e})") from None
    import tensorflow as tf

    first = next(iter(tf.data.TFRecordDataset(_shards(path, split)).take(1)), None)
    if first is None:
        return {}
    proto = tf.train.Example.FromString(first.numpy())
    spec = {}
    for name, feat in proto.features.feature.items():
        kind = feat.WhichOneof("kind")
        dtype = {"bytes_list": "string", "int64_list": "int64", "float_list": "float32"}[kind]
        spec[name] = {"dtype": dtype, "shape": [] if name in _SCALARS else [None]}
    return spec


def _tf_feature(dtype: str, shape: list):
    import tensorflow as tf

    stored = {"string": tf.string, "float32": tf.float32}.get(dtype, tf.int64)
    if shape and shape[0] is None:
        return tf.io.FixedLenSequenceFeature(shape[1:], stored, allow_missing=True)
    return tf.io.FixedLenFeature(shape, stored)


def tf_dataset(path: str, split: str):
    """A ``tf.data.Dataset`` of parsed records, with int32 / bool features cast back."""
    import tensorflow as tf

    spec = feature_spec(path, split)
    if not spec:
        return tf.data.Dataset.from_tensor_slices({})
    description = {k: _tf_feature(v["dtype"], v["shape"]) for k, v in spec.items()}

    def parse(raw):
        ex = tf.io.parse_single_example(raw, description)
        return {k: tf.cast(v, spec[k]["dtype"]) if spec[k]["dtype"] in ("int32", "bool") else v
                for k, v in ex.items()}

    return tf.data.TFRecordDataset(_shards(path, split)).map(parse)


def _py(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_py(v) for v in value]
    return value


def check_framing(shard: str) -> int:
    """The number of records in a TFRecord file, after checking that its records' length
    headers tile the file exactly (TensorFlow reads a file cut short as if it ended early).

    Raises:
      DataError: a truncated file, naming it and the record that runs past its end.
    """
    size, pos, count = os.path.getsize(shard), 0, 0
    with open(shard, "rb") as f:
        while pos < size:
            header = f.read(12)  # uint64 length, uint32 masked CRC of the length
            end = pos + 12 + (struct.unpack("<Q", header[:8])[0] if len(header) == 12 else 0) + 4
            if len(header) < 12 or end > size:
                raise DataError(f"{shard}: truncated TFRecord file (record {count} runs past "
                                f"its end at byte {size}); download the file again")
            pos, count = end, count + 1
            f.seek(pos)
    return count


def read_records(path: str, split: str) -> Iterator[dict]:
    """The records of one split as plain Python values (str, int, bool, lists)."""
    import tensorflow as tf

    for shard in _shards(path, split):
        if not check_framing(shard):
            raise DataError(f"{shard}: empty TFRecord file (no records); download it again")
    try:
        for ex in tf_dataset(path, split).as_numpy_iterator():
            yield {k: _py(v) for k, v in ex.items()}
    except tf.errors.OpError as e:
        raise DataError(f"{path}: cannot read the {split} TFRecords: "
                        f"{' '.join(str(e.message).split())}") from None


def examples(path: str, split: str, *, dataset: str, template: str) -> list[Example]:
    """The examples of one P3 task folder and split.

    ``_score_eval`` records are grouped by ``idx[0]`` into one example whose choices are the
    records' targets in ``idx[1]`` order and whose answers are the records with ``is_correct``.
    Plain records with ``answer_choices`` become rank examples (the answer is the choice equal to
    the target); without choices they are generation examples with the target as reference.
    """
    records = list(read_records(path, split))
    if records and "idx" in records[0] and "is_correct" in records[0]:
        grouped: dict[int, dict[int, dict]] = {}
        for r in records:
            grouped.setdefault(int(r["idx"][0]), {})[int(r["idx"][1])] = r
        out = []
        for ex_id, by_choice in sorted(grouped.items()):
            rows = [by_choice[c] for c in sorted(by_choice)]
            choices = tuple(r["targets_pretokenized"].strip() for r in rows)
            answers = tuple(i for i, r in enumerate(rows) if r["is_correct"])
            out.append(Example(rows[0]["inputs_pretokenized"], choices, answers, (), dataset,
                               template, str(ex_id)))
        return out
    out = []
    for i, r in enumerate(records):
        target = r.get("targets_pretokenized", "").strip()
        choices = tuple(c.strip() for c in r.get("answer_choices") or ()) or None
        answers = tuple(j for j, c in enumerate(choices or ()) if c == target)
        out.append(Example(r.get("inputs_pretokenized", ""), choices, answers,
                           (target,) if target else (), dataset, template, str(i)))
    return out


def has_choices(path: str, split: str) -> bool:
    """Whether a task folder's records carry answer choices (rank) or not (generation)."""
    spec = feature_spec(path, split)
    return "answer_choices" in spec or "is_correct" in spec
