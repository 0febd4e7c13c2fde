"""SentencePiece wrapper: training on the fly, left-padded batches, decoding."""

import numpy as np
import pytest

from warp_jax import data
from warp_jax.gemma.tokenizer import Tokenizer

TEXTS = [f"the {a} movie was {b} and {c}" for a in ("new", "old", "long", "short")
         for b in ("great", "bad", "fine", "dull") for c in ("fun", "slow", "sad")]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS * 5, vocab_size=60)


def test_special_ids_follow_gemma(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.vocab_size == 60


def test_encode_batch_left_pads_and_decode_round_trips(tok):
    texts = ["the movie was great", "the old movie was dull and slow"]
    tokens, mask = tok.encode_batch(texts)
    assert tokens.dtype == np.int32 and tokens.shape == mask.shape
    assert mask[1].all() and not mask[0, 0] and mask[0, -1]
    assert np.all(tokens[~mask] == tok.pad_id)
    assert all(tokens[i][mask[i]][0] == tok.bos_id for i in range(2))
    assert tok.decode_batch(tokens, mask) == texts


def test_max_len_keeps_the_end_and_eos_stops_decoding(tok, tmp_path):
    text = "the old movie was dull and slow"
    tokens, mask = tok.encode_batch([text], max_len=4)
    assert tokens.shape == (1, 4) and mask.all()
    ids = tok.encode(text)
    assert tokens[0].tolist() == [tok.bos_id, *ids[-3:]]  # BOS first, then the end
    assert tok.decode(tokens[0]).endswith("slow")
    tokens, _ = tok.encode_batch([text], max_len=4, add_bos=False)
    assert tokens[0].tolist() == ids[-4:]
    tokens, _ = tok.encode_batch([text], max_len=4, add_eos=True)
    assert tokens[0].tolist() == [tok.bos_id, *ids[-2:], tok.eos_id]
    ids = [*tok.encode("the movie was fun", add_bos=False), tok.eos_id, *tok.encode("sad")]
    assert tok.decode(ids) == "the movie was fun"
    tok.save(tmp_path / "t.model")
    assert Tokenizer(tmp_path / "t.model").encode("the movie") == tok.encode("the movie")
    with pytest.raises(ValueError, match="no SentencePiece model"):
        Tokenizer(tmp_path / "missing.model")


def test_piece_ids_name_a_missing_piece(tok):
    assert tok.piece_ids(["▁the", "</s>"]) == (tok.encode("the", add_bos=False)[0], tok.eos_id)
    assert tok.piece_ids([]) == ()
    with pytest.raises(ValueError, match="'<end_of_turn>' is not a piece"):
        tok.piece_ids(["▁the", "<end_of_turn>"])


def test_special_pieces_stay_whole_in_chat_prompts():
    tok = Tokenizer.train(TEXTS * 5, vocab_size=60, special_pieces=data.CHAT_PIECES)
    start, end = tok.piece_ids(data.CHAT_PIECES)
    ids = tok.encode(data.chat_prompt("the movie was fun"))
    assert ids[0] == tok.bos_id and ids.count(start) == 2 and ids.count(end) == 1
    assert ids.index(end) > ids.index(start)
