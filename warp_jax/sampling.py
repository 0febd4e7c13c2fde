"""Batched, jit-compiled sampling from Gemma with a KV cache (one compile per shape).

Prompts are left-padded `[B, P]` with a mask; the prompt is prefilled in one pass, then a
`lax.while_loop` decodes one token per step from the cache until `max_new_tokens` or until
every row has emitted an end token (`eos_id`: one id or several).

Log-probabilities are those of the distribution each token was drawn from: `log_softmax` of
`logits / temperature`, restricted and renormalised to the tokens that top-k and top-p keep
(so they equal a full forward pass's `log_softmax(logits / temperature)` when neither is set).
Greedy decoding (`temperature=0`) returns the untempered `log_softmax(logits)` of the argmax.
Weight matrices wider than the compute dtype (`cfg.dtype`) are cast to it once per call, before
the decode loop, so that each step reads them at the compute dtype's width. On one CPU device
the matmuls, the GeGLU, the decode steps' attention and the token draw run in
`warp_jax.cpu_kernels` (`sample`'s `cpu_kernel`).
"""

from __future__ import annotations

import functools
import numbers
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from warp_jax import cpu_kernels
from warp_jax.gemma import Gemma, GemmaConfig, init_cache, left_padded_positions
from warp_jax.gemma.model import packed_matrices

_NEG_INF = -jnp.inf


class SampleOutput(NamedTuple):
    tokens: jax.Array  # [B, N] int32 sampled tokens (pad_id after EOS)
    logprobs: jax.Array  # [B, N] float32 log-probabilities of the sampled tokens (0 after EOS)
    mask: jax.Array  # [B, N] bool: True up to and including the EOS token


@flax.struct.dataclass
class _LoopState:
    step: jax.Array  # [] int32: how many tokens have been sampled
    last: jax.Array  # [B] int32: the last sampled token (pad_id in finished rows)
    live: jax.Array  # [B] bool: `last` is a real token (its row had not finished)
    positions: jax.Array  # [B] int32: RoPE position of `last`
    done: jax.Array  # [B] bool: the row has emitted an end token
    cache: dict[str, Any]  # KV cache of P + N slots
    tokens: jax.Array  # [B, N] int32
    logprobs: jax.Array  # [B, N] float32
    mask: jax.Array  # [B, N] bool


