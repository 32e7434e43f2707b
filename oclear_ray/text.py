"""The text tokenizer: trained on the catalog's own text, or a pretrained text model's own.

By default a BERT-style WordPiece tokenizer (BERT normaliser and pre-tokeniser, lower-case) is
built with the ``tokenizers`` library from the catalog's text, with fixed special ids: [PAD]=0,
[UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4. A pretrained text tower brings its own vocabulary
(:meth:`TextTokenizer.from_pretrained`). Either is saved as one ``tokenizer.json`` beside the
model. Text without any content (empty or only whitespace) encodes to an all-padding row with an
all-zero attention mask, which the encoders read as "no text".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class TextTokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` giving fixed-shape id and mask arrays."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._truncating: dict[int, Tokenizer] = {}
        padding = tokenizer.padding  # a pretrained tokenizer records its pad token there
        self.pad_id = padding["pad_id"] if padding else tokenizer.token_to_id("[PAD]")
        if self.pad_id is None:
            raise ValueError("tokenizer has no [PAD] token")

    @property
    def vocab_size(self) -> int:
        """Number of ids the text encoder's embedding table must hold."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        """Load a ``tokenizer.json``, a local path or a URI on shared storage."""
        if "://" in str(path):  # storage (pyarrow) only when used: gpu_check runs without it
            from oclear_ray import storage

            return cls(Tokenizer.from_str(storage.read_bytes(str(path)).decode()))
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> TextTokenizer:
        """The tokenizer of a pretrained text model (a ``save_pretrained`` folder or a hub
        name), through ``transformers.AutoTokenizer``; it must be a fast tokenizer with a pad
        token, which the saved ``tokenizer.json`` records as its padding."""
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(name_or_path)
        if not hf.is_fast:
            raise ValueError(f"{name_or_path}: only fast (tokenizers) tokenizers are supported")
        if hf.pad_token_id is None:
            raise ValueError(f"{name_or_path}: the tokenizer has no pad token")
        tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        tok.no_truncation()
        tok.enable_padding(pad_id=hf.pad_token_id, pad_token=hf.pad_token)
        return cls(tok)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` (single file, loadable with ``Tokenizer.from_file``)."""
        self.tokenizer.save(str(path))

    def _truncating_tokenizer(self, max_length: int) -> Tokenizer:
        """A copy truncating to ``max_length``; the original stays as trained (and as saved)."""
        if max_length not in self._truncating:
            copy = Tokenizer.from_str(self.tokenizer.to_str())
            copy.no_padding()  # rows are padded here, with the mask
            copy.enable_truncation(max_length)
            self._truncating[max_length] = copy
        return self._truncating[max_length]

    def encode(
        self,
        texts: Sequence[str],
        max_length: int,
        *,
        padding: Literal["max_length", "longest"] = "max_length",
        return_tensors: Literal["np", "pt"] = "np",
    ) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
        """Texts -> (input_ids int64 [B, T], attention_mask int64 [B, T]).

        Truncates to ``max_length`` (keeping [CLS] ... [SEP]); pads with [PAD] to ``max_length``
        or to the longest row. Empty or content-free text gives an all-zero mask row.
        """
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] + [SEP]), got {max_length}")
        texts = ["" if t is None else str(t) for t in texts]
        encodings = self._truncating_tokenizer(max_length).encode_batch(texts)
        rows = [e.ids if sum(e.special_tokens_mask) < len(e.ids) else [] for e in encodings]
        width = max_length if padding == "max_length" else max([len(r) for r in rows] + [1])
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        if return_tensors == "pt":
            return torch.from_numpy(ids), torch.from_numpy(mask)
        return ids, mask


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 4000, min_frequency: int = 1
) -> TextTokenizer:
    """Train a lower-case BERT-style WordPiece tokenizer on ``texts`` (e.g. the catalog text).

    The resulting vocabulary may be smaller than ``vocab_size`` on a small corpus.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tok.train_from_iterator((t or "" for t in texts), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return TextTokenizer(tok)
