"""The original release's validation rule of each expert dataset: its metric and its generation
length, and the per-dataset score computed as the release computed it.

Source: r-three/phatgoose at 4fd5790, ``colm/datasets/p3_t5xl.gin`` (the ``D/<NAME>/EVAL``
scopes of the 36 T0 held-in datasets and of the seven P3 datasets in FLAN's added pool) and
``colm/datasets/flanv2_t5xl.gin`` (the ``D/<NAME>/ZS/EVAL`` scopes of the Flan 2021 tasks, the
75 NIv2 categories and the four dialog sets). Keys are those scope names.

The rules, with where the release sets each:

  * metric: ``accuracy`` for the rank-classified datasets (``interface = "mc"``); for the
    generation ones the gin's ``metrics`` list: ``["squad"]`` (ropes, adversarial QA, duorc,
    quoref), ``["bleu", "rouge"]`` (wiki_bio, cnn_dailymail, common_gen, gigaword, multi_news,
    xsum), ``["rouge"]`` (samsum, web_questions, every FLAN dataset). HotpotQA's list reads
    ``["blue", "rouge"]`` (p3_t5xl.gin:416): ``Scorer`` knows no "blue", so HotpotQA is scored by
    ROUGE-L alone, and so it is here.
  * per-dataset score (``src/procedures/evaluator.py:90-95``, ``src/data/metrics.py:235-295``):
    each metric's value is rounded to 3 decimals (``float("%.3f" % v)``, metrics.py:292-293) and
    the score is the mean of the rounded values: SQuAD gives exact match and F1 (each divided by
    100, metrics.py:241-246), so its score is their mean; BLEU + ROUGE is the mean of corpus
    BLEU and ROUGE-L.
  * ROUGE-L is ``evaluate``'s ``rouge`` with ``rouge_types=["rougeL"]`` (metrics.py:278): the
    F-measure of rouge-score without stemming (the best reference where there are several),
    aggregated over examples by a bootstrap whose median estimates the mean; goose-jax takes
    the mean itself (no resampling noise).
  * generation length: ``max_gen_length`` is HF ``generate``'s ``max_length``
    (``src/models/interface_mixin.py:254-259``), which for an encoder-decoder counts the decoder
    start token: a dataset with ``max_gen_length = n`` generates at most ``n - 1`` new tokens
    (EOS included), and so it does here (``Rule.max_new_tokens``).
  * best step: ``results["average_score"] >= best`` (evaluator.py:122-136): ties (after the
    rounding) go to the later step, as ``evaluation.validation.BestKeeper`` keeps them.

References: the release scores generations against the dataset's answer field (e.g. every
answer of adversarial QA, the summary of samsum, FLAN's ``targets``); a goose-jax validation
file's line scores against its ``target``, or against its ``references`` when the line has them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

from goose_jax.core.errors import DataError
from goose_jax.data.flan_pool import POOL_FILE
from goose_jax.evaluation.metrics import corpus_bleu, rouge_l, squad_exact, squad_f1

RELEASE = "release"          # TrainConfig.validation_rules: this module's table
DECIMALS = 3                 # the release's rounding of each metric value
METRICS = ("accuracy", "rouge_l", "squad", "bleu_rouge", "exact_match")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One dataset's validation.

    Attributes:
      metric: one of ``METRICS``.
      max_gen_length: the release's ``max_gen_length`` (0: rank classification).
    """

    metric: str
    max_gen_length: int = 0

    @property
    def max_new_tokens(self) -> int:
        """Tokens generated at most: the release's ``max_length`` less the start token."""
        return max(self.max_gen_length - 1, 1)


