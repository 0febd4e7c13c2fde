"""Prompt sources (text/jsonl files, the built-in review task) and per-run prompt batches."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import numpy as np

from warp_jax.gemma.tokenizer import Tokenizer

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


def review_prompts(num: int, seed: int | Sequence[int] = 0) -> list[str]:
    """Review openings to complete, such as "i thought the acting was"."""
    rng = np.random.default_rng(seed)
    return [rng.choice(_OPENERS).format(n=rng.choice(_NOUNS)) for _ in range(num)]


# Gemma's chat turns, as instruction-tuned checkpoints were trained on them.
CHAT_PIECES = ("<start_of_turn>", "<end_of_turn>")


def chat_prompt(text: str) -> str:
    """`text` as a user turn followed by the start of the model's turn (Gemma's chat format;
    the tokenizer adds the BOS), for instruction-tuned checkpoints. The model's turn ends with
    `<end_of_turn>`."""
    start, end = CHAT_PIECES
    return f"{start}user\n{text}{end}\n{start}model\n"


def utf8(raw: bytes, path: str | os.PathLike, number: int) -> str:
    """`raw`, line `number` of `path`, decoded without its line ending; a line that is not
    UTF-8 is a `ValueError` naming the file and line."""
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{number}: not UTF-8 text (byte {raw[e.start]:#04x} at "
                         f"column {e.start + 1})") from None


def read_prompts(path: str | os.PathLike, field: str = "prompt") -> list[str]:
    """Prompts from a text file (one per line) or jsonl (`{"prompt": ...}` per line)."""
    prompts = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = utf8(raw, path, number)
            if not line.strip():
                continue
            if str(path).endswith(".jsonl"):
                try:
                    value = json.loads(line)[field]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}:{number}: expected a JSON object with a "
                                     f"{field!r} string") from None
                if not isinstance(value, str):
                    raise ValueError(f"{path}:{number}: {field!r} is not a string")
                line = value
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


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
