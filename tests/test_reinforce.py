"""REINFORCE maths against brute-force enumeration and the formulas, in float64 numpy."""

import dataclasses
import functools
import itertools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warp_jax import merging, reinforce, sharding
from warp_jax.gemma import Gemma, GemmaConfig

V, BETA = 3, 0.1
SEQS = np.array(list(itertools.product(range(V), repeat=2)))  # every completion of length 2


def _reward(seqs):
    return np.where(seqs[:, 0] == seqs[:, 1], 1.0, -0.5) + 0.3 * seqs[:, 1]


def _np_logprob(theta, seqs):
    """log pi(y) of a tabular autoregressive policy, float64."""
    def log_softmax(x):
        return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1,
                                 keepdims=True)) - x.max(-1, keepdims=True)
    first = log_softmax(theta["t1"])[seqs[:, 0]]
    second = log_softmax(theta["t2"])[seqs[:, 0], seqs[:, 1]]
    return first + second


def _objective(theta, anchor):
    """Exact KL-regularised objective sum_y pi(y) (r(y) - beta log pi(y)/pi_anchor(y))."""
    logp, logp_anchor = _np_logprob(theta, SEQS), _np_logprob(anchor, SEQS)
    return np.sum(np.exp(logp) * (_reward(SEQS) - BETA * (logp - logp_anchor)))


def _logits(theta, seqs):
    """[B, 3, V]: steps 1 and 2, plus a masked padding step with garbage logits."""
    b = seqs.shape[0]
    return jnp.stack([jnp.broadcast_to(theta["t1"], (b, V)), theta["t2"][seqs[:, 0]],
                      jnp.full((b, V), 7.0)], axis=1)


def test_reinforce_gradient_is_the_exact_gradient_of_the_kl_objective():
    rng = np.random.default_rng(0)
    theta = {"t1": rng.normal(size=V), "t2": rng.normal(size=(V, V))}
    anchor = {"t1": rng.normal(size=V), "t2": rng.normal(size=(V, V))}
    tokens = jnp.asarray(np.concatenate([SEQS, np.zeros((len(SEQS), 1), int)], 1))
    mask = jnp.asarray(np.array([[True, True, False]] * len(SEQS)))
    anchor_logp = reinforce.token_logprobs(
        _logits(jax.tree.map(jnp.asarray, anchor), SEQS), tokens, mask)

    def loss(th):
        logp = reinforce.token_logprobs(_logits(th, SEQS), tokens, mask)
        r_beta = reinforce.kl_regularized_reward(jnp.asarray(_reward(SEQS), jnp.float32), logp,
                                                 anchor_logp, mask, BETA)
        # Enumerating every y: weight each by pi(y) (a constant) to get the expectation.
        weight = jax.lax.stop_gradient(jnp.exp(reinforce.sequence_logprob(logp, mask)))
        return reinforce.reinforce_loss(logp, mask, len(SEQS) * weight * r_beta)

    grad = jax.grad(loss)(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), theta))
    eps = 1e-6
    for name in ("t1", "t2"):
        exact = np.zeros_like(theta[name])
        for idx in np.ndindex(theta[name].shape):
            up = {k: v.copy() for k, v in theta.items()}
            down = {k: v.copy() for k, v in theta.items()}
            up[name][idx] += eps
            down[name][idx] -= eps
            exact[idx] = (_objective(up, anchor) - _objective(down, anchor)) / (2 * eps)
        np.testing.assert_allclose(-np.asarray(grad[name]), exact, atol=2e-5, rtol=1e-4)


