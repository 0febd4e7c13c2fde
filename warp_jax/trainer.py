"""The REINFORCE train step of WARP's runs: its config and state, the rollout and the update
as module-level functions, and `make_train_step`, which jits them for one run or M stacked
runs on a mesh.

One step: sample K completions per prompt, score them with the reward, compute the anchor's
log-probs and `r_beta`, take an Adam step on the REINFORCE loss, then update the EMA anchor
(the maths: `warp_jax.losses`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from warp_jax import merging, rewards, sampling, sharding, stacking
from warp_jax.gemma import Gemma, GemmaConfig, abstract_params, left_padded_positions
from warp_jax.losses import (
    BASELINES,
    advantages,
    kl_regularized_reward,
    reinforce_loss,
    sequence_logprob,
    token_logprobs,
)

ANCHORS = ("ema", "sft", "none")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Hyper-parameters of one REINFORCE run (closed over by the train step, never in state).

    Defaults follow the paper (beta 0.1, mu 0.01, Adam, lr 1e-6 after 100 warm-up steps,
    temperature 0.9) and our choices where it is silent (K = 2 samples, RLOO).
    """

    beta: float = 0.1  # KL coefficient in r_beta
    mu: float = 0.01  # EMA rate of the anchor
    anchor: str = "ema"  # "ema" (WARP), "sft" (fixed init) or "none" (no KL in the reward)
    num_samples: int = 2  # K completions per prompt
    baseline: str = "rloo"  # "rloo", "mean" or "none"
    max_new_tokens: int = 32  # completion length
    temperature: float = 0.9  # sampling temperature; log-probs are of this distribution
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | tuple[int, ...] | None = None  # completions stop after it (or any of them)
    learning_rate: float = 1e-6  # Adam's rate after warm-up (constant after it)
    warmup_steps: int = 100  # linear warm-up from 0
    grad_clip: float | None = None  # global-norm clipping (None: off)
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8  # optax's default; the paper does not give one
    microbatches: int = 1  # the gradient accumulated over this many slices of the prompts
    remat: bool = False  # rematerialise each block in the backward pass (`Gemma.remat`)
    sampler_backend: str = "auto"  # `sampling.sample`'s backend: "xla", "cpu" or "auto"
    # Where a run samples on a mesh: "auto" (the decode layout, `sharding.DecodeLayout`, with
    # the largest tensor parallelism the model takes), a tensor-parallel degree, or "train"
    # (on the training layout: every weight gathered for every token under FSDP).
    decode_layout: str | int = "auto"

    def __post_init__(self):
        if self.eos_id is not None and not isinstance(self.eos_id, numbers.Integral):
            object.__setattr__(self, "eos_id", tuple(self.eos_id))  # a list, made hashable
        if not sharding.is_decode_setting(self.decode_layout):
            _invalid("decode_layout", self.decode_layout, f"use {sharding.DECODE_SETTINGS}")
        choices = {"sampler_backend": sampling.BACKENDS, "anchor": ANCHORS,
                   "baseline": BASELINES}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                _invalid(name, getattr(self, name), f"use one of {valid}")
        ints = {"num_samples": 1, "max_new_tokens": 1, "warmup_steps": 0, "microbatches": 1}
        for name, least in ints.items():
            value = getattr(self, name)
            if not (isinstance(value, numbers.Integral) and value >= least):
                _invalid(name, value, "must be a positive int" if least else
                         "must be a non-negative int")
        if self.baseline == "rloo" and self.num_samples < 2:
            _invalid("num_samples", self.num_samples, "the RLOO baseline needs >= 2")
        if self.microbatches > 1 and self.baseline == "mean":
            _invalid("microbatches", self.microbatches, "needs a per-prompt baseline ('rloo' "
                     "or 'none'): the 'mean' baseline averages over the whole batch")
        # Written so that NaN fails every check.
        if not 0 <= self.mu <= 1:
            _invalid("mu", self.mu, "must be in [0, 1]")
        if not 0 <= self.beta < float("inf"):
            _invalid("beta", self.beta, "must be finite and >= 0")
        for name in ("learning_rate", "temperature", "adam_eps"):
            if not 0 < getattr(self, name) < float("inf"):
                _invalid(name, getattr(self, name), "must be finite and > 0")
        if self.grad_clip is not None and not 0 < self.grad_clip < float("inf"):
            _invalid("grad_clip", self.grad_clip, "must be finite and > 0, or None (off)")
        if not (0 <= self.adam_b1 < 1 and 0 <= self.adam_b2 < 1):
            _invalid("adam_b1, adam_b2", (self.adam_b1, self.adam_b2), "must be in [0, 1)")