# p3_t5xl.gin: scope -> (metric, max_gen_length, Hugging Face path). The first 36 are the T0
# held-in experts (scripts/concatenate.py's p3_dataset_dict); the last seven are P3 datasets of
# FLAN's added pool (concatenate.py's add1_dataset_dict).
_P3 = {
    "P3AGNEWS": ("accuracy", 0, "ag_news"),
    "P3AMAZONPOLARITY": ("accuracy", 0, "amazon_polarity"),
    "P3COSMOSQA": ("accuracy", 0, "cosmos_qa"),
    "P3SAMSUM": ("rouge_l", 128, "samsum"),
    "P3QUARTZ": ("accuracy", 0, "quartz"),
    "P3ROPES": ("squad", 16, "ropes"),
    "P3WIKIBIO": ("bleu_rouge", 256, "wiki_bio"),
    "P3PAWS": ("accuracy", 0, "paws/labeled_final"),
    "P3WIKIQA": ("accuracy", 0, "wiki_qa"),
    "P3SOCIALIQA": ("accuracy", 0, "social_i_qa"),
    "P3QASC": ("accuracy", 0, "qasc"),
    "P3QUAIL": ("accuracy", 0, "quail"),
    "P3DREAM": ("accuracy", 0, "dream"),
    "P3WIQA": ("accuracy", 0, "wiqa"),
    "P3QUAREL": ("accuracy", 0, "quarel"),
    "P3SCIQ": ("accuracy", 0, "sciq"),
    "P3QUOREF": ("squad", 32, "quoref"),
    "P3DUORC": ("squad", 64, "duorc/ParaphraseRC"),
    "P3ROTTENTOMATOES": ("accuracy", 0, "rotten_tomatoes"),
    "P3YELP": ("accuracy", 0, "yelp_review_full"),
    "P3COMMONGEN": ("bleu_rouge", 64, "common_gen"),
    "P3GIGAWORD": ("bleu_rouge", 128, "gigaword"),
    "P3XSUM": ("bleu_rouge", 256, "xsum"),
    "P3MRPC": ("accuracy", 0, "glue/mrpc"),
    "P3QQP": ("accuracy", 0, "glue/qqp"),
    "P3COMMONSENSEQA": ("accuracy", 0, "commonsense_qa"),
    "P3COSE": ("accuracy", 0, "cos_e/v1.11"),
    "P3WIKIHOP": ("accuracy", 0, "wiki_hop/original"),
    "P3HOTPOTQA": ("rouge_l", 64, "hotpot_qa/fullwiki"),
    "P3APPREVIEWS": ("accuracy", 0, "app_reviews"),
    "P3TREC": ("accuracy", 0, "trec"),
    "P3MULTINEWS": ("bleu_rouge", 256, "multi_news"),
    "P3IMDB": ("accuracy", 0, "imdb"),
    "P3ADVERSARIALQA": ("squad", 128, "adversarial_qa/adversarialQA"),
    "P3CNNDAILYMAIL": ("bleu_rouge", 128, "cnn_dailymail/3.0.0"),
    "P3DBPEDIA14": ("accuracy", 0, "dbpedia_14"),
    "P3WSCFIXED": ("accuracy", 0, "super_glue/wsc.fixed"),
    "P3COPA": ("accuracy", 0, "super_glue/copa"),
    "P3HSWAG": ("accuracy", 0, "hellaswag"),
    "P3WIC": ("accuracy", 0, "super_glue/wic"),
    "P3RACEHIGH": ("accuracy", 0, "race/high"),
    "P3RACEMIDDLE": ("accuracy", 0, "race/middle"),
    "P3WEBQUESTIONS": ("rouge_l", 32, "web_questions"),
}
T0_HELDIN = tuple(list(_P3)[:36])

