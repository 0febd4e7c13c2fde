"""The CPU decode backend: XLA:CPU-friendly token draws and top-k / top-p, and glibc's malloc
kept from unmapping freed blocks. Opt-in: `sampling.sample(..., backend="cpu")` or
`--config.rl.sampler_backend=cpu` (`auto` selects it where JAX runs on the CPU).

XLA:CPU runs a decode step's few small ops one by one, so the plain XLA backend's choices
cost it much more there than on an accelerator: a Gumbel draw per vocabulary entry, every
`jax.random` call inside the loop (each a small loop of its own), a cumulative sum over the
whole vocabulary, and a sort or `lax.top_k` of every row at every step (ten times the rest of
the step). This backend draws one uniform per row and step before the loop, samples by a
two-level inverse CDF, and finds top-k / top-p thresholds by a radix select over the logits'
bits. Same distributions as the XLA backend, other random streams.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import flax.linen as nn
import jax
import jax.numpy as jnp

from warp_jax.backends import jax_may_use_an_accelerator

_NEG_INF = -jnp.inf


class CpuBackend:
    """`sampling.Backend` for XLA:CPU (see the module docstring)."""

    def noise(self, rng, steps: int, batch: int):
        """One U[0, 1) draw per row and step, `[steps, batch]`, drawn at once."""
        return jax.random.uniform(rng, (steps, batch), jnp.float32)

    def draw(self, uniform_B, logits_BV):
        return _draw(uniform_B, _whole_rows(logits_BV))

    def filter(self, logits_BV, top_k, top_p):
        return _filter(_whole_rows(logits_BV), top_k, top_p)


def _whole_rows(logits_BV):
    """Each device's rows with their whole vocabulary: the searches below reshape the
    vocabulary into chunks, which a vocabulary split over devices (the decode layout's tensor
    parallelism) cannot follow. Under the caller's sharding rules only."""
    return nn.with_logical_constraint(logits_BV, ("activation_batch", None),
                                      fallback=nn.spmd.RulesFallback.NO_CONSTRAINT)


_CHUNK = 128  # vocabulary entries per block of the two-level inverse CDF


def _draw(uniform_B, logits_BV):
    """One token per row from `softmax(logits)` and its log-probability, given one U[0, 1)
    draw per row.

    Inverse-CDF sampling with one uniform per row (a Gumbel draw per vocabulary entry
    dominates a decode step on CPU), in two levels: first the block of `_CHUNK` tokens, then
    the token within it (a cumulative sum over the whole vocabulary is slow on XLA:CPU).
    Tokens with -inf logits have zero mass and are never drawn, rounding included.
    """
    batch, vocab = logits_BV.shape
    pad = -vocab % _CHUNK
    padded = jnp.pad(logits_BV, ((0, 0), (0, pad)), constant_values=_NEG_INF)
    top = jnp.max(padded, axis=-1, keepdims=True)
    mass = jnp.exp(padded - top).reshape(batch, -1, _CHUNK)  # [B, C, chunk]
    block_mass = jnp.sum(mass, axis=-1)  # [B, C]
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    total = block_cdf[:, -1:]
    u = uniform_B[:, None] * total
    block = _first_above(block_cdf, u, block_mass > 0)
    before = (jnp.take_along_axis(block_cdf, block[:, None], axis=1)
              - jnp.take_along_axis(block_mass, block[:, None], axis=1))
    within = jnp.take_along_axis(mass, block[:, None, None], axis=1)[:, 0]  # [B, chunk]
    index = _first_above(before + jnp.cumsum(within, axis=-1), u, within > 0)
    token = block * _CHUNK + index
    chosen = jnp.take_along_axis(padded, token[:, None], axis=-1)
    return token, (chosen - top - jnp.log(total))[:, 0]


def _first_above(cdf_BK, u_B1, nonzero_BK):
    """The first index whose cdf exceeds u, clipped to the last index with nonzero mass."""
    count = jnp.sum(cdf_BK <= u_B1, axis=-1).astype(jnp.int32)
    k = cdf_BK.shape[-1]
    last = k - 1 - jnp.argmax(nonzero_BK[:, ::-1], axis=-1).astype(jnp.int32)
    return jnp.minimum(count, last)