def _invalid(name: str, value: Any, valid: str) -> None:
    raise ValueError(f"RLConfig.{name} = {value!r}: {valid}")


class RLState(NamedTuple):
    step: jax.Array  # [] int32: optimizer steps taken
    params: Any  # the policy
    anchor_params: Any  # the KL anchor: the policy's EMA ("ema") or the fixed init ("sft", "none")
    opt_state: Any

    @property
    def ema_params(self) -> Any:
        """`anchor_params` under the name the paper's EMA anchor gives it."""
        return self.anchor_params


def make_optimizer(rl: RLConfig) -> optax.GradientTransformation:
    """Adam with a linear warm-up to `learning_rate`, after optional global-norm clipping."""
    schedule = (optax.linear_schedule(0.0, rl.learning_rate, rl.warmup_steps)
                if rl.warmup_steps else rl.learning_rate)
    clip = [optax.clip_by_global_norm(rl.grad_clip)] if rl.grad_clip else []
    return optax.chain(*clip, optax.adam(schedule, b1=rl.adam_b1, b2=rl.adam_b2,
                                           eps=rl.adam_eps))


def init_state(params: Any, rl: RLConfig) -> RLState:
    """A run's start (Algorithm 1, line 4): policy = anchor = `params`, fresh Adam state."""
    return RLState(jnp.zeros((), jnp.int32), params, jax.tree.map(jnp.copy, params),
                   make_optimizer(rl).init(params))


def completion_logprobs(cfg: GemmaConfig, params: Any, prompt_tokens, prompt_mask,
                        completion, completion_mask, temperature: float = 1.0,
                        remat: bool = False):
    """Token log-probs `[B, N]` of completions under `softmax(logits / temperature)` and the
    entropy `[B, N]` of that distribution, from one forward pass over prompt + completion
    (`remat`: its blocks rematerialised in a backward pass)."""
    # The last completion token predicts nothing we need, so it is not fed; the vocabulary
    # projection (the costliest matmul) and the last block's queries and MLP run on the N
    # positions that predict the completion only.
    seq = jnp.concatenate([prompt_tokens, completion[:, :-1]], axis=1)
    seq_mask = jnp.concatenate([prompt_mask, completion_mask[:, :-1]], axis=1)
    logits, _ = Gemma(cfg, remat).apply(
        {"params": params}, seq, left_padded_positions(seq_mask), seq_mask,
        logits_to_keep=completion.shape[1])
    logits = logits / temperature
    lse = jax.lax.stop_gradient(jax.nn.logsumexp(logits, axis=-1))
    probs = jnp.exp(jax.lax.stop_gradient(logits) - lse[..., None])
    entropy = lse - jnp.sum(probs * jax.lax.stop_gradient(logits), axis=-1)
    return token_logprobs(logits, completion, completion_mask), entropy