# flanv2_t5xl.gin: scope -> (max_gen_length, dataset path under FLANV2/). Every one is
# metrics = ["rouge"] with interface "gen".
_FLAN = {
    "FLAN2021AI2ARCEASY": (64, "Flan2021/ai2_arc/ARC-Easy:1.0.0"),
    "FLAN2021AI2ARCCHALLENGE": (64, "Flan2021/ai2_arc/ARC-Challenge:1.0.0"),
    "FLAN2021ALGEBRALINEAR1D": (4, "Flan2021/algebra__linear_1d:1.0.0"),
    "FLAN2021BOOLQ": (8, "Flan2021/bool_q:1.0.0"),
    "FLAN2021COQA": (256, "Flan2021/coqa:1.0.0"),
    "FLAN2021DEFPRONOUNRESOLUTION": (8, "Flan2021/definite_pronoun_resolution:1.1.0"),
    "FLAN2021DROP": (512, "Flan2021/drop:2.0.0"),
    "FLAN2021FIXPUNCT": (256, "Flan2021/fix_punct"),
    "FLAN2021GEMDART": (128, "Flan2021/gem/dart:1.1.0"),
    "FLAN2021GEME2ENLG": (64, "Flan2021/gem/e2e_nlg:1.1.0"),
    "FLAN2021GEMWEBNLGEN": (128, "Flan2021/gem/web_nlg_en:1.1.0"),
    "FLAN2021GEMWIKILINGUAEN": (512, "Flan2021/gem/wiki_lingua_english_en:1.1.0"),
    "FLAN2021GLUESST2": (64, "Flan2021/glue/sst2:2.0.0"),
    "FLAN2021GLUECOLA": (64, "Flan2021/glue/cola:2.0.0"),
    "FLAN2021GLUEMNLI": (8, "Flan2021/glue/mnli:2.0.0"),
    "FLAN2021GLUEQNLI": (64, "Flan2021/glue/qnli:2.0.0"),
    "FLAN2021GLUESTSB": (64, "Flan2021/glue/stsb:2.0.0"),
    "FLAN2021GLUEWNLI": (8, "Flan2021/glue/wnli:2.0.0"),
    "FLAN2021LAMBADA": (8, "Flan2021/lambada:1.0.0"),
    "FLAN2021NATURALQUESTIONSOPEN": (32, "Flan2021/natural_questions_open:1.0.0"),
    "FLAN2021NEWSROOM": (512, "Flan2021/newsroom:1.0.0"),
    "FLAN2021OPENBOOKQA": (32, "Flan2021/openbookqa:0.1.0"),
    "FLAN2021OPINIONABSTRACTSIDEBATE": (256, "Flan2021/opinion_abstracts_idebate"),
    "FLAN2021OPINIONABSTRACTSROTTENTOMATOES": (512, "Flan2021/opinion_abstracts_rotten_tomatoes"),
    "FLAN2021PARACRAWLENES": (256, "Flan2021/para_crawl_enes"),
    "FLAN2021PIQA": (256, "Flan2021/piqa:1.0.0"),
    "FLAN2021QUAC": (64, "Flan2021/quac:1.0.0"),
    "FLAN2021SENTIMENT140": (64, "Flan2021/sentiment140:1.0.0"),
    "FLAN2021SNLI": (32, "Flan2021/snli:1.1.0"),
    "FLAN2021SQUAD": (64, "Flan2021/squad/v2.0:3.0.0"),
    "FLAN2021SUPERGLUEMULTIRC": (64, "Flan2021/super_glue/multirc:1.0.2"),
    "FLAN2021SUPERGLUERECORD": (64, "Flan2021/super_glue/record:1.0.2"),
    "FLAN2021TRIVIAQA": (64, "Flan2021/trivia_qa/rc:1.1.0"),
    "FLAN2021TRUECASE": (256, "Flan2021/true_case"),
    "FLAN2021UNIFIEDQASCIENCEINST": (32, "Flan2021/unified_qa_science_inst"),
    "FLAN2021WORDSEGMENT": (256, "Flan2021/word_segment"),
    "FLAN2021WMT14TRANSLATEFREN": (512, "Flan2021/wmt14_translate/fr-en:1.0.0"),
    "FLAN2021WMT16TRANSLATECSEN": (512, "Flan2021/wmt16_translate/cs-en:1.0.0"),
    "FLAN2021WMT16TRANSLATEDEEN": (512, "Flan2021/wmt16_translate/de-en:1.0.0"),
    "FLAN2021WMT16TRANSLATERUEN": (512, "Flan2021/wmt16_translate/ru-en:1.0.0"),
    "FLAN2021WMT16TRANSLATEFIEN": (512, "Flan2021/wmt16_translate/fi-en:1.0.0"),
    "FLAN2021WMT16TRANSLATEROEN": (512, "Flan2021/wmt16_translate/ro-en:1.0.0"),
    "FLAN2021WMT16TRANSLATETREN": (512, "Flan2021/wmt16_translate/tr-en:1.0.0"),
    "FLAN2021AESLC": (512, "Flan2021/aeslc:1.0.0"),
    "NIV2TRANSLATION": (512, "NIV2/Translation"),
    "NIV2PROGRAMEXECUTION": (256, "NIV2/Program Execution"),
    "NIV2QUESTIONGENERATION": (128, "NIV2/Question Generation"),
    "NIV2SENTIMENTANALYSIS": (128, "NIV2/Sentiment Analysis"),
    "NIV2TEXTCATEGORIZATION": (16, "NIV2/Text Categorization"),
    "NIV2TEXTMATCHING": (64, "NIV2/Text Matching"),
    "NIV2TOXICLANGUAGEDETECTION": (64, "NIV2/Toxic Language Detection"),
    "NIV2CAUSEEFFECTCLASSIFICATION": (64, "NIV2/Cause Effect Classification"),
    "NIV2INFORMATIONEXTRACTION": (256, "NIV2/Information Extraction"),
    "NIV2TEXTUALENTAILMENT": (128, "NIV2/Textual Entailment"),
    "NIV2WRONGCANDIDATEGENERATION": (256, "NIV2/Wrong Candidate Generation"),
    "NIV2NAMEDENTITYRECOGNITION": (256, "NIV2/Named Entity Recognition"),
    "NIV2COMMONSENSECLASSIFICATION": (4, "NIV2/Commonsense Classification"),
    "NIV2FILLINTHEBLANK": (128, "NIV2/Fill in The Blank"),
    "NIV2TEXTCOMPLETION": (128, "NIV2/Text Completion"),
    "NIV2SENTENCECOMPOSITION": (128, "NIV2/Sentence Composition"),
    "NIV2TITLEGENERATION": (128, "NIV2/Title Generation"),
    "NIV2LANGUAGEIDENTIFICATION": (8, "NIV2/Language Identification"),
    "NIV2QUESTIONUNDERSTANDING": (32, "NIV2/Question Understanding"),
    "NIV2SENTENCEPERTURBATION": (256, "NIV2/Sentence Perturbation"),
    "NIV2ANSWERABILITYCLASSIFICATION": (4, "NIV2/Answerability Classification"),
    "NIV2SUMMARIZATION": (512, "NIV2/Summarization"),
    "NIV2COREFERENCERESOLUTION": (16, "NIV2/Coreference Resolution"),
    "NIV2TEXTQUALITYEVALUATION": (32, "NIV2/Text Quality Evaluation"),
    "NIV2TEXTTOCODE": (512, "NIV2/Text to Code"),
    "NIV2PARAPHRASING": (128, "NIV2/Paraphrasing"),
    "NIV2DIALOGUEGENERATION": (128, "NIV2/Dialogue Generation"),
    "NIV2QUESTIONREWRITING": (128, "NIV2/Question Rewriting"),
    "NIV2WORDSEMANTICS": (16, "NIV2/Word Semantics"),
    "NIV2POSTAGGING": (256, "NIV2/Pos Tagging"),
    "NIV2LINGUISTICPROBING": (4, "NIV2/Linguistic Probing"),
    "NIV2STORYCOMPOSITION": (512, "NIV2/Story Composition"),
    "NIV2SPEAKERIDENTIFICATION": (16, "NIV2/Speaker Identification"),
    "NIV2WORDANALOGY": (8, "NIV2/Word Analogy"),
    "NIV2DATATOTEXT": (128, "NIV2/Data to Text"),
    "NIV2STEREOTYPEDETECTION": (8, "NIV2/Stereotype Detection"),
    "NIV2NEGOTIATIONSTRATEGYDETECTION": (2, "NIV2/Negotiation Strategy Detection"),
    "NIV2DIALOGUEACTRECOGNITION": (8, "NIV2/Dialogue Act Recognition"),
    "NIV2GENDERCLASSIFICATION": (8, "NIV2/Gender Classification"),
    "NIV2COHERENCECLASSIFICATION": (4, "NIV2/Coherence Classification"),
    "NIV2EXPLANATION": (512, "NIV2/Explanation"),
    "NIV2ETHICSCLASSIFICATION": (8, "NIV2/Ethics Classification"),
    "NIV2WORDRELATIONCLASSIFICATION": (8, "NIV2/Word Relation Classification"),
    "NIV2SENTENCEORDERING": (8, "NIV2/Sentence Ordering"),
    "NIV2ANSWERVERIFICATION": (4, "NIV2/Answer Verification"),
    "NIV2MATHEMATICS": (8, "NIV2/Mathematics"),
    "NIV2INTENTIDENTIFICATION": (32, "NIV2/Intent Identification"),
    "NIV2KEYWORDTAGGING": (16, "NIV2/Keyword Tagging"),
    "NIV2CODETOTEXT": (128, "NIV2/Code to Text"),
    "NIV2DIALOGUESTATETRACKING": (8, "NIV2/Dialogue State Tracking"),
    "NIV2TEXTSIMPLIFICATION": (128, "NIV2/Text Simplification"),
    "NIV2STANCEDETECTION": (4, "NIV2/Stance Detection"),
    "NIV2FACTVERIFICATION": (4, "NIV2/Fact Verification"),
    "NIV2GRAMMARERRORDETECTION": (512, "NIV2/Grammar Error Detection"),
    "NIV2SECTIONCLASSIFICATION": (128, "NIV2/Section Classification"),
    "NIV2NUMBERCONVERSION": (64, "NIV2/Number Conversion"),
    "NIV2STYLETRANSFER": (64, "NIV2/Style Transfer"),
    "NIV2SPEAKERRELATIONCLASSIFICATION": (4, "NIV2/Speaker Relation Classification"),
    "NIV2IRONYDETECTION": (4, "NIV2/Irony Detection"),
    "NIV2QUESTIONDECOMPOSITION": (256, "NIV2/Question Decomposition"),
    "NIV2OVERLAPEXTRACTION": (64, "NIV2/Overlap Extraction"),
    "NIV2GRAMMARERRORCORRECTION": (512, "NIV2/Grammar Error Correction"),
    "NIV2SPELLINGERRORDETECTION": (16, "NIV2/Spelling Error Detection"),
    "NIV2ENTITYGENERATION": (16, "NIV2/Entity Generation"),
    "NIV2SENTENCEEXPANSION": (128, "NIV2/Sentence Expansion"),
    "NIV2DISCOURSECONNECTIVEIDENTIFICATION": (8, "NIV2/Discourse Connective Identification"),
    "NIV2DISCOURSERELATIONCLASSIFICATION": (16, "NIV2/Discourse Relation Classification"),
    "NIV2POEMGENERATION": (512, "NIV2/Poem Generation"),
    "NIV2ENTITYRELATIONCLASSIFICATION": (2, "NIV2/Entity Relation Classification"),
    "NIV2PUNCTUATIONERRORDETECTION": (4, "NIV2/Punctuation Error Detection"),
    "NIV2SPAMCLASSIFICATION": (4, "NIV2/Spam Classification"),
    "NIV2PAPERREVIEW": (2, "NIV2/Paper Review"),
    "NIV2SENTENCECOMPRESSION": (128, "NIV2/Sentence Compression"),
    "NIV2PREPOSITIONPREDICTION": (2, "NIV2/Preposition Prediction"),
    "NIV2MISC": (256, "NIV2/Misc."),
    "DIALOGQRECC": (128, "Dialog/qrecc"),
    "DIALOGQRECCII": (512, "Dialog/qrecc_ii"),
    "DIALOGWIKIDIALOG": (512, "Dialog/wiki_dialog"),
    "DIALOGWIKIDIALOGII": (512, "Dialog/wiki_dialog_ii"),
}

