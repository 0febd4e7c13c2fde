"""Reward models: a Gemma backbone with a scalar head on each row's last real token."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from warp_jax.gemma.config import GemmaConfig
from warp_jax.gemma.model import decode


class RewardModel(nn.Module):
    """`apply({"params": p}, tokens, mask) -> [B]` scores.

    The params are Gemma's plus `score` `[D]`, the head applied to the final-normed hidden
    state at each row's last True of `mask` (`hf.params_from_hf` reads them from
    `GemmaForSequenceClassification`-style checkpoints with `num_labels=1`). Positions count
    from each row's first real token, so left padding does not change a score.
    """

    cfg: GemmaConfig

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
        mask_BT = mask_BT.astype(bool)
        positions = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
        hidden_BTD, _, _ = decode(self, tokens_BT, positions, mask_BT, None)
        score = self.param("score", nn.with_logical_partitioning(
            nn.initializers.normal(self.cfg.embed_dim**-0.5), ("embed",)),
            (self.cfg.embed_dim,), jnp.dtype(self.cfg.param_dtype))
        t = mask_BT.shape[1]
        last_B = t - 1 - jnp.argmax(mask_BT[:, ::-1], axis=1)
        last_BD = jnp.take_along_axis(hidden_BTD, last_B[:, None, None], axis=1)[:, 0]
        return jnp.einsum("BD,D->B", last_BD.astype(jnp.float32), score.astype(jnp.float32))