def rollout(state: RLState, prompts, rng, *, cfg: GemmaConfig, rl: RLConfig,
            layout: sharding.DecodeLayout | None = None):
    """K completions of each prompt from the policy: `(tokens, mask, completion,
    completion_mask)`, the K samples of a prompt consecutive (`[P * K, ...]`). With a decode
    `layout`, the policy is moved to it (in the compute dtype) and sampled there, and the
    completions come back split like the prompts."""
    tokens, mask = (jnp.repeat(x, rl.num_samples, axis=0) for x in prompts)
    out = decode(state.params, cfg, tokens, mask, jax.random.fold_in(rng, state.step),
                 rl.max_new_tokens, layout, temperature=rl.temperature, top_k=rl.top_k,
                 top_p=rl.top_p, eos_id=rl.eos_id, backend=rl.sampler_backend)
    return tokens, mask, out.tokens, out.mask


def decode(params, cfg: GemmaConfig, tokens, mask, rng, max_new_tokens: int,
           layout: sharding.DecodeLayout | None, **kw) -> sampling.SampleOutput:
    """`sampling.sample` (keywords `kw`) of traced prompts, in the decode `layout` if one is
    given; the outputs are constrained back to the prompts' rows' sharding."""
    if layout is None:
        return sampling.sample(params, cfg, tokens, mask, rng, max_new_tokens, **kw)
    with layout.activations():
        params = layout.put(sampling.in_compute_dtype(params, cfg), abstract_params(cfg))
        out = sampling.sample(params, cfg, layout.rows(tokens), layout.rows(mask), rng,
                              max_new_tokens, **kw)
    if tokens.shape[0] % (layout.train.shape["data"] * layout.train.shape["fsdp"]) == 0:
        rows = sharding.batch_sharding(layout.train, 2)
        out = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rows), out)
    return out


