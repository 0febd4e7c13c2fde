"""Flax Gemma decoder (Gemma 1, 2, 3 and 4 text) with a KV cache and logical axis names.

Einsum letters: B batch, T query time, S key time (cache slots), D model width, V vocabulary,
N query heads, K key/value heads, G query heads per K (N = K * G), H head width, F MLP width,
L layers, P per-layer input width, E experts, I expert width.

Attention works in cache *slots*: without a cache the slots of a sequence are 0..T-1; with
one, the T new tokens fill slots `index .. index+T-1`. A query attends to earlier valid slots
(and, in local layers, to the last `sliding_window` slots, itself included). Positions (RoPE)
are separate, so left-padded rows use positions counted from their first real token.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from warp_jax.gemma.config import GemmaConfig
from warp_jax.gemma.layers import (
    _constrain,
    _kv,
    _norm,
    _param,
    _residual,
    _softcap,
    apply_rope,
    rope_tables,
)
from warp_jax.gemma.moe import Experts, Router

Cache = dict[str, Any]
_MASKED = -2.3819763e38  # finite: rows with no valid key give a uniform softmax, not NaN


def init_cache(cfg: GemmaConfig, batch_size: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty KV cache of `max_len` slots: `{"index", "mask", "layer_i": {"k", "v"}}`
    (with `cfg.scan_layers`, the scanned layers' caches stacked as the params are:
    `"layers": {"k", "v"}`, or for Gemma 4 `"layers": {"layer_j": {"k", "v"}}` per layer of
    the period, and the layers after the last whole period as `"layer_i"`).

    Keys and values are `[B, S, K, H]`, the layout of the projections that write them (one
    slot is one contiguous `[K, H]` row), as in MaxText and the `gemma` package. Gemma 4's
    global layers have their own K and H; its KV-shared layers have no cache (they read the
    cache of the layer they share).
    """
    dtype = jnp.dtype(dtype or cfg.dtype)
    cache: Cache = {
        "index": jnp.zeros((), jnp.int32),  # the next slot to write
        "mask": jnp.zeros((batch_size, max_len), bool),  # [B, S]: slot holds a real token
    }

    def empty(kind, *lead):
        shape = (*lead, batch_size, max_len, cfg.kv_heads_of(kind), cfg.head_dim_of(kind))
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    first = 0
    if cfg.scan_layers and cfg.scan_period is None:
        cache["layers"] = empty("global", cfg.num_layers)
        return cache
    if cfg.scan_layers:
        period, first = cfg.scan_period, cfg.scan_depth
        cache["layers"] = {f"layer_{j}": empty(cfg.attention_types[j], first // period)
                           for j in range(period)}
    for i in range(first, cfg.num_layers):
        if cfg.kv_sources[i] is None:
            cache[f"layer_{i}"] = empty(cfg.attention_types[i])
    return cache


def abstract_params(cfg: GemmaConfig) -> Any:
    """The params of `Gemma(cfg)` as `jax.ShapeDtypeStruct`s in their `nn.Partitioned` boxes
    (logical axis names), without allocating them: what shardings and shape checks read."""
    return jax.eval_shape(Gemma(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))[
        "params"]


def left_padded_positions(mask_BT):
    """RoPE positions `[B, T]` of left-padded rows, counted from each row's first real token
    (0 on the padding)."""
    return jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0).astype(jnp.int32)


