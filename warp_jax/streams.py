"""Named random streams: every key and data order of an experiment derives from its seed and a
purpose ("sft", "eval", "run" with iteration and index, ...), never from offsets of the seed.

    rng = np.random.default_rng(streams.seed(c.seed, "train_prompts"))
    key = streams.key(c.seed, "run", iteration, m)

Two purposes never share a stream (unlike `seed + 1` and `seed + 2` for the next seed), and a
new purpose leaves every other stream as it was.
"""

from __future__ import annotations

import zlib

import jax


def _code(purpose: str) -> int:
    return zlib.crc32(purpose.encode()) & 0x7FFFFFFF


def seed(base: int, purpose: str, *indices: int) -> tuple[int, ...]:
    """The entropy of stream `purpose` (and `indices`) for `np.random.default_rng`."""
    return (int(base), _code(purpose), *(int(i) for i in indices))


def key(base: int, purpose: str, *indices: int) -> jax.Array:
    """The `jax.random` key of stream `purpose` (and `indices`)."""
    out = jax.random.fold_in(jax.random.key(base), _code(purpose))
    for i in indices:
        out = jax.random.fold_in(out, i)
    return out
