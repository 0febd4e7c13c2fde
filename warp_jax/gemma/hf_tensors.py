"""The table of Hugging Face tensors: each name, its shape and where it goes in our params.

Tensor layouts (ours <- Hugging Face `nn.Linear` weights, which are `[out, in]`):
`attn.q` `[D, N, H]` <- `q_proj` `[N*H, D]`; `attn.k`/`attn.v` `[D, K, H]` <- `[K*H, D]`;
`attn.o` `[N, H, D]` <- `o_proj` `[D, N*H]`; `mlp.gate`/`mlp.up` `[D, F]` <- `[F, D]`;
`mlp.down` `[F, D]` <- `[D, F]`. Norm scales and the embedding are stored as they are.
Gemma 4 adds: `experts.gate_up` `[E, D, 2, I]` <- `gate_up_proj` `[E, 2I, D]`, `experts.down`
`[E, I, D]` <- `down_proj` `[E, D, I]`, `router.proj` `[D, E]` <- `[E, D]`, the per-layer
gate `[D, P]` and projection `[P, D]` transposed, and the packed per-layer tables
`per_layer_embedding` `[V, L, P]` <- `embed_tokens_per_layer` `[V, L*P]` and
`per_layer_projection` `[D, L, P]` <- `per_layer_model_projection` `[L*P, D]`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from warp_jax.gemma.config import GemmaConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def _unused_shared_kv(short: str, cfg: GemmaConfig) -> bool:
    """Whether `short` is a key/value tensor of a KV-shared layer, which some Gemma 4
    checkpoints carry and transformers ignores (as this model does)."""
    layer, rest = _LAYER.match(short).groups()
    return (cfg.kv_sources[int(layer)] is not None and rest in (
        "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight",
        "self_attn.v_norm.weight"))


class _Tensor(NamedTuple):
    path: tuple[str, ...]  # ours, in the unscanned layout
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]  # ours
    layout: str | None  # how the two differ: a key of _TO_OURS / _TO_HF, or None (as is)


def _tensors(cfg: GemmaConfig) -> dict[str, _Tensor]:
    """Every tensor of `cfg`'s decoder: Hugging Face name (without `model.`) -> `_Tensor`."""
    d, n = cfg.embed_dim, cfg.num_heads
    gemma4 = cfg.family == "gemma4"
    out = {"embed_tokens.weight": _Tensor(("input_embedding",), (cfg.vocab_size, d),
                                          (cfg.vocab_size, d), None)}
    if cfg.per_layer_input_dim:
        num, p = cfg.num_layers, cfg.per_layer_input_dim
        rows = cfg.per_layer_vocab_size or cfg.vocab_size
        out |= {
            "embed_tokens_per_layer.weight": _Tensor(("per_layer_embedding",), (rows, num * p),
                                                     (rows, num, p), "packed"),
            "per_layer_model_projection.weight": _Tensor(
                ("per_layer_projection",), (num * p, d), (d, num, p), "packed_T"),
            "per_layer_projection_norm.weight": _Tensor(
                ("per_layer_projection_norm", "scale"), (p,), (p,), None)}
    norms = {"input_layernorm": "pre_attention_norm"}
    if cfg.family == "gemma":
        norms["post_attention_layernorm"] = "pre_ffw_norm"
    else:
        norms |= {"post_attention_layernorm": "post_attention_norm",
                  "pre_feedforward_layernorm": "pre_ffw_norm",
                  "post_feedforward_layernorm": "post_ffw_norm"}
    if cfg.num_experts:
        norms |= {"pre_feedforward_layernorm_2": "pre_ffw_norm_2",
                  "post_feedforward_layernorm_1": "post_ffw_norm_1",
                  "post_feedforward_layernorm_2": "post_ffw_norm_2"}
    if cfg.per_layer_input_dim:
        norms["post_per_layer_input_norm"] = "post_per_layer_norm"
    for i, (kind, source) in enumerate(zip(cfg.attention_types, cfg.kv_sources, strict=True)):
        k, h, f = cfg.kv_heads_of(kind), cfg.head_dim_of(kind), cfg.mlp_dim_of(i)
        layer = {f"{hf}.weight": ((ours, "scale"), (d,), (d,), None)
                 for hf, ours in norms.items()}
        layer |= {
            "self_attn.q_proj.weight": (("attn", "q"), (n * h, d), (d, n, h), "heads"),
            "self_attn.o_proj.weight": (("attn", "o"), (d, n * h), (n, h, d), "out"),
            "mlp.gate_proj.weight": (("mlp", "gate"), (f, d), (d, f), "T"),
            "mlp.up_proj.weight": (("mlp", "up"), (f, d), (d, f), "T"),
            "mlp.down_proj.weight": (("mlp", "down"), (d, f), (f, d), "T"),
        }
        if source is None:
            layer["self_attn.k_proj.weight"] = (("attn", "k"), (k * h, d), (d, k, h), "heads")
            if not cfg.values_are_keys(kind):
                layer["self_attn.v_proj.weight"] = (("attn", "v"), (k * h, d), (d, k, h),
                                                    "heads")
        if cfg.use_qk_norm:
            layer["self_attn.q_norm.weight"] = (("attn", "query_norm", "scale"), (h,), (h,),
                                                None)
            if source is None:
                layer["self_attn.k_norm.weight"] = (("attn", "key_norm", "scale"), (h,), (h,),
                                                    None)
        if gemma4:
            layer["layer_scalar"] = (("layer_scalar",), (1,), (1,), None)
        if cfg.per_layer_input_dim:
            p = cfg.per_layer_input_dim
            layer |= {"per_layer_input_gate.weight": (("per_layer_gate",), (p, d), (d, p), "T"),
                      "per_layer_projection.weight": (("per_layer_proj",), (d, p), (p, d), "T")}
        if cfg.num_experts:
            e, x = cfg.num_experts, cfg.expert_mlp_dim
            layer |= {
                "router.proj.weight": (("router", "proj"), (e, d), (d, e), "T"),
                "router.scale": (("router", "scale"), (d,), (d,), None),
                "router.per_expert_scale": (("router", "per_expert_scale"), (e,), (e,), None),
                "experts.gate_up_proj": (("experts", "gate_up"), (e, 2 * x, d), (e, d, 2, x),
                                         "experts_paired"),
                "experts.down_proj": (("experts", "down"), (e, d, x), (e, x, d), "experts"),
            }
        for name, (path, hf_shape, shape, layout) in layer.items():
            out[f"layers.{i}.{name}"] = _Tensor((f"layer_{i}", *path), hf_shape, shape, layout)
    out["norm.weight"] = _Tensor(("final_norm", "scale"), (d,), (d,), None)
    return out