class Attention(nn.Module):
    """Self-attention of one layer.

    `attention_type` ("global"/"local") fixes the layer's shapes (Gemma 4's global layers have
    their own K and H); None under a scan over layers, whose layers share one shape and take
    their type from the traced `local` flag. A `reuses_kv` layer (Gemma 4's KV sharing) has
    no key or value projection: it attends to the `shared_kv` of an earlier layer."""

    cfg: GemmaConfig
    attention_type: str | None = None
    reuses_kv: bool = False

    @nn.compact
    def __call__(self, x_BTD, rope, slots_T, key_mask_BS, cache, keep=None, local=False,
                 shared_kv=None):
        """Returns the output, the updated cache (None without one or when reusing keys and
        values) and the keys and values attended to (`[B, S, K, H]` each, cache included).

        With `keep`, only the last `keep` tokens query (all write K/V). `local` (a bool, or a
        traced bool under a scan over layers) limits each query to the last `sliding_window`
        slots."""
        cfg, pd = self.cfg, jnp.dtype(self.cfg.param_dtype)
        dt = jnp.dtype(cfg.dtype)
        kind = self.attention_type or "global"
        d, n = cfg.embed_dim, cfg.num_heads
        k, h = cfg.kv_heads_of(kind), cfg.head_dim_of(kind)
        init = nn.initializers.normal(d**-0.5)
        q_w = _param(self, "q", init, (d, n, h), ("embed", "heads", "head_dim"), pd)
        if not self.reuses_kv:
            k_w = _param(self, "k", init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
            if not cfg.values_are_keys(kind):
                v_w = _param(self, "v", init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        o_w = _param(self, "o", nn.initializers.normal((n * h) ** -0.5), (n, h, d),
                     ("heads", "head_dim", "embed"), pd)
        b, t = x_BTD.shape[:2]
        first = 0 if keep is None else t - keep  # the first query token
        q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD[:, first:], q_w.astype(dt))
        if cfg.use_qk_norm:
            q_BTNH = _norm(cfg, "query_norm", "head_dim")(q_BTNH)
        q_BTNH = apply_rope(q_BTNH, *(table[:, first:] for table in rope))

        new_cache = None
        if self.reuses_kv:
            k_BTKH, v_BTKH = shared_kv
        else:
            # Keys and values as the caller's rules split them (`activation_kv_heads`).
            k_BTKH = _kv(jnp.einsum("BTD,DKH->BTKH", x_BTD, k_w.astype(dt)))
            v_BTKH = (k_BTKH if cfg.values_are_keys(kind)
                      else _kv(jnp.einsum("BTD,DKH->BTKH", x_BTD, v_w.astype(dt))))
            if cfg.use_qk_norm:
                k_BTKH = _norm(cfg, "key_norm", "head_dim")(k_BTKH)
            if cfg.family == "gemma4":
                v_BTKH = _norm(cfg, "value_norm", "head_dim", with_scale=False)(v_BTKH)
            k_BTKH = apply_rope(k_BTKH, *rope)
            if cache is not None:  # the T new tokens go to slots `slots_T`, then all S are read
                start = (0, slots_T[0], 0, 0)
                k_BTKH = jax.lax.dynamic_update_slice(
                    cache["k"], k_BTKH.astype(cache["k"].dtype), start)
                v_BTKH = jax.lax.dynamic_update_slice(
                    cache["v"], v_BTKH.astype(cache["v"].dtype), start)
                new_cache = {"k": k_BTKH, "v": v_BTKH}
        slots_S, query_slots = jnp.arange(key_mask_BS.shape[1]), slots_T[first:]
        allowed_TS = slots_S[None, :] <= query_slots[:, None]
        if cfg.sliding_window is not None and local is not False:
            allowed_TS &= jnp.logical_not(local) | (
                query_slots[:, None] - slots_S[None, :] < cfg.sliding_window)
        mask_BTS = allowed_TS[None] & key_mask_BS[:, None, :]

        # The G = N / K query heads that share a KV head attend together.
        tq = t - first
        q_BTKGH = (q_BTNH * cfg.query_scale).reshape(b, tq, k, n // k, h)
        logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BTKH.astype(dt))
        logits_BKGTS = _softcap(logits_BKGTS.astype(jnp.float32), cfg.attn_logit_softcap)
        logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASKED)
        probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(dt)
        out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BTKH.astype(dt))
        out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTKGH.reshape(b, tq, n, h), o_w.astype(dt))
        return out_BTD, new_cache, (k_BTKH, v_BTKH)


class MLP(nn.Module):
    cfg: GemmaConfig
    width: int | None = None  # F; None: cfg.mlp_dim

    @nn.compact
    def __call__(self, x_BTD):
        """Gemma's GeGLU: `(gelu_tanh(x @ gate) * (x @ up)) @ down`."""
        cfg, pd, dt = self.cfg, jnp.dtype(self.cfg.param_dtype), jnp.dtype(self.cfg.dtype)
        d, f = cfg.embed_dim, self.width or cfg.mlp_dim
        gate = _param(self, "gate", nn.initializers.normal(d**-0.5), (d, f), ("embed", "mlp"), pd)
        up = _param(self, "up", nn.initializers.normal(d**-0.5), (d, f), ("embed", "mlp"), pd)
        down = _param(self, "down", nn.initializers.normal(f**-0.5), (f, d), ("mlp", "embed"), pd)
        gated = jnp.einsum("BTD,DF->BTF", x_BTD, gate.astype(dt))
        linear = jnp.einsum("BTD,DF->BTF", x_BTD, up.astype(dt))
        hidden = jax.nn.gelu(gated, approximate=True) * linear
        return jnp.einsum("BTF,FD->BTD", hidden, down.astype(dt))


