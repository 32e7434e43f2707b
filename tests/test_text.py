"""The catalog-trained WordPiece tokenizer: special ids, padding, truncation, empty text."""

import numpy as np
import pytest
import torch

from oclear_ray.text import TextTokenizer, train_tokenizer

TEXTS = [
    "grinning face. cheerful, cheery, face, grin, happy",
    "Red Apple: fruit, food",
    "cat face with tears of joy",
    "face with tears of joy",
]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return train_tokenizer(TEXTS, vocab_size=200)


def test_special_tokens_have_fixed_ids(tokenizer):
    ids = [tokenizer.tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")]
    assert ids == [0, 1, 2, 3]
    assert tokenizer.tokenizer.token_to_id("[MASK]") == 4
    assert tokenizer.pad_id == 0
    assert 5 < tokenizer.vocab_size <= 200


def test_encode_pads_truncates_and_lowercases(tokenizer):
    ids, mask = tokenizer.encode(["FACE", "face", TEXTS[0]], max_length=6)
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == (3, 6)
    assert ids[0].tolist() == ids[1].tolist()  # lower-cased
    face = tokenizer.tokenizer.token_to_id("face")
    assert ids[1].tolist() == [2, face, 3, 0, 0, 0] and mask[1].tolist() == [1, 1, 1, 0, 0, 0]
    assert ids[2, 0] == 2 and ids[2, -1] == 3 and mask[2].all()  # truncated, [SEP] kept


def test_empty_text_is_an_all_padding_row(tokenizer):
    ids, mask = tokenizer.encode(["", "   ", None, "zzzz"], max_length=5)
    assert not ids[:3].any() and not mask[:3].any()
    assert ids[3].tolist()[:3] == [2, 1, 3] and mask[3].sum() == 3  # unknown word is content


def test_longest_padding_and_torch_tensors(tokenizer):
    ids, mask = tokenizer.encode(
        ["face", ""], max_length=16, padding="longest", return_tensors="pt"
    )
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.int64 and ids.shape == (2, 3)
    ids, mask = tokenizer.encode(["", ""], max_length=16, padding="longest")
    assert ids.shape == (2, 1) and not mask.any()


def test_round_trip_through_tokenizer_json(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = TextTokenizer.from_file(tmp_path / "tokenizer.json")
    for a, b in zip(
        tokenizer.encode(TEXTS + [""], 10), loaded.encode(TEXTS + [""], 10), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert loaded.vocab_size == tokenizer.vocab_size


def test_bad_lengths_are_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        tokenizer.encode(["face"], max_length=1)
    with pytest.raises(ValueError, match="vocab_size must be > 5, got 3"):
        train_tokenizer(TEXTS, vocab_size=3)
