"""SentencePiece tokenizer: Gemma's `tokenizer.model`, or one trained locally on text."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm


class Tokenizer:
    """Encodes text to left-padded `[B, T]` arrays and decodes sampled tokens back to text.

    Gemma's special ids: pad 0, eos 1, bos 2, unk 3 (a locally trained model uses the same).
    """

    def __init__(self, model: str | os.PathLike | bytes):
        """Loads a SentencePiece model from a path or its serialized bytes."""
        if isinstance(model, bytes):
            self._sp = spm.SentencePieceProcessor(model_proto=model)
        else:
            if not os.path.isfile(model):
                raise ValueError(f"no SentencePiece model at {str(model)!r}")
            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(model))
            except RuntimeError as e:
                raise ValueError(f"{str(model)!r}: not a SentencePiece model ({e})") from None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe",
              special_pieces: Sequence[str] = ()) -> Tokenizer:
        """Trains a SentencePiece model in memory on `texts` with Gemma's special ids.

        `special_pieces` (e.g. `data.CHAT_PIECES`) become pieces of their own, kept whole
        wherever they occur in a text, after the special ids.
        """
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buffer, vocab_size=vocab_size,
            model_type=model_type, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
            user_defined_symbols=list(special_pieces),
        )
        return cls(buffer.getvalue())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def serialized(self) -> bytes:
        return self._sp.serialized_model_proto()

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "wb") as f:
            f.write(self.serialized())

    def piece_ids(self, pieces: Iterable[str]) -> tuple[int, ...]:
        """The ids of vocabulary pieces, e.g. `("<end_of_turn>",)` in Gemma's tokenizer.

        Raises:
          ValueError: naming the first piece that is not in the vocabulary.
        """
        ids = []
        for piece in pieces:
            i = self._sp.piece_to_id(piece)  # the unknown id for a missing piece
            if self._sp.id_to_piece(i) != piece:
                raise ValueError(f"{piece!r} is not a piece of this tokenizer's vocabulary")
            ids.append(i)
        return tuple(ids)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def encode_batch(self, texts: Sequence[str], max_len: int | None = None,
                     add_bos: bool = True, add_eos: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded int32 tokens `[B, T]` and their bool mask (False on padding).

        `T` is the longest encoding, or `max_len`. A longer text keeps its BOS (Gemma expects
        it first) and its last tokens (the end of a prompt is what the model continues).
        """
        encoded = [self.encode(t, add_bos, add_eos) for t in texts]
        width = max_len or max((len(e) for e in encoded), default=1)
        tokens = np.full((len(encoded), width), self.pad_id, np.int32)
        mask = np.zeros((len(encoded), width), bool)
        for row, ids in enumerate(encoded):
            if len(ids) > width:
                ids = ids[:1] + ids[len(ids) - width + 1:] if add_bos else ids[-width:]
            tokens[row, width - len(ids):] = ids
            mask[row, width - len(ids):] = True
        return tokens, mask

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first eos, special tokens removed."""
        out = []
        for i in (int(x) for x in ids):
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                out.append(i)
        return self._sp.decode(out)

    def decode_batch(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> list[str]:
        tokens = np.asarray(tokens)
        mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
        return [self.decode(row[m]) for row, m in zip(tokens, mask, strict=True)]
