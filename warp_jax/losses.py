"""Model-agnostic RL maths in float32 with explicit masks: token log-probs, the
KL-regularised reward, advantages, and the REINFORCE, next-token and Bradley–Terry losses.

Masks are True on the tokens that count. WARP's policy gradient (Algorithm 1, lines 7-8) is
REINFORCE on the sequence reward `r_beta = r - beta * log(pi(y|x) / pi_anchor(y|x))`, held
constant (stop-gradient) while it multiplies the score function `grad log pi(y|x)`. The same
`token_logprobs` serves the SFT loss, the evaluation's KL and the train step.

References:
  Ramé et al. 2024, §2 and Algorithm 1; Williams 1992 (REINFORCE);
  Ahmadian et al. 2024, "Back to basics" (RLOO); Bradley & Terry 1952.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

BASELINES = ("rloo", "mean", "none")


def token_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """`log softmax(logits)[token]` per position, 0 where `mask` is False: `[B, T]`.

    `logits_BTV[:, t]` must be the logits that predicted `tokens_BT[:, t]`.
    """
    picked = _picked_logprob(logits_BTV.astype(jnp.float32), tokens_BT.astype(jnp.int32))
    return jnp.where(mask_BT, picked, 0.0)


def _picked_forward(logits_BTV, tokens_BT):
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked = jnp.take_along_axis(logits_BTV, tokens_BT[..., None], axis=-1)[..., 0]
    return picked - lse_BT, (logits_BTV, tokens_BT, lse_BT)


def _picked_backward(residuals, g_BT):
    # `g * (one_hot - softmax)` in one elementwise pass over the logits (autodiff would
    # materialise the softmax, a one-hot and a gather's scatter-add: several passes).
    logits_BTV, tokens_BT, lse_BT = residuals
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits_BTV.shape, logits_BTV.ndim - 1)
    one_hot = tokens_BT[..., None] == vocab
    softmax = jnp.exp(logits_BTV - lse_BT[..., None])
    return g_BT[..., None] * (one_hot - softmax), None


_picked_logprob = jax.custom_vjp(lambda logits, tokens: _picked_forward(logits, tokens)[0])
_picked_logprob.defvjp(_picked_forward, _picked_backward)


def sequence_logprob(logp_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """`log pi(y|x)`: the masked sum of token log-probabilities, `[B]`."""
    return jnp.sum(jnp.where(mask_BT, logp_BT.astype(jnp.float32), 0.0), axis=-1)


def kl_regularized_reward(reward_B: jax.Array, logp_policy_BT: jax.Array,
                          logp_anchor_BT: jax.Array, mask_BT: jax.Array,
                          beta: float) -> jax.Array:
    """`r - beta * sum_t mask * (log pi - log pi_anchor)`: WARP's `r_beta`, `[B]`.

    The log-ratio is sequence level (one sample of KL(pi || pi_anchor)) and the result is a
    constant for the policy gradient (stop-gradient). Takes JAX or NumPy arrays; `beta` may be
    traced.
    """
    reward_B, logp_policy_BT, logp_anchor_BT, mask_BT = (
        jnp.asarray(x) for x in (reward_B, logp_policy_BT, logp_anchor_BT, mask_BT))
    if isinstance(beta, numbers.Real) and not beta >= 0:
        raise ValueError(f"beta must be >= 0 (the KL coefficient), got {beta}")
    if logp_policy_BT.shape != logp_anchor_BT.shape or logp_policy_BT.shape != mask_BT.shape:
        raise ValueError(f"logp_policy {logp_policy_BT.shape}, logp_anchor "
                         f"{logp_anchor_BT.shape} and mask {mask_BT.shape} must all be [B, T]")
    if reward_B.shape != logp_policy_BT.shape[:1]:
        raise ValueError(f"reward {reward_B.shape} must be [B] for logps {logp_policy_BT.shape}")
    log_ratio = sequence_logprob(logp_policy_BT - logp_anchor_BT, mask_BT)
    return jax.lax.stop_gradient(reward_B.astype(jnp.float32) - beta * log_ratio)


def rloo_advantage(reward_B: jax.Array, num_samples: int) -> jax.Array:
    """Leave-one-out advantages: `r_i - mean_{j != i} r_j` within each prompt's K samples.

    Rows are grouped as `[B / K, K]`: the K samples of one prompt are consecutive.
    """
    if num_samples < 2:
        raise ValueError(f"the RLOO baseline needs K >= 2 samples per prompt, got {num_samples}")
    if reward_B.shape[0] % num_samples:
        raise ValueError(f"batch {reward_B.shape[0]} is not a multiple of K = {num_samples}")
    grouped = reward_B.astype(jnp.float32).reshape(-1, num_samples)
    others = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (num_samples - 1)
    return (grouped - others).reshape(-1)


def advantages(reward_B: jax.Array, baseline: str, num_samples: int = 1) -> jax.Array:
    """Advantages of `r_beta` under a baseline: "rloo" (default in WARP), "mean" or "none"."""
    if baseline == "rloo":
        return rloo_advantage(reward_B, num_samples)
    if baseline == "mean":
        return reward_B - jnp.mean(reward_B)
    if baseline == "none":
        return reward_B
    raise ValueError(f"unknown baseline {baseline!r}; use one of {BASELINES}")


def reinforce_loss(logp_BT: jax.Array, mask_BT: jax.Array, advantage_B: jax.Array) -> jax.Array:
    """`-mean_b(A_b * log pi(y_b|x_b))` with the advantage held constant.

    Its gradient is the REINFORCE estimate of `-grad E[r_beta]`, unbiased for the gradient of
    the KL-regularised objective when `A` is `r_beta` minus a baseline independent of `y_b`.
    """
    advantage = jax.lax.stop_gradient(advantage_B.astype(jnp.float32))
    return -jnp.mean(advantage * sequence_logprob(logp_BT, mask_BT))


def next_token_loss(logits_BTV: jax.Array, tokens_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over the real tokens of left-padded sequences: position
    t predicts token t + 1 where both are real."""
    weight = mask_BT[:, 1:] & mask_BT[:, :-1]
    logp = token_logprobs(logits_BTV[:, :-1], tokens_BT[:, 1:], weight)
    return -jnp.sum(logp) / jnp.maximum(jnp.sum(weight), 1).astype(jnp.float32)


def bradley_terry_loss(score_chosen_B: jax.Array, score_rejected_B: jax.Array,
                       target_B: jax.Array | None = None) -> jax.Array:
    """`mean(-log sigmoid(r_chosen - r_rejected))`: the preference likelihood's negative log.

    With `target_B`, the probability that the chosen response is preferred (a soft label,
    e.g. `sigmoid(gold_chosen - gold_rejected)` for gold logits), the cross-entropy
    `-mean(p log sigmoid(d) + (1 - p) log sigmoid(-d))`: a near-tie then teaches a small
    margin instead of a hard ranking.
    """
    margin = score_chosen_B.astype(jnp.float32) - score_rejected_B.astype(jnp.float32)
    if target_B is None:
        return -jnp.mean(jax.nn.log_sigmoid(margin))
    p = target_B.astype(jnp.float32)
    return -jnp.mean(p * jax.nn.log_sigmoid(margin) + (1 - p) * jax.nn.log_sigmoid(-margin))
