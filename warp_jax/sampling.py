"""Batched, jit-compiled sampling from Gemma with a KV cache (one compile per shape).

Prompts are left-padded `[B, P]` with a mask; the prompt is prefilled in one pass, then a
`lax.while_loop` decodes one token per step from the cache until `max_new_tokens` or until
every row has emitted an end token (`eos_id`: one id or several).

Log-probabilities are those of the distribution each token was drawn from: `log_softmax` of
`logits / temperature`, restricted and renormalised to the tokens that top-k and top-p keep
(so they equal a full forward pass's `log_softmax(logits / temperature)` when neither is set).
Greedy decoding (`temperature=0`) returns the untempered `log_softmax(logits)` of the argmax.
Weight matrices wider than the compute dtype (`cfg.dtype`) are cast to it once per call, before
the decode loop, so that each step reads them at the compute dtype's width.

How a token is drawn and how top-k / top-p filter the logits is the decode loop's one
platform seam, a `Backend`: `XlaBackend` (the default on accelerators: a Gumbel draw per step,
`lax.top_k` and a sort) or `warp_jax.backends.cpu.CpuBackend` (opt-in, or `"auto"` on the CPU).
"""

from __future__ import annotations

import functools
import numbers
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from warp_jax.gemma import Gemma, GemmaConfig, init_cache, left_padded_positions

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
           backend: str | Backend = "auto") -> SampleOutput:
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
      backend: how tokens are drawn and filtered (`get_backend`): "xla", "cpu", "auto" (the
        CPU backend where JAX's default backend is the CPU, else XLA's) or a `Backend`.
        Backends draw from the same distributions with different random streams.

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
    backend = get_backend(backend)
    return _sample(params, prompt_tokens, prompt_mask.astype(bool), rng,
                   jnp.float32(1.0 if greedy else temperature),
                   jnp.float32(top_p if use_top_p else 1.0),
                   jnp.asarray(eos_ids or (-1,), jnp.int32),
                   cfg=cfg, max_new_tokens=int(max_new_tokens), greedy=greedy, top_k=top_k,
                   use_top_p=use_top_p, backend=backend)


class Backend(Protocol):
    """The decode loop's platform seam: how a token is drawn and how logits are filtered.

    A backend is hashable (it is a static argument of the jitted sampler) and its methods are
    traced inside the decode loop.
    """

    def noise(self, rng: jax.Array, steps: int, batch: int) -> Any:
        """The randomness of `steps` draws of `batch` rows: a pytree of `[steps, ...]` arrays
        (computed once, before the loop), sliced per step for `draw`."""

    def draw(self, noise: Any, logits_BV: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One token per row from `softmax(logits_BV)` (-inf: never drawn) and its
        log-probability, `([B] int32, [B] float32)`, from one step's slice of `noise`."""

    def filter(self, logits_BV: jax.Array, top_k: int | None,
               top_p: jax.Array | None) -> jax.Array:
        """`logits_BV` with -inf outside the top-k (static) and top-p (traced) sets; tied
        logits are kept or dropped together."""


class XlaBackend:
    """The default `Backend`: `jax.random.categorical` per step, `lax.top_k` and a sort for
    the filters (the ops XLA compiles well on TPU and GPU)."""

    def noise(self, rng, steps, batch):
        return jax.random.split(rng, steps)

    def draw(self, key, logits_BV):
        token = jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
        logp = (jnp.take_along_axis(logits_BV, token[:, None], axis=-1)[:, 0]
                - jax.nn.logsumexp(logits_BV, axis=-1))
        return token, logp

    def filter(self, logits_BV, top_k, top_p):
        if top_k is not None:
            kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
            logits_BV = jnp.where(logits_BV >= kth, logits_BV, _NEG_INF)
        if top_p is not None:
            # A token is kept iff the tokens more likely than it hold less than top_p: the
            # first of each run of ties in descending order has exactly those before it.
            ordered = -jnp.sort(-logits_BV, axis=-1)
            probs = jax.nn.softmax(ordered, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs
            cut = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
            logits_BV = jnp.where(logits_BV >= cut, logits_BV, _NEG_INF)
        return logits_BV


BACKENDS = ("auto", "xla", "cpu")


def get_backend(backend: str | Backend) -> Backend:
    """A `Backend` by name: "xla", "cpu" (imports `warp_jax.backends.cpu`, only then) or
    "auto" (the CPU backend where JAX's default backend is the CPU, else "xla"); a `Backend`
    instance is returned as it is."""
    if not isinstance(backend, str):
        if not all(hasattr(backend, m) for m in ("noise", "draw", "filter")):
            raise ValueError(f"backend must be one of {BACKENDS} or a sampling.Backend, got "
                             f"{backend!r}")
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or a sampling.Backend, got "
                         f"{backend!r}")
    if backend == "auto":
        backend = "cpu" if jax.default_backend() == "cpu" else "xla"
    return _cpu_backend() if backend == "cpu" else _XLA


_XLA = XlaBackend()


@functools.cache
def _cpu_backend() -> Backend:
    """The one CPU backend (hashable by identity: one jit cache entry), imported on first use."""
    from warp_jax.backends.cpu import CpuBackend

    return CpuBackend()


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
                                             "use_top_p", "backend"))
def _sample(params, prompt_tokens, prompt_mask, rng, temperature, top_p, eos_ids_E, *, cfg,
            max_new_tokens, greedy, top_k, use_top_p, backend):
    model = Gemma(cfg)
    params = in_compute_dtype(params, cfg)
    variables = {"params": params}
    batch, prompt_len = prompt_tokens.shape
    cache = init_cache(cfg, batch, prompt_len + max_new_tokens)
    logits, cache = model.apply(variables, prompt_tokens,
                                left_padded_positions(prompt_mask), prompt_mask, cache,
                                logits_to_keep=1)
    noise = backend.noise(rng, max_new_tokens, batch)

    def pick(logits_BV, step, done_B):
        """The token of every row at `step`, its log-prob and whether the row is live."""
        if greedy:
            token = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
            token_logp = (jnp.take_along_axis(logits_BV, token[:, None], axis=-1)[:, 0]
                          - jax.nn.logsumexp(logits_BV, axis=-1))
        else:
            scaled = backend.filter(logits_BV / temperature, top_k,
                                    top_p if use_top_p else None)
            token, token_logp = backend.draw(jax.tree.map(lambda x: x[step], noise), scaled)
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
                                    s.live[:, None], s.cache)
        return record(s, *pick(logits[:, 0], s.step, s.done), cache, s.positions + 1)

    s = jax.lax.while_loop(cond, body, state)
    return SampleOutput(s.tokens, s.logprobs, s.mask)


def in_compute_dtype(params, cfg: GemmaConfig):
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
