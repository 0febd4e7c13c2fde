"""The Gemma decoder's building blocks: params with logical axis names, Gemma's RMSNorm,
rotary embeddings, soft-capping, and the activation constraints the caller's sharding rules
turn on (`warp_jax.sharding.activation_sharding`; without rules they do nothing)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from warp_jax.gemma.config import GemmaConfig


def _param(module, name, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: `x / rms(x) * (1 + scale)`, in float32; Gemma 4's (`plus_one=False`)
    multiplies by `scale` itself (initialised to ones), or by nothing (`with_scale=False`)."""

    eps: float
    param_dtype: Any
    axis_name: str = "embed"
    plus_one: bool = True
    with_scale: bool = True

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if not self.with_scale:
            return normed.astype(x.dtype)
        init = nn.initializers.zeros_init() if self.plus_one else nn.initializers.ones_init()
        scale = _param(self, "scale", init, (x.shape[-1],), (self.axis_name,), self.param_dtype)
        scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (normed * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


def _norm(cfg: GemmaConfig, name: str, axis_name: str = "embed", with_scale: bool = True,
          parent=None) -> RMSNorm:
    """The RMSNorm of `cfg`'s family."""
    bind = {} if parent is None else {"parent": parent}  # None would unbind it
    return RMSNorm(cfg.norm_eps, jnp.dtype(cfg.param_dtype), axis_name,
                   plus_one=cfg.family != "gemma4", with_scale=with_scale, name=name, **bind)


def rope_tables(positions_BT, head_dim: int, base: float, scale_factor: float = 1.0,
                fraction: float = 1.0):
    """`(sin, cos)`, each `[B, T, 1, head_dim / 2]`: the rotary angles of every position,
    built once per forward pass and shared by the layers of one attention type.

    With `fraction < 1` (Gemma 4's "proportional" RoPE) only the first
    `int(fraction * head_dim // 2)` frequencies rotate, at the frequencies of the whole head;
    the others are 0, so those dimensions pass unrotated."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / (2 * half)))
    inv_freq = jnp.where(jnp.arange(half) < int(fraction * head_dim // 2), inv_freq, 0.0)
    angles = positions_BT.astype(jnp.float32)[..., None] * (inv_freq / scale_factor)[None, None]
    return jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]


def apply_rope(x_BTNH, sin_BT1h, cos_BT1h):
    """Rotary embedding on the two halves of each head (the Hugging Face layout)."""
    half = x_BTNH.shape[-1] // 2
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos_BT1h - x2 * sin_BT1h, x2 * cos_BT1h + x1 * sin_BT1h],
                          axis=-1)
    return out.astype(x_BTNH.dtype)


def _softcap(x, cap):
    return x if cap is None else jnp.tanh(x / cap) * cap


def _constrain(x, logical_axes):
    """`x` constrained to its logical axes where the caller set sharding rules for all of them
    (`warp_jax.sharding.activation_sharding`); unchanged otherwise (no rules, or rules of
    other names)."""
    return nn.with_logical_constraint(x, logical_axes,
                                      fallback=nn.spmd.RulesFallback.NO_CONSTRAINT)


def _kv(x_BTKH):
    return _constrain(x_BTKH, ("activation_batch", "activation_length", "activation_kv_heads",
                               None))


def _residual(x_BTD):
    return _constrain(x_BTD, ("activation_batch", "activation_length", "activation_embed"))