class Block(nn.Module):
    """One transformer block of a fixed `attention_type`, or with None (a scan over layers)
    of the type its `local` argument gives.

    Gemma 4 adds: `layer`, its index, from which `cfg` gives its MLP width and KV sharing
    (`cfg.kv_sources`), a mixture-of-experts branch beside the MLP, a gated per-layer input
    and a learned scalar on the output. A layer whose keys and values later layers share
    returns them too (its third output)."""

    cfg: GemmaConfig
    attention_type: str | None = None
    layer: int = 0

    @nn.compact
    def __call__(self, x, ropes, slots, key_mask, cache, keep=None, local=None,
                 per_layer_input=None, shared_kv=None):
        """One block; with `keep`, its output is that of the last `keep` tokens only.

        `ropes` maps each attention type to its `rope_tables`."""
        cfg, pd, dt = self.cfg, jnp.dtype(self.cfg.param_dtype), jnp.dtype(self.cfg.dtype)
        if self.attention_type is not None:
            local = self.attention_type == "local"
            rope = ropes[self.attention_type]
        elif len(ropes) == 1:
            (rope,) = ropes.values()
        else:
            rope = tuple(jnp.where(local, a, b)
                         for a, b in zip(ropes["local"], ropes["global"], strict=True))
        h = _norm(cfg, "pre_attention_norm")(x)
        reuses_kv = cfg.kv_sources[self.layer] is not None
        h, cache, kv = Attention(cfg, self.attention_type, reuses_kv, name="attn")(
            h, rope, slots, key_mask, cache, keep, local, shared_kv)
        if cfg.use_post_attn_norm:
            h = _norm(cfg, "post_attention_norm")(h)
        x = x[:, x.shape[1] - h.shape[1]:] + h
        h = MLP(cfg, cfg.mlp_dim_of(self.layer), name="mlp")(_norm(cfg, "pre_ffw_norm")(x))
        if cfg.num_experts:
            routed = Experts(cfg, name="experts")(_norm(cfg, "pre_ffw_norm_2")(x),
                                                  *Router(cfg, name="router")(x))
            h = _norm(cfg, "post_ffw_norm_1")(h) + _norm(cfg, "post_ffw_norm_2")(routed)
        if cfg.use_post_ffw_norm:
            h = _norm(cfg, "post_ffw_norm")(h)
        x = x + h
        if cfg.per_layer_input_dim:
            d, p = cfg.embed_dim, cfg.per_layer_input_dim
            gate = _param(self, "per_layer_gate", nn.initializers.normal(d**-0.5), (d, p),
                          ("embed", "per_layer_embed"), pd)
            proj = _param(self, "per_layer_proj", nn.initializers.normal(p**-0.5), (p, d),
                          ("per_layer_embed", "embed"), pd)
            g = jax.nn.gelu(jnp.einsum("BTD,DP->BTP", x, gate.astype(dt)), approximate=True)
            g = g * per_layer_input[:, per_layer_input.shape[1] - x.shape[1]:]
            g = jnp.einsum("BTP,PD->BTD", g, proj.astype(dt))
            x = x + _norm(cfg, "post_per_layer_norm")(g)
        if cfg.family == "gemma4":
            x = x * _param(self, "layer_scalar", nn.initializers.ones_init(), (1,), (None,),
                           pd).astype(dt)[0]
        if self.layer in cfg.kv_sources:
            return _residual(x), cache, kv
        return _residual(x), cache