def _to_microbatches(rows, microbatches: int, num_samples: int):
    """Row-major arrays `[P * K, ...]` (the K samples of a prompt consecutive) as
    `[microbatches, P * K / microbatches, ...]`: microbatch i holds prompts i, i + m, i + 2m,
    ... with all their samples, so a row-sharded batch splits without moving data between
    devices and every RLOO group stays whole."""
    prompts = rows[0].shape[0] // num_samples
    if prompts % microbatches:
        raise ValueError(f"microbatches = {microbatches} does not divide the {prompts} prompts "
                         "of a step")

    def split(x):
        x = x.reshape(prompts // microbatches, microbatches, num_samples, *x.shape[1:])
        return jnp.moveaxis(x, 1, 0).reshape(microbatches, -1, *x.shape[3:])

    return jax.tree.map(split, rows)


def _from_microbatches(rows, num_samples: int):
    """The inverse of `_to_microbatches`."""
    def merge(x):
        m = x.shape[0]
        x = x.reshape(m, -1, num_samples, *x.shape[2:])
        return jnp.moveaxis(x, 0, 1).reshape(-1, *x.shape[3:])

    return jax.tree.map(merge, rows)


def _logprobs(cfg: GemmaConfig, rl: RLConfig, params, batch):
    """Token log-probs `[B, N]` of the completions under constant `params`, one microbatch's
    logits at a time."""
    def score(rows):
        return completion_logprobs(cfg, jax.lax.stop_gradient(params), *rows, rl.temperature)[0]

    if rl.microbatches == 1:
        return score(batch)
    return _from_microbatches(
        jax.lax.map(score, _to_microbatches(batch, rl.microbatches, rl.num_samples)),
        rl.num_samples)


def update(state: RLState, batch, reward, init_params, *, cfg: GemmaConfig, rl: RLConfig):
    """The step after sampling and scoring by the reward: the anchor's log-probs of the
    completions, `r_beta`, the policy gradient, Adam and the EMA update. A non-finite loss or
    gradient leaves the state unchanged (`metrics["nonfinite"]`); `init_params` (optional)
    adds `metrics["kl_init"]`."""
    logp_anchor = _logprobs(cfg, rl, state.anchor_params, batch)
    cmask = batch[3]
    beta = 0.0 if rl.anchor == "none" else rl.beta

    def loss_fn(params, rows):
        tokens, mask, completion, cmask, reward, logp_anchor = rows
        logp, entropy = completion_logprobs(cfg, params, tokens, mask, completion, cmask,
                                            rl.temperature, rl.remat)
        r_beta = kl_regularized_reward(reward, logp, logp_anchor, cmask, beta)
        loss = reinforce_loss(logp, cmask, advantages(r_beta, rl.baseline, rl.num_samples))
        # Microbatches of equal size: their mean losses average to the batch's.
        return loss / rl.microbatches, (logp, r_beta, entropy)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    rows = (*batch, reward, logp_anchor)
    if rl.microbatches == 1:
        (loss, (logp, r_beta, entropy)), grads = grad_fn(state.params, rows)
    else:  # one microbatch's activations at a time, its gradient added to the sum
        def accumulate(total, rows):
            (loss, aux), grads = grad_fn(state.params, rows)
            return jax.tree.map(jnp.add, total, (loss, grads)), aux

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        (loss, grads), aux = jax.lax.scan(
            accumulate, zeros, _to_microbatches(rows, rl.microbatches, rl.num_samples))
        logp, r_beta, entropy = _from_microbatches(aux, rl.num_samples)
    updates, opt_state = make_optimizer(rl).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = merging.ema_update(state.anchor_params, params, rl.mu) if rl.anchor == "ema" \
        else state.anchor_params
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = RLState(state.step + 1, params, ema, opt_state)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    tokens_per_row = jnp.maximum(jnp.sum(cmask, axis=1), 1)
    metrics = {
        "reward": jnp.mean(reward), "r_beta": jnp.mean(r_beta), "loss": loss,
        "kl_anchor": jnp.mean(sequence_logprob(logp - logp_anchor, cmask)),
        "entropy": jnp.mean(jnp.sum(jnp.where(cmask, entropy, 0.0), axis=1) / tokens_per_row),
        "completion_length": jnp.mean(jnp.sum(cmask, axis=1).astype(jnp.float32)),
        "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.int32),
    }
    if init_params is not None:
        logp_init = _logprobs(cfg, rl, init_params, batch)
        metrics["kl_init"] = jnp.mean(sequence_logprob(logp - logp_init, cmask))
    return new, metrics


def step(state: RLState, prompts, rng, init_params, reward_leaves, *, cfg: GemmaConfig,
         rl: RLConfig, reward_fn: Callable, reward_def: Any,
         layout: sharding.DecodeLayout | None = None):
    """One whole step of one run with a jittable reward: `rollout` (in the decode `layout`),
    the reward (rebuilt from `reward_leaves`, see `rewards.reward_arrays`), `update`."""
    batch = rollout(state, prompts, rng, cfg=cfg, rl=rl, layout=layout)
    reward = rewards.call_reward(reward_fn, reward_def, reward_leaves, batch)
    return update(state, batch, reward, init_params, cfg=cfg, rl=rl)


def make_train_step(cfg: GemmaConfig, rl: RLConfig, reward_fn: Callable,
                    mesh: Mesh | None = None, num_runs: int | None = None):
    """Builds `train_step(state, prompts, rng, init_params=None) -> (state, metrics)`.

    One step: sample K completions per prompt, score them with `reward_fn`, compute the
    anchor's log-probs and `r_beta`, take an Adam step on the REINFORCE loss, then update
    the EMA anchor. A non-finite loss or gradient leaves the state unchanged and sets
    `metrics["nonfinite"]`. `init_params` (optional) adds `metrics["kl_init"]`.

    Args:
      cfg, rl: the model and the run's hyper-parameters. The policy's weights should be
        float32 (`cfg.param_dtype`, with `cfg.dtype` the compute dtype): in bfloat16, updates
        below a weight's rounding are lost, so a warning is raised.
      reward_fn: a jittable `(prompt_tokens, prompt_mask, completion_tokens,
        completion_mask) -> [B]`, or a host reward (`rewards.TextReward`, any callable with
        `host = True`), called between two jitted halves of the step.
      mesh: None for plain `jax.jit`; else one jit with explicit in/out shardings over the
        mesh (params by their logical axes, prompts over `data`/`fsdp`) and donated state.
        The rollout samples in the decode layout of `rl.decode_layout`
        (`sharding.decode_layout`; `ValueError` for one the model or mesh cannot take).
      num_runs: None for one run; M to train M stacked runs (every state leaf, prompt and key
        with a leading `[M]` axis, sharded over the mesh's `run` axis) in one program.

    Returns:
      The step, and `init(params) -> state` that builds the (stacked) state already sharded.
      `train_step.lower(...)` and `init.lower(params)` lower their jitted programs for
      abstract inputs (planning a job for another topology: `warp_jax.plan`);
      `train_step.shardings` holds the inputs' and outputs' shardings, `train_step.layout`
      the rollout's `sharding.DecodeLayout` (None: the training layout).
      With `num_runs`, `init` takes M stacked params (one init per run) or one run's params,
      which every run starts from (copied inside the jitted init, straight into the `run`
      sharding). Params that fit neither raise `ValueError` naming the leaf.
    """
    if jnp.dtype(cfg.param_dtype).itemsize < 4:
        warnings.warn(
            f"GemmaConfig.param_dtype = {cfg.param_dtype!r}: Adam steps and EMA moves smaller "
            "than the weights' rounding (about 0.4% of a weight in bfloat16; the paper's lr "
            "1e-6 is far below it) are lost. Keep param_dtype='float32' and compute in "
            "bfloat16 with dtype='bfloat16'.", stacklevel=2)
    host = rewards.is_host_reward(reward_fn)
    reward_leaves, reward_def = rewards.reward_arrays(reward_fn)
    boxed = abstract_params(cfg)
    shard = _Shardings(boxed, rl, mesh, num_runs)
    try:
        layout = sharding.decode_layout(boxed, mesh, rl.decode_layout)
    except ValueError as e:
        raise ValueError(f"RLConfig.{e}") from None
    reward_shardings = None
    if mesh is not None:  # the reward's arrays in their sharding on the mesh, else replicated
        reward_shardings = [
            x.sharding if isinstance(getattr(x, "sharding", None), sharding.NamedSharding)
            and x.sharding.mesh == mesh else sharding.replicated(mesh) for x in reward_leaves]
        reward_leaves = [  # abstract ones (planning a job) take the sharding they would have
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
            if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x, sh)
            for x, sh in zip(reward_leaves, reward_shardings, strict=True)]

    def jit(fn, in_axes, in_shardings, out_shardings, donate):
        """`fn` (of one run) stacked over the runs and jitted with its shardings (on a mesh)
        and donation: one program per input shape, compiled on its first call."""
        kw = {} if mesh is None else dict(in_shardings=in_shardings, out_shardings=out_shardings)
        return jax.jit(stacking.stack_runs(functools.partial(fn, cfg=cfg, rl=rl), mesh, num_runs,
                                           in_axes),
                       donate_argnums=donate, **kw)

    out = (shard.state, shard.metrics)
    programs = {  # by (name, with init_params), whose in_shardings differ
        ("step", w): jit(functools.partial(step, reward_fn=reward_fn, reward_def=reward_def,
                                           layout=layout),
                         (0, 0, 0, None, None), (shard.state, shard.prompts, shard.keys,
                                                 shard.params if w else None, reward_shardings),
                         out, (0,)) for w in (False, True)}
    programs.update({("update", w): jit(update, (0, 0, 0, None), (
        shard.state, shard.batch, shard.rewards, shard.params if w else None), out, (0,))
                     for w in (False, True)})
    programs["rollout", False] = jit(functools.partial(rollout, layout=layout), (0, 0, 0),
                                     (shard.state, shard.prompts, shard.keys), shard.batch, ())

    def train_step(state, prompts, rng, init_params=None):
        with_init = init_params is not None
        # Traced (on a first call) with the model's activations constrained on the mesh.
        with (contextlib.nullcontext() if mesh is None else sharding.activation_sharding(mesh)):
            if mesh is not None:  # host data onto a mesh that spans several processes
                prompts, rng = sharding.to_mesh((prompts, rng), (shard.prompts, shard.keys))
            if not host:
                return programs["step", with_init](state, prompts, rng, init_params,
                                                   reward_leaves)
            batch = programs["rollout", False](state, prompts, rng)
            reward = rewards.score(reward_fn, batch)
            if mesh is not None:
                reward = sharding.to_mesh(reward, shard.rewards)
            return programs["update", with_init](state, batch, reward, init_params)

    def lower(state, prompts, rng, init_params=None) -> dict[str, Any]:
        """The step's jitted programs lowered for these inputs (arrays, or
        `jax.ShapeDtypeStruct`s with shardings: nothing is allocated), as `train_step` would
        run them: `{"step": ...}`, or `{"rollout": ..., "update": ...}` around a host reward."""
        with_init = init_params is not None
        with (contextlib.nullcontext() if mesh is None else sharding.activation_sharding(mesh)):
            if not host:
                return {"step": programs["step", with_init].lower(
                    state, prompts, rng, init_params, reward_leaves)}
            batch = jax.eval_shape(programs["rollout", False], state, prompts, rng)
            reward = jax.ShapeDtypeStruct(batch[0].shape[:-1], jnp.float32)
            if mesh is not None:
                batch, reward = jax.tree.map(
                    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                    (batch, reward), (shard.batch, shard.rewards))
            return {"rollout": programs["rollout", False].lower(state, prompts, rng),
                    "update": programs["update", with_init].lower(state, batch, reward,
                                                                  init_params)}

    train_step.lower = lower
    train_step.shardings = shard
    train_step.layout = layout
    init_fn = functools.partial(init_state, rl=rl)
    out = {} if mesh is None else dict(out_shardings=shard.state)
    init_one = jax.jit(init_fn, **out)
    if num_runs:
        init_stacked = jax.jit(jax.vmap(init_fn), **out)
        # One set of params is broadcast inside the program, so that the M copies only ever
        # exist sharded over `run` (an eager stack would hold all M on every device first).
        init_shared = jax.jit(lambda p: jax.vmap(init_fn)(stacking.broadcast(p, num_runs)),
                              **out)
    shapes = stacking.param_shapes(boxed)

    def program(params):
        if stacking.is_stacked(params, shapes, num_runs):
            return init_stacked
        return init_shared if num_runs else init_one

    def init(params):
        return program(params)(params)

    init.lower = lambda params: program(params).lower(params)

    return train_step, init


class _Shardings:
    """The shardings of the train step's inputs and outputs on a mesh (None without one)."""

    def __init__(self, boxed, rl, mesh, num_runs):
        if mesh is None:
            self.state = self.params = self.prompts = self.keys = self.batch = None
            self.rewards = self.metrics = None
            return
        abstract = jax.eval_shape(lambda p: init_state(p, rl), boxed)
        prefix = [("run", num_runs)] if num_runs else []
        run = sharding.run_axis(mesh, num_runs)
        self.state = sharding.param_shardings(abstract, mesh, prefix)
        self.params = sharding.param_shardings(boxed, mesh)
        rows = sharding.batch_sharding(mesh, 2, num_runs)
        self.prompts = (rows, rows)
        self.batch = (rows, rows, rows, rows)
        self.keys = sharding.NamedSharding(mesh, sharding.PartitionSpec(*run))
        self.rewards = sharding.batch_sharding(mesh, 1, num_runs)
        self.metrics = sharding.NamedSharding(mesh, sharding.PartitionSpec(*run))
