"""The byte tokenizer, and the HF T5 tokenizer behind the same interface (built offline here)."""

import json

import numpy as np
import pytest

from goose_jax.core.errors import CheckpointError
from goose_jax.data.tokenizers import ByteTokenizer, load_hf_tokenizer

TEXT = "Grüße, 世界! naïve café 🦢"


def test_byte_round_trip_unicode():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids[-1] == tok.eos_id == 1
    assert ids[:-1] == [b + 3 for b in TEXT.encode("utf-8")]
    assert max(ids) < tok.vocab_size == 259
    assert tok.decode(ids) == TEXT
    assert tok.encode(TEXT, add_eos=False) == ids[:-1]
    # Decoding stops at EOS and skips padding and the unknown id.
    assert tok.decode([0] + tok.encode("ab") + tok.encode("cd")) == "ab"
    assert tok.decode([ord("x") + 3, 2, ord("y") + 3]) == "xy"


def test_byte_batch_padding_truncation_and_eos():
    tok = ByteTokenizer()
    ids_BxL, mask_BxL = tok.encode_batch(["hi", "", "abcdefgh"], max_length=5)
    assert ids_BxL.dtype == np.int32 and ids_BxL.shape == (3, 5) and mask_BxL.shape == (3, 5)
    h, i, a = ord("h") + 3, ord("i") + 3, ord("a") + 3
    np.testing.assert_array_equal(ids_BxL[0], [h, i, 1, 0, 0])
    np.testing.assert_array_equal(ids_BxL[1], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(ids_BxL[2], [a, a + 1, a + 2, a + 3, 1])  # EOS kept last
    np.testing.assert_array_equal(mask_BxL, [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1] * 5])
    ids_BxL, mask_BxL = tok.encode_batch(["abcdefgh", "a"], max_length=3, add_eos=False)
    np.testing.assert_array_equal(ids_BxL, [[a, a + 1, a + 2], [a, 0, 0]])
    np.testing.assert_array_equal(mask_BxL, [[1, 1, 1], [1, 0, 0]])
    assert [tok.decode(row) for row in tok.encode_batch(["xyz", "é"], 8)[0]] == ["xyz", "é"]
    with pytest.raises(TypeError):
        tok.encode_batch("one string", 4)


CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "translate English to German: the house is wonderful",
    "summarize: studies have shown that owning a dog is good for you",
    "a tiny corpus for a tiny sentencepiece model with numbers 123 and 456",
    "mixture of experts route tokens among many adapters",
]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A T5-style tokenizer directory: spiece.model (pad 0, eos 1, unk 2, no bos) + its config."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("tokenizer")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 10))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=60, pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", minloglevel=2)
    corpus.unlink()
    (folder / "spiece.vocab").unlink()
    # transformers 5 builds its fast T5 tokenizer from spiece.model offline; extra_ids=0 keeps
    # the vocabulary at the 60 trained pieces.
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    return folder


def test_hf_tokenizer_matches_transformers(spm_dir):
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(spm_dir, local_files_only=True)
    tok = load_hf_tokenizer(spm_dir)
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 60)
    texts = ["the quick dog is wonderful", "summarize: numbers 123", "unseen zebra QX"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == list(reference(text).input_ids)
        assert ids[-1] == 1 and len(ids) > 3
        assert tok.encode(text, add_eos=False) == ids[:-1]
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tok.decode(tok.encode("the quick brown fox")) == "the quick brown fox"

    ids_BxL, mask_BxL = tok.encode_batch(texts, max_length=6)
    assert ids_BxL.shape == (3, 6) and ids_BxL.dtype == np.int32
    for row, mask, text in zip(ids_BxL, mask_BxL, texts, strict=True):
        full = tok.encode(text)
        n = min(len(full), 6)
        assert int(mask.sum()) == n
        np.testing.assert_array_equal(row[:n - 1], full[:n - 1])
        assert row[n - 1] == 1 and (row[n:] == 0).all()


def test_hf_tokenizer_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere: tokenizer directory does not exist"):
        load_hf_tokenizer(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"no tokenizer files.*spiece\.model"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"not a sentencepiece model")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer"}')
    with pytest.raises(CheckpointError, match=r"cannot load the tokenizer"):
        load_hf_tokenizer(tmp_path)