class Gemma(nn.Module):
    """The Gemma decoder: `apply(tokens, positions, attention_mask, cache) -> (logits, cache)`.

    Args (of `__call__`):
      tokens: int `[B, T]`.
      positions: int `[B, T]` RoPE positions; None: `0..T-1` after the cache's filled slots.
      attention_mask: bool `[B, T]`, False for padding tokens (which no query attends to);
        None: every token is real.
      cache: None, or a dict from `init_cache` (returned updated, the tokens written at
        slots `index..index+T-1`).
      logits_to_keep: None for the logits of every position; n for those of the last n
        only (as in transformers: the vocabulary projection is the costliest matmul).

    Returns:
      float32 logits `[B, T, V]` (`[B, n, V]`) and the updated cache (None without one).

    `Gemma(cfg, remat=True)` rematerialises each block in the backward pass: a gradient keeps
    only the blocks' inputs, not their activations, for one more forward pass of compute.
    Same params, same outputs. With `cfg.scan_layers` the blocks run under one `lax.scan`
    over their stacked params (`params["layers"]`, leading axis L): the compiled program holds
    one block, not L, whatever the depth.
    """

    cfg: GemmaConfig
    remat: bool = False

    @nn.compact
    def __call__(self, tokens, positions=None, attention_mask=None, cache=None,
                 logits_to_keep: int | None = None):
        if logits_to_keep is not None and not 1 <= logits_to_keep <= tokens.shape[1]:
            raise ValueError(f"logits_to_keep must be in [1, {tokens.shape[1]}] (the number of "
                             f"tokens) or None, got {logits_to_keep!r}")
        x_BTD, embedding_VD, cache = decode(self, tokens, positions, attention_mask, cache,
                                            keep=logits_to_keep)
        logits = jnp.einsum("BTD,VD->BTV", x_BTD, embedding_VD).astype(jnp.float32)
        return _softcap(logits, self.cfg.final_logit_softcap), cache