def test_kl_regularized_reward_matches_the_formula():
    rng = np.random.default_rng(1)
    lp, la = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    mask = rng.random((4, 5)) > 0.3
    r = rng.normal(size=4)
    got = reinforce.kl_regularized_reward(r, lp, la, mask, 0.1)  # NumPy in
    want = r - 0.1 * np.sum((lp - la) * mask, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    traced = jax.jit(reinforce.kl_regularized_reward)(r, lp, la, mask, 0.1)
    np.testing.assert_allclose(traced, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        reinforce.kl_regularized_reward(r, lp, la, mask, -0.1)
    with pytest.raises(ValueError, match=r"must all be \[B, T\]"):
        reinforce.kl_regularized_reward(jnp.asarray(r), jnp.asarray(lp), jnp.asarray(la[:, :3]),
                                        jnp.asarray(mask), 0.1)


def test_rloo_matches_its_formula_and_baselines_are_selectable():
    r = np.array([1.0, 2.0, 4.0, -1.0, 0.0, 5.0])
    got = reinforce.rloo_advantage(jnp.asarray(r), 3)
    want = [r[i] - np.mean(np.delete(r[3 * (i // 3):3 * (i // 3) + 3], i % 3)) for i in range(6)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(reinforce.advantages(jnp.asarray(r), "mean"), r - r.mean(),
                               rtol=1e-6)
    np.testing.assert_allclose(reinforce.advantages(jnp.asarray(r), "none"), r)
    with pytest.raises(ValueError, match="K >= 2"):
        reinforce.rloo_advantage(jnp.asarray(r), 1)
    with pytest.raises(ValueError, match="not a multiple of K = 4"):
        reinforce.rloo_advantage(jnp.asarray(r), 4)
    with pytest.raises(ValueError, match="unknown baseline 'ppo'"):
        reinforce.advantages(jnp.asarray(r), "ppo")
    with pytest.raises(ValueError, match=r"RLConfig.adam_eps = 0.0: must be finite and > 0"):
        reinforce.RLConfig(adam_eps=0.0)
    for field, value in (("beta", float("nan")), ("learning_rate", float("nan")),
                         ("grad_clip", -1.0), ("mu", 1.5), ("temperature", 0.0)):
        with pytest.raises(ValueError, match=rf"RLConfig.{field} = {value!r}: must"):
            reinforce.RLConfig(**{field: value})
    assert hash(reinforce.RLConfig(eos_id=[1, 106])) == hash(reinforce.RLConfig(eos_id=(1, 106)))


def test_token_logprobs_respect_the_mask():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 5)), jnp.float32)
    tokens = jnp.array([[1, 4, 0], [2, 2, 3]])
    mask = jnp.array([[True, True, False], [False, True, True]])
    got = reinforce.token_logprobs(logits, tokens, mask)
    want = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(tokens)[..., None],
                              -1)[..., 0] * np.asarray(mask)
    np.testing.assert_allclose(got, want, rtol=1e-6)


GOOD = 5  # the toy reward: the fraction of completion tokens equal to this one


def _toy_reward(prompt_tokens, prompt_mask, completion, completion_mask):
    hits = jnp.sum((completion == GOOD) & completion_mask, axis=1)
    return hits / jnp.maximum(jnp.sum(completion_mask, axis=1), 1)


class _HostReward:
    host = True

    def __call__(self, prompt_tokens, prompt_mask, completion, completion_mask):
        assert isinstance(completion, np.ndarray)
        hits = np.sum((completion == GOOD) & completion_mask, axis=1)
        return hits / np.maximum(np.sum(completion_mask, axis=1), 1)


@pytest.fixture(scope="module")
def policy():
    cfg = GemmaConfig.from_preset("tiny", vocab_size=16, num_layers=1)
    params = nn.unbox(Gemma(cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, 16, size=(4, 3)).astype(np.int32)
    mask = np.ones_like(prompts, bool)
    mask[1, 0] = False
    return cfg, params, (jnp.asarray(prompts), jnp.asarray(mask))


# Adam's eps above float32 rounding: the K samples of a prompt share their first position and
# RLOO's advantages cancel there, so some gradient entries are pure rounding, which Adam with
# eps = 1e-8 would blow up into lr-sized updates that differ between reduction orders (sharded
# or not).
RL = reinforce.RLConfig(beta=0.1, mu=0.05, num_samples=2, max_new_tokens=4,
                        learning_rate=3e-3, warmup_steps=5, temperature=1.0, adam_eps=1e-6)


@pytest.fixture(scope="module")
def step_fns(policy):
    cfg, _, _ = policy
    return {anchor: reinforce.make_train_step(cfg, dataclasses.replace(RL, anchor=anchor),
                                              _toy_reward) for anchor in ("ema", "sft")}


def _copy(tree):
    return jax.tree.map(np.array, tree)


def test_training_raises_the_reward_with_bounded_kl(policy, step_fns):
    _cfg, params, prompts = policy
    step, init = step_fns["ema"]
    state = init(params)
    history = []
    for i in range(300):
        state, metrics = step(state, prompts, jax.random.key(i))
        history.append(jax.device_get(metrics))
    first = np.mean([m["reward"] for m in history[:20]])
    last = np.mean([m["reward"] for m in history[-20:]])
    assert last > first + 0.3, (first, last)
    # The KL-regularised optimum has KL <= (max r - min r) / beta.
    assert max(m["kl_anchor"] for m in history[-50:]) < 1.0 / RL.beta
    assert sum(m["nonfinite"] for m in history) == 0 and int(state.step) == 300


def test_ema_update_uses_mu_and_the_sft_anchor_never_moves(policy, step_fns):
    _cfg, params, prompts = policy
    step, init = step_fns["ema"]
    state = init(params)
    state, _ = step(state, prompts, jax.random.key(0))
    before = _copy(state)
    state, _ = step(state, prompts, jax.random.key(1))
    want = merging.ema_update(before.anchor_params, _copy(state.params), RL.mu)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 _copy(state.anchor_params), want)
    step, init = step_fns["sft"]
    state = init(params)
    for i in range(3):
        state, _ = step(state, prompts, jax.random.key(i))
    jax.tree.map(np.testing.assert_array_equal, _copy(state.anchor_params), _copy(params))
    assert not np.allclose(state.params["final_norm"]["scale"], params["final_norm"]["scale"])


def test_a_nan_reward_skips_the_update(policy):
    cfg, params, prompts = policy
    step, init = reinforce.make_train_step(
        cfg, RL, lambda *batch: jnp.full(batch[0].shape[:1], jnp.nan))
    state = init(params)
    before = _copy(state)
    state, metrics = step(state, prompts, jax.random.key(0))
    assert int(metrics["nonfinite"]) == 1
    jax.tree.map(np.testing.assert_array_equal, _copy(state), before)


def test_second_call_does_not_recompile_and_host_rewards_match(policy, step_fns):
    cfg, params, prompts = policy
    step, init = step_fns["ema"]
    state = init(params)
    state, _ = step(state, prompts, jax.random.key(0), params)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: compiles.append(event) if "backend_compile" in event else None)
    step(state, prompts, jax.random.key(1), params)
    assert not compiles
    host_step, host_init = reinforce.make_train_step(cfg, RL, _HostReward())
    host_state = host_init(params)
    fused_state = init(params)
    for i in range(2):
        host_state, host_metrics = host_step(host_state, prompts, jax.random.key(i), params)
        fused_state, fused_metrics = step(fused_state, prompts, jax.random.key(i), params)
    for name in ("reward", "kl_anchor", "kl_init", "grad_norm"):
        np.testing.assert_allclose(host_metrics[name], fused_metrics[name], rtol=1e-5,
                                   atol=1e-6)


def test_init_names_params_that_fit_neither_one_run_nor_the_stack(policy):
    cfg, params, _ = policy
    _, init = reinforce.make_train_step(cfg, RL, _toy_reward, num_runs=2)
    with pytest.raises(ValueError, match=r"params\['final_norm'\]\['scale'\]: shape \(3, 64\), "
                       r"expected \(64,\) or \(2, 64\) for 2 stacked runs"):
        init(jax.tree.map(lambda x: jnp.stack([x] * 3), params))
    half = {**params, "final_norm": jax.tree.map(lambda x: jnp.stack([x, x]), params["final_norm"])}
    with pytest.raises(ValueError, match="mix one run's shapes and 2 stacked"):
        init(half)
    with pytest.raises(ValueError, match=r"missing \[\"\['final_norm'\]\['scale'\]\"\]"):
        init({k: v for k, v in params.items() if k != "final_norm"})


def _close(a, b, tol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol),
                 _copy(a), _copy(b))


