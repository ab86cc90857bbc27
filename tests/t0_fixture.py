"""The T0 held-in fixture of the source tests: every P3 task folder of the 36 held-in datasets
under its real name (tests/data/p3_heldin_folders.txt) with a few records each, plus the
Hugging Face copies of the two datasets P3 lacks (CommonsenseQA saved with ``save_to_disk``,
HotpotQA full-wiki as parquet files) and their promptsource template files."""

import os

from goose_jax.data.synthetic import write_p3

HERE = os.path.dirname(os.path.abspath(__file__))
FOLDERS_FILE = os.path.join(HERE, "data", "p3_heldin_folders.txt")
TEST_SPLIT = ("ag_news", "amazon_polarity", "dbpedia_14", "imdb", "yelp_review_full", "trec")
APP_REVIEWS = 10_002   # the release keeps the first 10,000 shuffled reviews for validation


def real_folders() -> list[str]:
    with open(FOLDERS_FILE, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def _eval_split(folder: str) -> str | None:
    if folder.startswith("app_reviews_"):
        return None
    if folder.startswith("wiki_bio_"):
        return "val"
    return "test" if folder.startswith(TEST_SPLIT) else "validation"


def write_real_p3(root: str, app_reviews: int = 2, eval_splits: bool = True) -> None:
    """One train record and one evaluation record per folder (trec's two label folders in the
    form the 50-way template is rebuilt from; app_reviews with ``app_reviews`` reviews: more than
    10,000 for its split to leave training rows). Without ``eval_splits`` only adversarial
    QA's and trec's folders get their evaluation split (the others' are not read by the tests)."""
    questions = [("Who was Lincoln ?", "Individual", "Person"),
                 ("How far is the moon ?", "Distance", "Quantity")]
    coarse = ["Description", "Entity", "Abbreviation", "Person", "Quantity", "Location"]
    for folder in real_folders():
        full = eval_splits or folder.startswith(("adversarial_qa_", "trec_"))
        splits = ["train"] + [s for s in [_eval_split(folder)] if s and full]
        for split in splits:
            if folder == "trec_fine_grained_open":
                recs = [{"inputs_pretokenized": f"What is this question asking for?\n\n{q}",
                         "targets_pretokenized": fine} for q, fine, _ in questions]
            elif folder == "trec_pick_the_best_descriptor":
                recs = [{"inputs_pretokenized": f"Question: {q}\n\nDescriptors: "
                                                f"{', '.join(coarse)}\n\nBest Descriptor?",
                         "targets_pretokenized": c, "answer_choices": coarse}
                        for q, _, c in questions]
            elif folder.startswith("app_reviews_"):
                recs = [{"inputs_pretokenized": f"{folder} {i}", "targets_pretokenized": "4",
                         "answer_choices": ["1", "2", "3", "4", "5"]} for i in range(app_reviews)]
            else:
                recs = [{"inputs_pretokenized": f"{folder} {split} 0",
                         "targets_pretokenized": "yes", "answer_choices": ["no", "yes"]}]
            write_p3(root, folder, split, recs)


TEMPLATES = {
    ("commonsense_qa",): """dataset: commonsense_qa
templates:
  1e1d0faf-e6d4-4c8a-a6f3-8dfc8ab4cd4b: !Template
    answer_choices: '{{ choices.text | join("|||") }}'
    id: 1e1d0faf-e6d4-4c8a-a6f3-8dfc8ab4cd4b
    jinja: "{{ question }}\\n{% for c in answer_choices %}- {{ c }}\\n{% endfor %}|||\\
      {{ answer_choices[choices['label'].index(answerKey)] }}"
    metadata: !TemplateMetadata
      choices_in_prompt: true
      original_task: true
    name: answer_given_question_without_options
    reference: ''
  2a0e2b4b-b6c0-4c8e-9a2f-1b1f44b1a0c2: !Template
    answer_choices: null
    id: 2a0e2b4b-b6c0-4c8e-9a2f-1b1f44b1a0c2
    jinja: 'Ask a question whose answer is {{ choices.text[choices.label.index(answerKey)] }}.
      ||| {{ question }}'
    metadata: !TemplateMetadata
      original_task: false
    name: question_to_answer_index
    reference: ''
""",
    ("hotpot_qa", "fullwiki"): """dataset: hotpot_qa
subset: fullwiki
templates:
  5a3a0f1e-6f0c-4d4a-9d55-3c7e1b8f2a10: !Template
    answer_choices: null
    id: 5a3a0f1e-6f0c-4d4a-9d55-3c7e1b8f2a10
    jinja: "{% for t, s in zip(context.title, context.sentences) %}\\
      {{ t }}: {{ s | join(' ') }}\\n{% endfor %}Question: {{ question }} ||| {{ answer }}"
    metadata: !TemplateMetadata
      original_task: true
    name: generate_answer_interrogative
    reference: ''
""",
}


def commonsense_rows(n: int, tag: str) -> list[dict]:
    return [{"id": f"{tag}{i}", "question": f"Where is goose {tag} {i}?", "question_concept": "x",
             "choices": {"label": ["A", "B", "C"], "text": ["river", "sky", "desk"]},
             "answerKey": "ABC"[i % 3]} for i in range(n)]


def hotpot_rows(n: int, tag: str) -> list[dict]:
    return [{"id": f"{tag}{i}", "question": f"Which river {tag} {i}?", "answer": f"Nile {i}",
             "type": "bridge", "level": "easy",
             "supporting_facts": {"title": ["A"], "sent_id": [0]},
             "context": {"title": ["A", "B"], "sentences": [["One.", "Two."], [f"Three {i}."]]}}
            for i in range(n)]


def write_templates(root: str, which=TEMPLATES) -> str:
    for parts, text in which.items():
        folder = os.path.join(root, "promptsource", "templates", *parts)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "templates.yaml"), "w", encoding="utf-8") as f:
            f.write(text)
    return root


def write_hf_lacking(hf_dir: str) -> str:
    """CommonsenseQA saved with ``save_to_disk``; HotpotQA full-wiki as Hub-style parquet."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(commonsense_rows(4, "t")),
        "validation": datasets.Dataset.from_list(commonsense_rows(2, "v")),
    }).save_to_disk(os.path.join(hf_dir, "commonsense_qa"))
    folder = os.path.join(hf_dir, "hotpot_qa", "fullwiki")
    os.makedirs(folder, exist_ok=True)
    for split, rows in (("train", hotpot_rows(3, "t")), ("validation", hotpot_rows(2, "v"))):
        pq.write_table(pa.Table.from_pylist(rows),
                       os.path.join(folder, f"{split}-00000-of-00001.parquet"))
    return hf_dir


def write_all(base: str, app_reviews: int = 2, eval_splits: bool = True
              ) -> tuple[str, str, str]:
    """``(p3_root, hf_dir, templates)`` under ``base``."""
    p3_root, hf_dir, templates = (os.path.join(base, n) for n in ("P3", "HF", "promptsource"))
    write_real_p3(p3_root, app_reviews, eval_splits)
    write_hf_lacking(hf_dir)
    write_templates(templates)
    return p3_root, hf_dir, templates


if __name__ == "__main__":
    import sys

    print(write_all(sys.argv[1], APP_REVIEWS))