def sample(params: Any, cfg: GemmaConfig, prompt_tokens: jax.Array, prompt_mask: jax.Array,
           rng: jax.Array, max_new_tokens: int, temperature: float = 0.9,
           top_k: int | None = None, top_p: float | None = None,
           eos_id: int | Sequence[int] | None = None,
           cpu_kernel: bool | None = None) -> SampleOutput:
    """Samples `max_new_tokens` continuations of left-padded prompts.

    Args:
      params: the Gemma params (any sharding: the computation follows it).
      cfg: the model config.
      prompt_tokens: int `[B, P]`, left-padded.
      prompt_mask: bool `[B, P]`, False on padding.
      rng: a `jax.random` key; the same key gives the same tokens.
      max_new_tokens: N.
      temperature: > 0 to sample from `softmax(logits / temperature)`; 0 for greedy. A
        Python or concrete JAX scalar (greedy decoding is chosen when tracing); its value is
        traced, so a new one does not recompile.
      top_k: keep the k most likely tokens (None or 0: all, as in transformers, and so does
        a k at or above the vocabulary size).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p
        (None or 1: all, as in transformers; a float32 sum would drop the tokens below its
        rounding error).
      eos_id: a token id in `[0, vocab_size)`, or several (instruction-tuned Gemmas end a
        turn with `<end_of_turn>`, as their `generation_config.eos_token_id` lists): a row
        stops after emitting one (None: never stops early). One compile per number of ids.
      cpu_kernel: run the matmuls, the GeGLU, the decode steps' attention and the token draw
        with `warp_jax.cpu_kernels` (the matmuls at about twice XLA:CPU's speed; the weights
        are packed once per call, a float32 copy of the matrices). None: where JAX runs on
        one CPU device, `cfg.dtype` is float32 and the kernels are available
        (`cpu_kernel_unavailable_reason`). True raises `ValueError` where they cannot run.
        With arrays sharded over several devices XLA gathers their operands at every step:
        leave it off.

    Returns:
      `SampleOutput(tokens, logprobs, mask)`, each `[B, N]`.

    Raises:
      ValueError: for a bad argument, and for concrete prompts that are not left-padded, have
        a row without a prompt token or a prompt token outside the vocabulary.
    """
    given = (prompt_tokens, prompt_mask)
    prompt_tokens, prompt_mask = jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask)
    if not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
        raise ValueError(f"prompt_tokens must hold integer token ids, got {prompt_tokens.dtype}")
    prompt_tokens = prompt_tokens.astype(jnp.int32)
    if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
        raise ValueError(f"prompt_tokens {prompt_tokens.shape} and prompt_mask "
                         f"{prompt_mask.shape} must both be [B, P]")
    _check_prompts(*given, cfg.vocab_size)  # as given: host data is not copied back
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    try:
        temperature = float(temperature)
    except jax.errors.ConcretizationTypeError:
        raise ValueError("temperature must be concrete, not traced: it decides between greedy "
                         "decoding and sampling when the sampler is traced") from None
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and not (isinstance(top_k, numbers.Integral) and top_k >= 0):
        raise ValueError(f"top_k must be a non-negative int (0: off) or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    eos_ids = end_token_ids(eos_id, cfg.vocab_size)
    greedy = temperature == 0
    top_k = None if top_k in (None, 0) or top_k >= cfg.vocab_size else int(top_k)
    use_top_p = top_p is not None and top_p < 1
    cpu_kernel = _use_cpu_kernel(cpu_kernel, cfg)
    return _sample(params, prompt_tokens, prompt_mask.astype(bool), rng,
                   jnp.float32(1.0 if greedy else temperature),
                   jnp.float32(top_p if use_top_p else 1.0),
                   jnp.asarray(eos_ids or (-1,), jnp.int32),
                   cfg=cfg, max_new_tokens=int(max_new_tokens), greedy=greedy, top_k=top_k,
                   use_top_p=use_top_p, cpu_kernel=cpu_kernel)


def cpu_kernel_unavailable_reason(dtype: Any) -> str | None:
    """Why `sample` cannot run `warp_jax.cpu_kernels` here for compute dtype `dtype`
    (`cfg.dtype`), or None where it can."""
    if jax.default_backend() != "cpu":
        return f"JAX runs on {jax.default_backend()}, not the CPU"
    if jnp.dtype(dtype) != jnp.float32:
        return f"it computes in float32 and cfg.dtype is {jnp.dtype(dtype)}"
    return cpu_kernels.unavailable_reason()


def _use_cpu_kernel(requested: bool | None, cfg: GemmaConfig) -> bool:
    """Whether the decode loop uses the CPU kernels (`sample`'s `cpu_kernel`)."""
    if requested is not None and not isinstance(requested, bool):
        raise ValueError(f"cpu_kernel must be True, False or None, got {requested!r}")
    if requested is False:
        return False
    why_not = cpu_kernel_unavailable_reason(cfg.dtype)
    if requested and why_not is not None:
        raise ValueError(f"cpu_kernel=True, but the packed CPU matmul cannot run: {why_not}")
    return why_not is None and (requested or jax.device_count() == 1)


def end_token_ids(eos_id: Any, vocab_size: int) -> tuple[int, ...]:
    """`eos_id` (None, an int or a sequence of ints, like transformers' `eos_token_id`) as a
    tuple of ids, checked to lie in `[0, vocab_size)`; `()` for None."""
    if eos_id is None:
        return ()
    try:
        ids = (operator.index(eos_id),)
    except TypeError:
        try:
            ids = tuple(operator.index(i) for i in eos_id)
        except TypeError:
            ids = ()
    if not ids or not all(0 <= i < vocab_size for i in ids):
        raise ValueError(f"eos_id must be an int in [0, {vocab_size}), a non-empty sequence of "
                         f"them, or None; got {eos_id!r}")
    return ids


def _check_prompts(tokens_BP, mask_BP, vocab_size):
    """Raises `ValueError` unless every row of concrete prompts is padding then prompt, with at
    least one prompt token (the first token is sampled from the logits of the last slot), and
    every prompt token is in the vocabulary (an embedding lookup would clamp or wrap it)."""
    if any(isinstance(x, jax.core.Tracer)
           or (isinstance(x, jax.Array) and not x.is_fully_addressable)
           for x in (tokens_BP, mask_BP)):
        return  # checked where the caller builds them
    tokens, mask = np.asarray(tokens_BP), np.asarray(mask_BP, bool)
    outside = np.argwhere(((tokens < 0) | (tokens >= vocab_size)) & mask)
    if outside.size:
        row, col = outside[0]
        raise ValueError(f"prompt_tokens[{row}, {col}] = {tokens[row, col]} is outside the "
                         f"vocabulary [0, {vocab_size})")
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"prompt_mask row(s) {empty.tolist()} have no prompt token: every row "
                         "needs at least one (e.g. BOS)")
    bad = np.flatnonzero((mask[:, :-1] & ~mask[:, 1:]).any(axis=1))
    if bad.size:
        raise ValueError(f"prompt_mask row(s) {bad.tolist()} are not left-padded (a False after "
                         "a True): pad prompts on the left (tokenizer padding_side='left')")


