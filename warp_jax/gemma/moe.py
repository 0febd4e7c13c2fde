"""Gemma 4's mixture of experts: the router and the experts beside each block's MLP."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from warp_jax.gemma.config import GemmaConfig
from warp_jax.gemma.layers import _norm, _param


class Router(nn.Module):
    """Gemma 4's router: each token's top-k experts and their weights `[B, T, E]` (zero for
    the experts it is not routed to)."""

    cfg: GemmaConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg, pd, dt = self.cfg, jnp.dtype(self.cfg.param_dtype), jnp.dtype(self.cfg.dtype)
        d, e = cfg.embed_dim, cfg.num_experts
        scale = _param(self, "scale", nn.initializers.ones_init(), (d,), ("embed",), pd)
        proj = _param(self, "proj", nn.initializers.normal(d**-0.5), (d, e), ("embed", "expert"),
                      pd)
        per_expert = _param(self, "per_expert_scale", nn.initializers.ones_init(), (e,),
                            ("expert",), pd)
        h = _norm(cfg, "norm", with_scale=False)(x_BTD) * scale.astype(dt)[None, None] * (
            jnp.asarray(d**-0.5, dt))
        probs_BTE = jax.nn.softmax(
            jnp.einsum("BTD,DE->BTE", h, proj.astype(dt)).astype(jnp.float32), axis=-1)
        top_w, top_i = jax.lax.top_k(probs_BTE, cfg.experts_per_token)
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        top_w = top_w * per_expert.astype(jnp.float32)[top_i]
        return jnp.einsum("BTKE,BTK->BTE", jax.nn.one_hot(top_i, e, dtype=jnp.float32),
                          top_w).astype(dt)


class Experts(nn.Module):
    """Gemma 4's experts: E GeGLUs stacked on a leading `expert` axis (which the sharding
    rules map onto the `model` mesh axis).

    Dispatch is dense and dropless: every expert runs on every token and the router's
    weights, zero off each token's top k, combine them. One einsum per projection, no
    host-side loop, no capacity and so no dropped tokens: the outputs are transformers'
    (whose experts also never drop). The price is E / k times the routed FLOPs; see
    docs/models.md."""

    cfg: GemmaConfig

    @nn.compact
    def __call__(self, x_BTD, weights_BTE):
        cfg, pd, dt = self.cfg, jnp.dtype(self.cfg.param_dtype), jnp.dtype(self.cfg.dtype)
        d, e, i = cfg.embed_dim, cfg.num_experts, cfg.expert_mlp_dim
        gate_up = _param(self, "gate_up", nn.initializers.normal(d**-0.5), (e, d, 2 * i),
                         ("expert", "embed", "mlp"), pd)
        down = _param(self, "down", nn.initializers.normal(i**-0.5), (e, i, d),
                      ("expert", "mlp", "embed"), pd)
        gated_BTEI, linear_BTEI = jnp.split(
            jnp.einsum("BTD,EDI->BTEI", x_BTD, gate_up.astype(dt)), 2, axis=-1)
        hidden_BTEI = jax.nn.gelu(gated_BTEI, approximate=True) * linear_BTEI
        return jnp.einsum("BTEI,BTE,EID->BTD", hidden_BTEI, weights_BTE, down.astype(dt))
