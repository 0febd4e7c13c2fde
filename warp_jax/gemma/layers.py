"""The Gemma decoder's building blocks: params with logical axis names, Gemma's RMSNorm,
rotary embeddings, soft-capping, and the sharding the caller turns on
(`warp_jax.sharding.activation_sharding`): activation constraints and the mesh of the parts
that run in a `shard_map`; without it they do nothing."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from warp_jax.gemma.config import GemmaConfig

# The mesh and `(logical names, shape) -> PartitionSpec` on it; None: no sharding.
SpecFor = Callable[[Sequence[str | None], Sequence[int]], jax.sharding.PartitionSpec]
_MESH: contextvars.ContextVar[tuple[jax.sharding.Mesh, SpecFor] | None] = \
    contextvars.ContextVar("gemma_mesh", default=None)


@contextlib.contextmanager
def shard_map_mesh(mesh: jax.sharding.Mesh, spec_for: SpecFor):
    """Within it, the parts of the model that run in a `shard_map` (the experts) run on `mesh`,
    their arrays laid out by `spec_for`. Inside `jit` JAX's own context holds only the abstract
    mesh, which a `shard_map` over a mesh other than the jit's cannot place on devices."""
    token = _MESH.set((mesh, spec_for))
    try:
        yield
    finally:
        _MESH.reset(token)


def current_mesh() -> tuple[jax.sharding.Mesh, SpecFor] | None:
    """`shard_map_mesh`'s mesh and layout, or None outside it."""
    return _MESH.get()


def spec_axes(entry: str | Sequence[str] | None) -> tuple[str, ...]:
    """The mesh axes of one `PartitionSpec` entry."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


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