REMAT = "Involuntary full rematerialization"  # XLA's warning for a sharding it cannot follow


def test_sharded_step_equals_single_device(policy, step_fns, capfd):
    cfg, params, prompts = policy
    step, init = step_fns["ema"]
    mesh = sharding.make_mesh(fsdp=2, model=4)
    sharded_step, sharded_init = reinforce.make_train_step(cfg, RL, _toy_reward, mesh=mesh)
    ref, state = init(params), sharded_init(params)
    q = state.params["layer_0"]["attn"]["q"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model", None)
    for i in range(3):
        ref, ref_metrics = step(ref, prompts, jax.random.key(i))
        state, metrics = sharded_step(state, prompts, jax.random.key(i))
    _close(state, ref)
    _close(metrics, ref_metrics)
    assert state.opt_state[0][0].mu["layer_0"]["attn"]["q"].sharding.spec == q.sharding.spec
    assert REMAT not in capfd.readouterr().err


# Every mesh axis, and what `warp.run` picks for a small batch on 8 devices: without the
# model's activation constraints, the vmapped embedding lookup is fully rematerialised.
@pytest.mark.parametrize("axes, microbatches", [(dict(run=2, fsdp=2, model=2), 1),
                                                (dict(run=2, data=2, fsdp=2), 1),
                                                (dict(run=2, data=2, fsdp=2), 2)])
def test_stacked_runs_on_the_run_axis_equal_separate_runs(policy, step_fns, axes, microbatches,
                                                          capfd):
    cfg, params, prompts = policy
    step, init = step_fns["ema"]
    mesh = sharding.make_mesh(**axes)
    stacked_step, stacked_init = reinforce.make_train_step(
        cfg, dataclasses.replace(RL, microbatches=microbatches), _toy_reward, mesh=mesh,
        num_runs=2)
    runs_prompts = tuple(jnp.stack([x, x[::-1]]) for x in prompts)  # per-run prompt order
    state = stacked_init(params)  # every run starts from params
    assert state.params["final_norm"]["scale"].sharding.spec[0] == "run"
    _close(stacked_init(jax.tree.map(lambda x: jnp.stack([x, x]), params)), state)
    keys = jax.random.split(jax.random.key(7), 2)
    for _ in range(2):
        state, metrics = stacked_step(state, runs_prompts, keys)
    for m in range(2):
        ref = init(params)
        for _ in range(2):
            ref, ref_metrics = step(ref, tuple(x[m] for x in runs_prompts), keys[m])
        _close(jax.tree.map(lambda x, m=m: x[m], state), ref)
        _close(jax.tree.map(lambda x, m=m: x[m], metrics), ref_metrics)
    assert REMAT not in capfd.readouterr().err


def test_microbatches_and_remat_take_the_same_step_in_less_memory(policy, step_fns, capfd):
    cfg, params, prompts = policy
    step, init = step_fns["ema"]
    lean = dataclasses.replace(RL, microbatches=2, remat=True)
    lean_step, lean_init = reinforce.make_train_step(cfg, lean, _toy_reward)
    mesh = sharding.make_mesh(fsdp=2, model=4)  # one prompt (2 rows) per microbatch
    sharded_step, sharded_init = reinforce.make_train_step(
        cfg, dataclasses.replace(RL, microbatches=4), _toy_reward, mesh=mesh)
    ref, state, sharded = init(params), lean_init(params), sharded_init(params)
    for i in range(3):
        ref, ref_metrics = step(ref, prompts, jax.random.key(i), params)
        state, metrics = lean_step(state, prompts, jax.random.key(i), params)
        sharded, sharded_metrics = sharded_step(sharded, prompts, jax.random.key(i), params)
    for got, got_metrics in ((state, metrics), (sharded, sharded_metrics)):
        _close(got, ref)
        _close(got_metrics, ref_metrics)
    assert REMAT not in capfd.readouterr().err

    # The update (the anchor's and the init's log-probs, the gradient): one microbatch's
    # activations and logits at a time.
    rows, n = 32, 32
    rng = np.random.default_rng(1)
    batch = (jnp.asarray(rng.integers(3, 16, (rows, 3)), jnp.int32), jnp.ones((rows, 3), bool),
             jnp.asarray(rng.integers(3, 16, (rows, n)), jnp.int32), jnp.ones((rows, n), bool))
    args = (reinforce.init_state(params, RL), batch, jnp.ones((rows,)), params)

    def temp_bytes(microbatches):
        rl = dataclasses.replace(RL, microbatches=microbatches, max_new_tokens=n)
        update = jax.jit(functools.partial(reinforce.update, cfg=cfg, rl=rl))
        return update.lower(*args).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(4) < 0.5 * temp_bytes(1)


def test_microbatches_must_split_the_prompts_into_whole_groups(policy):
    cfg, params, prompts = policy
    with pytest.raises(ValueError, match="microbatches = 0: must be a positive int"):
        dataclasses.replace(RL, microbatches=0)
    with pytest.raises(ValueError, match="needs a per-prompt baseline"):
        dataclasses.replace(RL, microbatches=2, baseline="mean")
    step, init = reinforce.make_train_step(cfg, dataclasses.replace(RL, microbatches=3),
                                           _toy_reward)
    with pytest.raises(ValueError, match="microbatches = 3 does not divide the 4 prompts"):
        step(init(params), prompts, jax.random.key(0))


def test_bfloat16_compute_keeps_float32_weights_that_take_the_papers_small_steps(policy):
    """At the paper's lr 1e-6, an Adam step is far below a bfloat16 weight's rounding (about
    0.4% of it): float32 weights with bfloat16 compute move, bfloat16 weights mostly do not,
    and a bfloat16 policy is warned about."""
    cfg, _, prompts = policy
    rl = dataclasses.replace(RL, learning_rate=1e-6, warmup_steps=0)

    def reward(prompt_tokens, prompt_mask, completion, completion_mask):
        return jnp.mean(completion * completion_mask, axis=1) / cfg.vocab_size

    moved = {}
    for param_dtype in ("float32", "bfloat16"):
        mixed = cfg.replace(dtype="bfloat16", param_dtype=param_dtype)
        params = nn.unbox(Gemma(mixed).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))[
            "params"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step, init = reinforce.make_train_step(mixed, rl, reward)
        assert any("Keep param_dtype='float32'" in str(w.message) for w in caught) == (
            param_dtype == "bfloat16")
        state = init(params)
        for i in range(3):
            state, metrics = step(state, prompts, jax.random.key(i))
        assert float(metrics["grad_norm"]) > 0
        assert jax.tree.leaves(state.params)[0].dtype == jnp.dtype(param_dtype)
        moved[param_dtype] = np.mean([np.mean(np.asarray(a) != np.asarray(b)) for a, b in zip(
            jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True)])
    assert moved["float32"] > 0.99 and moved["bfloat16"] < 0.5, moved


@pytest.mark.parametrize("scan", [False, True])
def test_gemma4_moe_step_sharded_and_stacked_equals_single_device(capfd, scan):
    """A tiny Gemma 4 with routed experts (their width split over `model`) and per-layer
    inputs, its layers unrolled or scanned, takes the same REINFORCE steps on the 8-device
    mesh, one run sharded or two stacked on `run` (sampling on the decode layout), as on one
    device."""
    cfg = GemmaConfig.from_preset("tiny_gemma4_moe", vocab_size=16, per_layer_input_dim=4,
                                  num_layers=4 if scan else 2, scan_layers=scan)
    params = nn.unbox(Gemma(cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"])
    prompts = tuple(jnp.asarray(x) for x in (
        np.random.default_rng(1).integers(3, 16, size=(4, 3)).astype(np.int32),
        np.arange(3) >= np.array([[0], [1], [0], [2]])))
    # Adam's eps at 1: a step is lr * m / (sqrt(v) + 1), so a gradient entry that differs by
    # its float32 rounding between reduction orders moves its weight by lr times that
    # difference. At eps = 1e-6 an entry far below eps (the router's and the layer scalars'
    # are) is amplified lr / eps = 3e3 times, past any tolerance a different CPU respects.
    rl = dataclasses.replace(RL, adam_eps=1.0)
    step, init = reinforce.make_train_step(cfg, rl, _toy_reward)
    sharded_step, sharded_init = reinforce.make_train_step(
        cfg, rl, _toy_reward, mesh=sharding.make_mesh(fsdp=2, model=4))
    stacked_step, stacked_init = reinforce.make_train_step(
        cfg, rl, _toy_reward, mesh=sharding.make_mesh(run=2, fsdp=2, model=2), num_runs=2)
    ref, state, stacked = init(params), sharded_init(params), stacked_init(params)
    first = state.params["layers"]["layer_0"] if scan else state.params["layer_0"]
    assert first["experts"]["gate_up"].sharding.spec == jax.sharding.PartitionSpec(
        *(None,) * scan, None, "fsdp", None, "model")
    keys = jax.random.split(jax.random.key(3), 2)
    for _ in range(2):
        ref, ref_metrics = step(ref, prompts, keys[0])
        state, metrics = sharded_step(state, prompts, keys[0])
        stacked, _ = stacked_step(stacked, tuple(jnp.stack([x, x]) for x in prompts), keys)
    _close(state, ref)
    _close(metrics, ref_metrics)
    _close(jax.tree.map(lambda x: x[0], stacked), ref)
    last = (lambda p: p["layers"]["layer_1"]) if scan else (lambda p: p["layer_1"])
    moved = last(ref.params)["experts"]["down"] - last(params)["experts"]["down"]
    assert float(jnp.max(jnp.abs(moved))) > 0 and float(ref_metrics["grad_norm"]) > 0
    assert REMAT not in capfd.readouterr().err