def _filter(logits_BV, top_k, top_p):
    """Sets the logits of tokens outside the top-k / top-p set to -inf.

    Each row's threshold is found by a radix select over the logits' bits (one masked count
    or sum per bit), not by sorting the vocabulary: on CPU a sort or `lax.top_k` of every
    row at every decode step costs ten times the rest of the step. With top-k, both searches
    run over the few chunks of the vocabulary that hold the k largest logits. Tied logits
    are kept or dropped together.
    """
    rows = logits_BV.shape[0]
    values = logits_BV  # a superset of the kept tokens, where the thresholds are searched
    if top_k is not None:
        values = _top_k_candidates(logits_BV, top_k)
        kth = _kth_largest(values, top_k)
        values = jnp.where(values >= kth[:, None], values, _NEG_INF)
        logits_BV = jnp.where(logits_BV >= kth[:, None], logits_BV, _NEG_INF)
    if top_p is not None:
        top = jnp.max(values, axis=-1, keepdims=True)
        # The total over every token top-k kept: the candidates may miss some tied with the
        # k-th largest. They hold every token above it, so the search is exact there, and
        # a threshold below it keeps all of top-k's tokens either way.
        needed = top_p * jnp.sum(jnp.exp(logits_BV - top), axis=-1)
        mass = jnp.exp(values - top)
        # The largest value above which the tokens still hold top_p of the mass: a token is
        # kept iff the tokens more likely than it hold less than top_p.
        last_out = _radix_select(
            lambda t: jnp.sum(jnp.where(values > t[:, None], mass, 0.0), axis=-1) >= needed,
            rows)
        logits_BV = jnp.where(logits_BV > last_out[:, None], logits_BV, _NEG_INF)
    return logits_BV


_TOP_K_CHUNK = 16  # vocabulary entries per chunk of the top-k candidate search


def _top_k_candidates(logits_BV, k):
    """Per row, `k` chunks of `_TOP_K_CHUNK` logits that hold its k largest (and every logit
    above the k-th largest), or all the logits when those chunks would be over a quarter of
    the vocabulary.

    The chunks are those with the largest maxima: first every chunk whose maximum exceeds
    the k-th largest chunk maximum (fewer than k), then chunks whose maximum equals it. A
    logit at or above the row's k-th largest lies in a chunk whose maximum is at least the
    k-th largest chunk maximum, so counts above that cut are exact, and below it every count
    reaches k.
    """
    rows, vocab = logits_BV.shape
    chunks = -(-vocab // _TOP_K_CHUNK)
    if 4 * k > chunks:
        return logits_BV
    padded = jnp.pad(logits_BV, ((0, 0), (0, chunks * _TOP_K_CHUNK - vocab)),
                     constant_values=_NEG_INF).reshape(rows, chunks, _TOP_K_CHUNK)
    peak_BC = jnp.max(padded, axis=-1)
    cut = _kth_largest(peak_BC, k)[:, None]
    above, at = peak_BC > cut, peak_BC == cut
    slot = jnp.where(above, jnp.cumsum(above, axis=-1),
                     jnp.sum(above, axis=-1, keepdims=True) + jnp.cumsum(at, axis=-1)) - 1
    slot = jnp.where((above | at) & (slot < k), slot, k)  # slot k: not chosen
    chosen = jnp.zeros((rows, k + 1), jnp.int32).at[jnp.arange(rows)[:, None], slot].set(
        jnp.broadcast_to(jnp.arange(chunks, dtype=jnp.int32), (rows, chunks)))
    return jnp.take_along_axis(padded, chosen[:, :k, None], axis=1).reshape(rows, -1)


def _kth_largest(values_BX, k):
    """Per row, the k-th largest of `values_BX`, ties counted: a radix select over counts."""
    return _radix_select(lambda t: jnp.sum(jnp.where(values_BX >= t[:, None], 1.0, 0.0),
                                           axis=-1) >= k, values_BX.shape[0])


def _radix_select(holds, rows):
    """Per row, the largest float32 `t` for which `holds(t)` (`[rows]` -> `[rows]` bool), a
    predicate that is true up to some value and false above it (-inf if it never holds).

    A binary search over the 32 bits of uint32 keys that order like the floats: one
    evaluation of `holds` (a pass over the searched logits) per bit, exact whatever their
    range.
    """
    def bit(i, key):
        candidate = key | jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        return jnp.where(holds(_from_key(candidate)), candidate, key)

    return _from_key(jax.lax.fori_loop(0, 32, bit, jnp.zeros((rows,), jnp.uint32)))


_NEG_INF_KEY = 0x007FFFFF  # the key of -inf; smaller keys are NaNs, read as -inf


def _from_key(key):
    """The float32 of a uint32 key; keys order like the floats they stand for."""
    key = jnp.maximum(key, jnp.uint32(_NEG_INF_KEY))
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def retain_freed_memory() -> bool:
    """Makes glibc's malloc reuse freed memory rather than unmap it (returns True if done).

    XLA:CPU allocates an executable's temporaries as one block per call (about 1 GB for the
    policy-gradient step of a 100M-parameter Gemma at batch 8 x 128). glibc serves a block
    that large with a fresh `mmap` and returns it to the OS on `free`, so every step
    page-faults it back in (~270k faults and 0.4-1.7 s of kernel time per step on 2 cores).
    With one arena, no `mmap` for large blocks and no trimming, a block freed by one step is
    the next step's. It changes no result, only speed; resident memory stays at its peak.

    Call it before JAX starts its threads (first thing in `main`): threads created earlier
    keep their own arenas. A no-op returning False where the C library is not glibc, and
    where JAX may run on an accelerator (`jax_may_use_an_accelerator`): there the
    temporaries live in device memory, and one arena shared by many host threads slowed an
    H200 run down.
    """
    if jax_may_use_an_accelerator():
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
