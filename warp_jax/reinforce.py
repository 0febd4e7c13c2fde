"""KL-regularised REINFORCE, as DESIGN.md names it: the maths (`warp_jax.losses`) and the
train step (`warp_jax.trainer`) under one import.

    reinforce.kl_regularized_reward(reward, logp_policy, logp_anchor, mask, beta)
    train_step, init = reinforce.make_train_step(cfg, rl, reward_fn, mesh=None, num_runs=None)
"""

from warp_jax.losses import (
    BASELINES,
    advantages,
    kl_regularized_reward,
    reinforce_loss,
    rloo_advantage,
    sequence_logprob,
    token_logprobs,
)
from warp_jax.rewards import call_reward, reward_arrays
from warp_jax.stacking import stack_runs
from warp_jax.trainer import (
    ANCHORS,
    RLConfig,
    RLState,
    completion_logprobs,
    init_state,
    make_optimizer,
    make_train_step,
    rollout,
    step,
    update,
)

__all__ = ["ANCHORS", "BASELINES", "RLConfig", "RLState", "advantages", "call_reward",
           "completion_logprobs", "init_state", "kl_regularized_reward", "make_optimizer",
           "make_train_step", "reinforce_loss", "reward_arrays", "rloo_advantage", "rollout",
           "sequence_logprob", "stack_runs", "step", "token_logprobs", "update"]
