"""REINFORCE maths against brute-force enumeration and the formulas, in float64 numpy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warp_jax import reinforce

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
    got = reinforce.kl_regularized_reward(jnp.asarray(r), jnp.asarray(lp), jnp.asarray(la),
                                          jnp.asarray(mask), 0.1)
    want = r - 0.1 * np.sum((lp - la) * mask, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
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


def test_token_logprobs_respect_the_mask():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 5)), jnp.float32)
    tokens = jnp.array([[1, 4, 0], [2, 2, 3]])
    mask = jnp.array([[True, True, False], [False, True, True]])
    got = reinforce.token_logprobs(logits, tokens, mask)
    want = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(tokens)[..., None],
                              -1)[..., 0] * np.asarray(mask)
    np.testing.assert_allclose(got, want, rtol=1e-6)