# top_k is static: it sizes the top-k candidate buffer (`_top_k_candidates`).
@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "top_k",
                                             "use_top_p", "cpu_kernel"))
def _sample(params, prompt_tokens, prompt_mask, rng, temperature, top_p, eos_ids_E, *, cfg,
            max_new_tokens, greedy, top_k, use_top_p, cpu_kernel):
    model = Gemma(cfg)
    params = _matrices_in_compute_dtype(params, cfg)
    variables = {"params": params}
    if cpu_kernel:
        variables["packed"] = packed_matrices(params)
    batch, prompt_len = prompt_tokens.shape
    cache = init_cache(cfg, batch, prompt_len + max_new_tokens)
    logits, cache = model.apply(variables, prompt_tokens,
                                left_padded_positions(prompt_mask), prompt_mask, cache,
                                logits_to_keep=1, max_position=prompt_len - 1)
    # One uniform per row and step, drawn at once: on CPU every `jax.random` call inside the
    # loop would run as a small loop of its own.
    uniforms_NB = jax.random.uniform(rng, (max_new_tokens, batch), jnp.float32)

    def pick(logits_BV, step, done_B):
        """The token of every row at `step`, its log-prob and whether the row is live."""
        if greedy:
            token = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
            token_logp = (jnp.take_along_axis(logits_BV, token[:, None], axis=-1)[:, 0]
                          - jax.nn.logsumexp(logits_BV, axis=-1))
        elif cpu_kernel and top_k is None and not use_top_p:  # the temperature in the draw
            token, token_logp = cpu_kernels.draw(uniforms_NB[step], logits_BV, 1.0 / temperature)
        else:
            scaled = _filter(logits_BV / temperature, top_k, top_p if use_top_p else None)
            draw = cpu_kernels.draw if cpu_kernel else _draw
            token, token_logp = draw(uniforms_NB[step], scaled)
        live = ~done_B
        return jnp.where(live, token, cfg.pad_id), jnp.where(live, token_logp, 0.0), live

    def record(s: _LoopState, token, token_logp, live, cache, positions) -> _LoopState:
        return _LoopState(
            step=s.step + 1, last=token, live=live, positions=positions,
            done=s.done | jnp.any(token[:, None] == eos_ids_E[None, :], axis=1), cache=cache,
            tokens=s.tokens.at[:, s.step].set(token),
            logprobs=s.logprobs.at[:, s.step].set(token_logp),
            mask=s.mask.at[:, s.step].set(live),
        )

    # The first token comes from the prefill's logits; each loop step feeds the last token
    # and samples the next, so no forward pass is spent on logits nobody samples from.
    empty = _LoopState(
        step=jnp.zeros((), jnp.int32), last=jnp.zeros((batch,), jnp.int32),
        live=jnp.zeros((batch,), bool), positions=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool), cache=cache,
        tokens=jnp.full((batch, max_new_tokens), cfg.pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
        mask=jnp.zeros((batch, max_new_tokens), bool),
    )
    state = record(empty, *pick(logits[:, -1], empty.step, empty.done), cache,
                   jnp.sum(prompt_mask, axis=1).astype(jnp.int32))

    def cond(s: _LoopState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: _LoopState):
        logits, cache = model.apply(variables, s.last[:, None], s.positions[:, None],
                                    s.live[:, None], s.cache,
                                    max_position=prompt_len + max_new_tokens - 1)
        return record(s, *pick(logits[:, 0], s.step, s.done), cache, s.positions + 1)

    s = jax.lax.while_loop(cond, body, state)
    return SampleOutput(s.tokens, s.logprobs, s.mask)


def _matrices_in_compute_dtype(params, cfg: GemmaConfig):
    """`params` with every floating matrix (ndim >= 2) cast to `cfg.dtype` where that is
    narrower. The model casts exactly these at each use; cast once before the decode loop, a
    step reads each weight at the compute dtype's width (float32 weights computed in
    bfloat16: half the weight traffic, and no conversion per step) with the same values, so
    the samples and log-probs are unchanged. The norm scales stay: the model reads them in
    float32. Costs one copy of the matrices in that dtype while sampling."""
    dt = jnp.dtype(cfg.dtype)

    def cast(w):
        narrower = (jnp.issubdtype(w.dtype, jnp.floating)
                    and jnp.finfo(dt).bits < jnp.finfo(w.dtype).bits)
        return w.astype(dt) if w.ndim >= 2 and narrower else w

    return jax.tree.map(cast, params)


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
