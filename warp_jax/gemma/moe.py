"""Gemma 4's mixture of experts: the router and the routed experts beside each block's MLP.

Each token goes through its top-k experts only: its k (token, expert) pairs are sorted by
expert and the experts' projections run as grouped matmuls over them (`grouped.py`), dropless
(no capacity, no token dropped), so the FLOPs grow with k, not with the number of experts.

Sharding. The sort is local: under a mesh the experts run in a `shard_map` over each
device's own rows (a sort across the batch's devices would be a cross-device shuffle). Each
expert's width (`mlp`) is split over `model`, as a dense MLP's is: the tokens are whole on
every `model` device in both the training and the decode layout, so each device runs every
routed pair through its slice of the width and one `psum` sums the slices; splitting the
experts themselves over `model` instead (expert parallelism) would leave each device either
the whole routed work or an all-to-all of the tokens. The expert axis is stored whole; the
`embed` axis is split over `fsdp` like every weight's, gathered inside the `shard_map` so that
its gradient is reduce-scattered back.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from warp_jax.gemma.config import GemmaConfig
from warp_jax.gemma.grouped import grouped_matmul
from warp_jax.gemma.layers import _norm, _param, current_mesh, spec_axes


class Router(nn.Module):
    """Gemma 4's router: each token's top-k experts `[B, T, k]` and their weights (float32,
    normalised over the k, times the expert's learned scale)."""

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
        return top_w * per_expert.astype(jnp.float32)[top_i], top_i


_GATE_UP, _DOWN = ("expert", "embed", None, "mlp"), ("expert", "mlp", "embed")


class Experts(nn.Module):
    """Gemma 4's experts: E GeGLUs, `gate_up [E, D, 2, I]` (gate, then up) and
    `down [E, I, D]`, applied to each token's routed experts and summed with the router's
    weights."""

    cfg: GemmaConfig

    @nn.compact
    def __call__(self, x_BTD, top_w_BTK, top_i_BTK):
        cfg, pd, dt = self.cfg, jnp.dtype(self.cfg.param_dtype), jnp.dtype(self.cfg.dtype)
        d, e, i = cfg.embed_dim, cfg.num_experts, cfg.expert_mlp_dim
        gate_up = _param(self, "gate_up", nn.initializers.normal(d**-0.5), (e, d, 2, i),
                         _GATE_UP, pd)
        down = _param(self, "down", nn.initializers.normal(i**-0.5), (e, i, d), _DOWN, pd)
        return _dispatch(x_BTD, top_w_BTK.astype(dt), top_i_BTK, gate_up.astype(dt),
                         down.astype(dt))


def _routed(x_ND, w_NK, i_NK, gate_up, down):
    """The experts on N tokens: each token's k pairs sorted by expert, both projections as
    grouped matmuls, the pairs unsorted and summed with their weights."""
    (n, d), (e, _, _, width), k = x_ND.shape, gate_up.shape, i_NK.shape[1]
    order = jnp.argsort(i_NK.reshape(-1), stable=True)
    sizes = jnp.bincount(i_NK.reshape(-1), length=e).astype(jnp.int32)
    h = grouped_matmul(x_ND[order // k], gate_up.reshape(e, d, 2 * width), sizes)
    gated, linear = jnp.split(h, 2, axis=-1)
    pairs = grouped_matmul(jax.nn.gelu(gated, approximate=True) * linear, down, sizes)
    pairs = pairs * w_NK.reshape(-1)[order][:, None]
    return pairs[jnp.argsort(order)].reshape(n, k, d).sum(axis=1)


def _dispatch(x_BTD, w_BTK, i_BTK, gate_up, down):
    """`_routed` on each device's rows (a `shard_map` under the caller's mesh), its experts'
    width split over `model` where it divides, their outputs summed over it. The weights enter
    as they are stored and their `embed` axis is gathered inside, so that the gradient leaves
    reduce-scattered over those devices, as every FSDP weight's does, and not all-reduced whole
    (which moved each layer's whole expert gradient to every chip, once per micro-batch)."""
    d, k = x_BTD.shape[-1], i_BTK.shape[-1]

    def local(x, w, i, gate_up, down, gathered=((), ()), model=None):
        gate_up, down = (jax.lax.all_gather(a, axes, axis=dim, tiled=True) if axes else a
                         for a, axes, dim in zip((gate_up, down), gathered, (1, 2),
                                                 strict=True))
        y = _routed(x.reshape(-1, d), w.reshape(-1, k), i.reshape(-1, k), gate_up, down)
        y = y.reshape(x.shape)
        return jax.lax.psum(y, model) if model else y

    placed = current_mesh()
    if placed is None:
        return local(x_BTD, w_BTK, i_BTK, gate_up, down)
    mesh, spec_for = placed
    rows = spec_for(("batch", None, None), x_BTD.shape)
    weights = [spec_for(names, a.shape) for names, a in ((_GATE_UP, gate_up), (_DOWN, down))]
    gathered = tuple(spec_axes(spec[dim]) for spec, dim in zip(weights, (1, 2), strict=True))
    model = weights[0][-1]  # the experts' width: "model" where it divides, else None
    # check_vma off: the TPU branch's Pallas kernel states no per-axis variance of its output.
    return jax.shard_map(
        lambda *a: local(*a, gathered=gathered, model=model), mesh=mesh, check_vma=False,
        in_specs=(rows, rows, rows, *weights), out_specs=rows)(x_BTD, w_BTK, i_BTK, gate_up,
                                                               down)