RULES: dict[str, Rule] = {
    **{k: Rule(m, n) for k, (m, n, _) in _P3.items()},
    **{k: Rule("rouge_l", n) for k, (n, _) in _FLAN.items()},
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _aliases(scope: str, path: str) -> set[str]:
    """The names an expert of ``scope`` may go by: the scope itself, its name in the release's
    ``scripts/concatenate.py`` and bare, its dataset path (whole, last part, without a
    ``:version``), all compared lower-case without punctuation."""
    names = {scope, path, path.split(":")[0]}
    family, _, rest = path.partition("/")
    if family in ("Flan2021", "NIV2", "Dialog"):
        names |= {rest, rest.split(":")[0], rest.split("/")[-1].split(":")[0]}
    else:
        names.add(path.split("/")[0])
    for prefix, release in (("P3", "P3"), ("FLAN2021", "Flanv2zs"), ("NIV2", "Niv2zs"),
                            ("DIALOG", "Flanv2zs")):
        if scope.startswith(prefix):
            bare = scope[len(prefix):]
            names |= {bare, release + bare}
    return {_norm(n) for n in names} - {""}


def _index() -> dict[str, str]:
    owners: dict[str, set[str]] = {}
    for scope, (_, _, path) in _P3.items():
        for a in _aliases(scope, path):
            owners.setdefault(a, set()).add(scope)
    for scope, (_, path) in _FLAN.items():
        for a in _aliases(scope, path):
            owners.setdefault(a, set()).add(scope)
    index = {a: next(iter(s)) for a, s in owners.items() if len(s) == 1}   # ambiguous: none
    # The release's own expert names (scripts/concatenate.py, as the packaged pool table records
    # them with their gin scope) name their scope even where they abbreviate it
    # (Flanv2zsOpinionabstractidebate: FLAN2021OPINIONABSTRACTSIDEBATE).
    with open(POOL_FILE, encoding="utf-8") as f:
        for e in json.load(f)["experts"]:
            scope = e["config"].split("/")[0]
            if scope in _P3 or scope in _FLAN:
                index.setdefault(_norm(e["name"]), scope)
    return index


ALIASES = _index()


def scope_of(name: str) -> str | None:
    """The release scope an expert name stands for, or None."""
    return ALIASES.get(_norm(name))


def rules_for(names: Sequence[str], *, where: str = "validation") -> list[Rule]:
    """Each expert's release rule, in ``names`` order.

    Raises:
      DataError: names that match no release dataset, all listed.
    """
    scopes = [scope_of(n) for n in names]
    missing = [n for n, s in zip(names, scopes) if s is None]
    if missing:
        raise DataError(f"{where}: validation_rules='release' knows no release dataset named "
                        f"{', '.join(missing)} (expected names such as ag_news, P3AGNEWS, "
                        "ai2_arc/ARC-Easy, NIV2 categories); rename the experts or set "
                        "validation_rules to ''")
    return [RULES[s] for s in scopes]


def _rounded(value: float, decimals: int | None) -> float:
    return value if decimals is None else float(f"{value:.{decimals}f}")


def dataset_score(metric: str, predictions: Sequence, references: Sequence[Sequence[str]] = (),
                  decimals: int | None = DECIMALS) -> float:
    """One dataset's validation score in [0, 1], as the release's ``Scorer`` and ``Evaluator``
    compute it (see the module doc).

    Args:
      metric: one of ``METRICS``.
      predictions: per example, the generated text; for ``accuracy``, 1.0 / 0.0 per example.
      references: per example, its reference texts (generation metrics).
      decimals: each metric value's rounding (None: none).
    """
    n = len(predictions)
    if n == 0:
        return 0.0
    if metric == "accuracy":
        return _rounded(sum(predictions) / n, decimals)
    pairs = list(zip(predictions, references))
    if len(pairs) != n:
        raise DataError(f"{metric}: {n} predictions, {len(references)} reference lists")
    if metric == "exact_match":
        return _rounded(sum(float(p.strip() == r[0].strip()) for p, r in pairs) / n, decimals)
    rouge = sum(rouge_l(p, r) for p, r in pairs) / n if metric in (
        "rouge_l", "bleu_rouge") else 0.0
    if metric == "rouge_l":
        return _rounded(rouge, decimals)
    if metric == "bleu_rouge":
        bleu = corpus_bleu(list(predictions), [list(r) for r in references])
        return (_rounded(bleu, decimals) + _rounded(rouge, decimals)) / 2
    if metric == "squad":
        em = sum(squad_exact(p, r) for p, r in pairs) / n
        f1 = sum(squad_f1(p, r) for p, r in pairs) / n
        return (_rounded(em, decimals) + _rounded(f1, decimals)) / 2
    raise DataError(f"unknown validation metric {metric!r}; expected one of {METRICS}")