def decode(module: nn.Module, tokens, positions, attention_mask, cache, keep=None):
    """The decoder body, declaring Gemma's params on `module` (shared with the reward model);
    `module.remat` rematerialises each block in the backward pass.

    With `keep`, only the last `keep` tokens' hidden states are returned, and the last block
    runs its queries, MLP and residual stream on those tokens alone (its keys and values, like
    every earlier block, on all of them): the other outputs of the last block are unused.

    Returns the final-normed hidden states `[B, T, D]` (`[B, keep, D]`), the embedding in the
    compute dtype and the updated cache.
    """
    cfg = module.cfg
    pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    b, t = tokens.shape
    start = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
    slots = start + jnp.arange(t, dtype=jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(slots, (b, t))
    token_mask = (jnp.ones((b, t), bool) if attention_mask is None
                  else attention_mask.astype(bool))
    if cache is None:
        key_mask = token_mask
    else:
        key_mask = jax.lax.dynamic_update_slice(cache["mask"], token_mask, (0, start))

    embedding = _param(module, "input_embedding", nn.initializers.normal(cfg.embed_dim**-0.5),
                       (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), pd).astype(dt)
    table = _constrain(embedding, ("activation_vocab", "activation_embed"))
    x = _residual(table[tokens] * jnp.asarray(math.sqrt(cfg.embed_dim), dt))
    new_cache = None if cache is None else {"index": start + t, "mask": key_mask}
    rope_settings = {"global": (cfg.rope_base, cfg.rope_scale_factor, cfg.rope_global_fraction),
                     "local": (cfg.rope_local_base or cfg.rope_base, 1.0, 1.0)}
    ropes = {kind: rope_tables(positions, cfg.head_dim_of(kind), *rope_settings[kind])
             for kind in dict.fromkeys(cfg.attention_types)}
    if cfg.scan_layers and cfg.scan_period is None:
        x, layers_cache = _scanned_blocks(module)(
            x, ropes, slots, key_mask, None if cache is None else cache["layers"], None,
            jnp.array([kind == "local" for kind in cfg.attention_types]))
        if cache is not None:
            new_cache["layers"] = layers_cache
        if keep is not None:
            x = x[:, t - keep:]
    else:
        num = len(cfg.attention_types)
        per_layer = _per_layer_inputs(module, tokens, x) if cfg.per_layer_input_dim else None
        first = cfg.scan_depth if cfg.scan_layers else 0
        if first:  # Gemma 4's whole periods under the scan, one period a step
            period = cfg.scan_period
            per_period = None if per_layer is None else jnp.moveaxis(
                per_layer[:, :, :first].reshape(b, t, first // period, period, -1), 2, 0)
            x, layers_cache = _scanned_periods(module, first // period)(
                x, ropes, slots, key_mask, None if cache is None else cache["layers"],
                per_period)
            if cache is not None:
                new_cache["layers"] = layers_cache
            if keep is not None and first == num:
                x = x[:, t - keep:]
        block = nn.remat(Block, static_argnums=_KEEP) if module.remat else Block
        sources = cfg.kv_sources
        shared = {}  # the keys and values of each layer that later layers reuse
        for i in range(first, num):
            layer_cache = None if cache is None or sources[i] is not None else cache[f"layer_{i}"]
            x, layer_cache, *kv = block(cfg, cfg.attention_types[i], i, name=f"layer_{i}",
                                        parent=module)(
                x, ropes, slots, key_mask, layer_cache, keep if i == num - 1 else None, None,
                None if per_layer is None else per_layer[:, :, i], shared.get(sources[i]))
            if kv:
                shared[i] = kv[0]
            if cache is not None and sources[i] is None:
                new_cache[f"layer_{i}"] = layer_cache
    x = _norm(cfg, "final_norm", parent=module)(x)
    return x, embedding, new_cache


# `keep` (argument 6 of `Block.__call__`, counting the module) sizes arrays, so it stays static.
_KEEP = (6,)


def _per_layer_inputs(module: nn.Module, tokens, x_BTD):
    """Gemma 4's per-layer inputs `[B, T, L, P]`: each token's rows of a `[V, L, P]` embedding
    (times sqrt(P)) plus an RMS-normed projection of its embedded input (times D^-1/2), their
    sum over sqrt(2). Declares those params on `module`."""
    cfg = module.cfg
    pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    d, num, p = cfg.embed_dim, cfg.num_layers, cfg.per_layer_input_dim
    table = _param(module, "per_layer_embedding", nn.initializers.normal(1.0),
                   (cfg.per_layer_vocab_size or cfg.vocab_size, num, p),
                   ("vocab", "layers", "per_layer_embed"), pd).astype(dt)
    proj = _param(module, "per_layer_projection", nn.initializers.normal(d**-0.5), (d, num, p),
                  ("embed", "layers", "per_layer_embed"), pd)
    # Whole rows at the lookup, as for the input embedding.
    table = _constrain(table, ("activation_vocab", None, "activation_embed"))
    by_token = _constrain(table[tokens] * jnp.asarray(math.sqrt(p), dt),
                          ("activation_batch", "activation_length", None, None))
    by_context = jnp.einsum("BTD,DLP->BTLP", x_BTD, proj.astype(dt)) * jnp.asarray(d**-0.5, dt)
    by_context = _norm(cfg, "per_layer_projection_norm", "per_layer_embed", parent=module)(
        by_context)
    return (by_context + by_token) * jnp.asarray(2**-0.5, dt)


def _scanned_blocks(module: nn.Module) -> nn.Module:
    """The L blocks as one `nn.scan` named "layers" on `module`: the residual stream is the
    carry, each layer's params, cache and `local` flag are scanned along their leading axis
    (logical name "layers", never sharded), the rest is broadcast. Every layer runs on all
    tokens; `decode` keeps the last `keep` afterwards."""
    cfg = module.cfg
    block = (nn.remat(Block, static_argnums=_KEEP, prevent_cse=False) if module.remat
             else Block)
    scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
                      length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, name="layers", parent=module)


class Period(nn.Module):
    """One period of Gemma 4's attention pattern (`cfg.scan_period` blocks, each of its own
    type and shapes, in order): the step of the scan over a Gemma 4's layers. `remat`
    rematerialises each block in the backward pass."""

    cfg: GemmaConfig
    remat: bool = False

    @nn.compact
    def __call__(self, x, ropes, slots, key_mask, cache, per_layer):
        cfg = self.cfg
        block = (nn.remat(Block, static_argnums=_KEEP, prevent_cse=False) if self.remat
                 else Block)
        new_cache = None if cache is None else {}
        for j in range(cfg.scan_period):
            name = f"layer_{j}"
            x, layer_cache = block(cfg, cfg.attention_types[j], j, name=name)(
                x, ropes, slots, key_mask, None if cache is None else cache[name], None, None,
                None if per_layer is None else per_layer[:, :, j])
            if cache is not None:
                new_cache[name] = layer_cache
        return x, new_cache


def _scanned_periods(module: nn.Module, length: int) -> nn.Module:
    """`length` periods as one `nn.scan` named "layers" on `module`: the residual stream is
    the carry; each period's params, caches and per-layer inputs are scanned along their
    leading axis (logical name "layers", never sharded), the rest is broadcast."""
    scanned = nn.scan(Period, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0), length=length,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(module.cfg, module.remat, name="layers", parent=module)