# Hugging Face -> ours, and back, for each layout of `_Tensor`.
_TO_OURS = {
    "heads": lambda v, shape: v.reshape(shape[1], shape[2], shape[0]).transpose(2, 0, 1),
    "out": lambda v, shape: v.reshape(shape[2], shape[0], shape[1]).transpose(1, 2, 0),
    "T": lambda v, shape: v.T,
    "experts": lambda v, shape: v.transpose(0, 2, 1),
    "experts_paired": lambda v, shape: v.transpose(0, 2, 1).reshape(shape),
    "packed": lambda v, shape: v.reshape(shape),
    "packed_T": lambda v, shape: v.T.reshape(shape),
}
_TO_HF = {
    "heads": lambda v, shape: v.transpose(1, 2, 0).reshape(shape),
    "out": lambda v, shape: v.transpose(2, 0, 1).reshape(shape),
    "T": lambda v, shape: v.T,
    "experts": lambda v, shape: v.transpose(0, 2, 1),
    "experts_paired": lambda v, shape: v.reshape(shape[0], shape[2], shape[1]).transpose(0, 2, 1),
    "packed": lambda v, shape: v.reshape(shape),
    "packed_T": lambda v, shape: v.reshape(shape[1], shape[0]).T,
}


def _to_ours(tensor: _Tensor, value: np.ndarray) -> np.ndarray:
    return value if tensor.layout is None else _TO_OURS[tensor.layout](value, tensor.shape)


def _from_ours(short: str, tensor: _Tensor, params: Mapping[str, Any],
               cfg: GemmaConfig) -> np.ndarray:
    path, layer = _stacked(tensor.path, cfg)
    node = params
    for key in path:
        if key not in node:
            raise ValueError(f"params has no {'/'.join(path)} (needed for {short!r})")
        node = node[key]
    value = np.asarray(node if layer is None else node[layer])
    if tensor.layout is not None:
        value = _TO_HF[tensor.layout](value, tensor.hf_shape)
    return np.ascontiguousarray(value)


def _stacked(path: tuple[str, ...], cfg: GemmaConfig) -> tuple[tuple[str, ...], int | None]:
    """Our path of a tensor in `cfg`'s layout, and its layer's index along the stacked axis
    (None unless `cfg.scan_layers` and the tensor belongs to a scanned block)."""
    if cfg.scan_layers and path[0].startswith("layer_"):
        i = int(path[0].removeprefix("layer_"))
        period = cfg.scan_period
        if period is None:
            return ("layers", *path[1:]), i
        if i < cfg.scan_depth:
            return ("layers", f"layer_{i % period}", *path[1:]), i // period
    return path, None


def stacked_length(cfg: GemmaConfig) -> int:
    """The length of the stacked axis of a scanned model's blocks."""
    return cfg.scan_depth // (cfg.scan_period or 1)


def _set(tree: dict, path: tuple[str, ...], value, layer: int | None, length: int) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    if layer is None:
        tree[path[-1]] = value
        return
    if path[-1] not in tree:  # the stacked array, filled one layer at a time
        tree[path[-1]] = np.empty((length, *value.shape), value.dtype)
    tree[path[-1]][layer] = value


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
