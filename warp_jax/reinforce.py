"""KL-regularised REINFORCE: token log-probs, the KL-regularised reward, baselines, the loss.

All functions are float32, take explicit masks (True on completion tokens that count) and
are jittable. WARP's policy gradient (Algorithm 1, lines 7-8) is REINFORCE on the sequence
reward `r_beta = r - beta * log(pi(y|x) / pi_anchor(y|x))`, held constant (stop-gradient)
while it multiplies the score function `grad log pi(y|x)`.

References:
  Ramé et al. 2024, §2 and Algorithm 1; Williams 1992 (REINFORCE);
  Ahmadian et al. 2024, "Back to basics" (RLOO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BASELINES = ("rloo", "mean", "none")


def token_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """`log softmax(logits)[token]` per position, 0 where `mask` is False: `[B, T]`.

    `logits_BTV[:, t]` must be the logits that predicted `tokens_BT[:, t]`.
    """
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.where(mask_BT, picked, 0.0)


def sequence_logprob(logp_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """`log pi(y|x)`: the masked sum of token log-probabilities, `[B]`."""
    return jnp.sum(jnp.where(mask_BT, logp_BT.astype(jnp.float32), 0.0), axis=-1)


def kl_regularized_reward(reward_B: jax.Array, logp_policy_BT: jax.Array,
                          logp_anchor_BT: jax.Array, mask_BT: jax.Array,
                          beta: float) -> jax.Array:
    """`r - beta * sum_t mask * (log pi - log pi_anchor)`: WARP's `r_beta`, `[B]`.

    The log-ratio is sequence level (one sample of KL(pi || pi_anchor)) and the result is a
    constant for the policy gradient (stop-gradient).
    """
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
