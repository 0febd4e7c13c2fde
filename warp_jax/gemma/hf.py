"""Hugging Face import and export: configs, state dicts and safetensors directories.

Tensor layouts (ours <- Hugging Face `nn.Linear` weights, which are `[out, in]`):
`attn.q` `[D, N, H]` <- `q_proj` `[N*H, D]`; `attn.k`/`attn.v` `[D, K, H]` <- `[K*H, D]`;
`attn.o` `[N, H, D]` <- `o_proj` `[D, N*H]`; `mlp.gate`/`mlp.up` `[D, F]` <- `[F, D]`;
`mlp.down` `[F, D]` <- `[D, F]`. Norm scales and the embedding are stored as they are.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from warp_jax.gemma import shards
from warp_jax.gemma.config import GemmaConfig

_PREFIX = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?")
_HF_ARCH = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
            "gemma3": "Gemma3ForCausalLM"}
_HF_REWARD_ARCH = {"gemma": "GemmaForSequenceClassification",
                   "gemma2": "Gemma2ForSequenceClassification",
                   "gemma3": "Gemma3TextForSequenceClassification"}


def read_config(directory: str | os.PathLike) -> GemmaConfig:
    """The `GemmaConfig` of a Hugging Face checkpoint directory, from its config.json; a
    missing or malformed file is a `ValueError` naming it."""
    path = pathlib.Path(directory) / "config.json"
    try:
        hf_config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (expected a Hugging Face checkpoint "
                         "directory)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(hf_config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config_from_hf(hf_config)


def config_from_hf(hf_config: Any, **overrides: Any) -> GemmaConfig:
    """A `GemmaConfig` from a transformers Gemma/Gemma2/Gemma3(Text) config (or its dict)."""
    if isinstance(hf_config, Mapping):
        import transformers

        hf_config = transformers.AutoConfig.for_model(**hf_config)
    if getattr(hf_config, "model_type", None) == "gemma3" and hasattr(hf_config, "text_config"):
        _reject_unsupported(hf_config)  # the multimodal config holds tie_word_embeddings
        hf_config = hf_config.text_config
    model_type = getattr(hf_config, "model_type", None)
    family = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}.get(model_type)
    if family is None:
        raise ValueError(
            f"unknown architecture: model_type {model_type!r}; supported: gemma, gemma2, "
            "gemma3_text (and gemma3's text model)"
        )
    c = hf_config
    _reject_unsupported(c)
    activation = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
    # transformers reads Gemma 1's legacy "gelu" as the tanh approximation; Gemma 2 and 3 run
    # "gelu" as the exact erf GELU, which this model does not implement.
    tanh_names = ("gelu_pytorch_tanh", "gelu") if family == "gemma" else ("gelu_pytorch_tanh",)
    if activation not in tanh_names:
        raise ValueError(f"unsupported hidden activation {activation!r} for {model_type}: this "
                         f"Gemma uses GeGLU with the tanh GELU ({' or '.join(tanh_names)})")
    fields: dict[str, Any] = dict(
        vocab_size=c.vocab_size, embed_dim=c.hidden_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim, mlp_dim=c.intermediate_size, family=family,
        norm_eps=c.rms_norm_eps, pad_id=_first(c.pad_token_id, 0),
        eos_id=_first(c.eos_token_id, 1), bos_id=_first(c.bos_token_id, 2),
    )
    rope = getattr(c, "rope_parameters", None) or {}
    if family != "gemma3" and rope.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported RoPE type {rope['rope_type']!r} for {model_type}: "
                         "only Gemma 3's global layers use (linear) scaling")
    if family == "gemma":
        fields["rope_base"] = _rope_theta(rope, c, "rope_parameters")
    else:
        fields.update(
            attention_pattern=tuple("local" if t == "sliding_attention" else "global"
                                    for t in c.layer_types),
            sliding_window=c.sliding_window, query_pre_attn_scalar=c.query_pre_attn_scalar,
            attn_logit_softcap=c.attn_logit_softcapping,
            final_logit_softcap=c.final_logit_softcapping,
            use_post_attn_norm=True, use_post_ffw_norm=True,
        )
        if "local" not in fields["attention_pattern"]:
            fields["sliding_window"] = None
        if family == "gemma2":
            fields["rope_base"] = _rope_theta(rope, c, "rope_parameters")
        else:
            full, sliding = rope.get("full_attention", {}), rope.get("sliding_attention", {})
            if float(sliding.get("factor", 1.0)) != 1.0:
                raise ValueError(f"unsupported RoPE scaling factor {sliding['factor']} in "
                                 "rope_parameters['sliding_attention']: Gemma 3 scales only "
                                 "its global layers")
            fields.update(use_qk_norm=True,
                          rope_base=_rope_theta(full, c, "rope_parameters['full_attention']"),
                          rope_local_base=_rope_theta(
                              sliding, c, "rope_parameters['sliding_attention']"),
                          rope_scale_factor=float(full.get("factor", 1.0)))
    return GemmaConfig(**{**fields, **overrides})


# transformers fields whose non-default values this model does not implement: accepting them
# would silently give other logits than transformers'.
_UNSUPPORTED = {
    "attention_bias": (False, "its attention projections have no biases"),
    "tie_word_embeddings": (True, "its output projection is the input embedding"),
    "use_bidirectional_attention": (False, "it is a causal decoder"),
}


def _reject_unsupported(hf_config: Any) -> None:
    for name, (default, why) in _UNSUPPORTED.items():
        value = getattr(hf_config, name, None)
        if value is not None and bool(value) != default:
            raise ValueError(f"unsupported {name}={value!r} in the {hf_config.model_type} "
                             f"config: this Gemma supports only {name}={default} ({why})")


def config_to_hf(cfg: GemmaConfig) -> Any:
    """The transformers config of `cfg` (GemmaConfig, Gemma2Config or Gemma3TextConfig)."""
    import transformers

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, intermediate_size=cfg.mlp_dim, rms_norm_eps=cfg.norm_eps,
        pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id, bos_token_id=cfg.bos_id,
        tie_word_embeddings=True, architectures=[_HF_ARCH[cfg.family]],
        dtype=str(np.dtype(cfg.param_dtype)) if cfg.param_dtype != "bfloat16" else "bfloat16",
    )
    if cfg.family == "gemma":
        if cfg.use_post_attn_norm or cfg.use_qk_norm or "local" in cfg.attention_types:
            raise ValueError("a config with Gemma 2/3 features cannot be exported as family "
                             "'gemma'; set family='gemma2' or 'gemma3'")
        return transformers.GemmaConfig(
            **common, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base})
    layer_types = ["sliding_attention" if t == "local" else "full_attention"
                   for t in cfg.attention_types]
    gemma23 = dict(layer_types=layer_types, sliding_window=cfg.sliding_window or 4096,
                   query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
                   attn_logit_softcapping=cfg.attn_logit_softcap,
                   final_logit_softcapping=cfg.final_logit_softcap)
    if cfg.family == "gemma2":
        return transformers.Gemma2Config(
            **common, **gemma23,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base})
    full = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scale_factor != 1.0:
        full = {"rope_type": "linear", "factor": cfg.rope_scale_factor,
                "rope_theta": cfg.rope_base}
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_base or cfg.rope_base}
    return transformers.Gemma3TextConfig(
        **common, **gemma23,
        rope_parameters={"full_attention": full, "sliding_attention": local})


def params_from_hf(state_dict_or_dir: Mapping[str, Any] | str | os.PathLike,
                   cfg: GemmaConfig) -> dict[str, Any]:
    """Our params (numpy, `cfg.param_dtype`) from a HF state dict or safetensors directory.

    A directory is read lazily, one tensor at a time, so host memory holds the output and one
    tensor. Accepts `*ForCausalLM`, Gemma 3's multimodal text model and
    `*ForSequenceClassification` checkpoints with `num_labels=1`, whose head becomes
    `params["score"]` `[D]` (the params of `rewards.RewardModel`).
    Raises `ValueError` naming the tensor for a missing tensor, a wrong shape or an
    `lm_head.weight` that is not the embedding (an untied head, which this Gemma lacks).
    """
    expected = _hf_shapes(cfg)
    dtype = np.dtype(cfg.param_dtype)
    params: dict[str, Any] = {}
    found: set[str] = set()
    lm_head = None
    for hf_name, load in shards.tensors(state_dict_or_dir):
        short = _PREFIX.sub("", hf_name)
        if short == "lm_head.weight":
            lm_head = load
            continue
        if hf_name == "score.weight":
            value = np.asarray(load())
            if value.shape != (1, cfg.embed_dim):
                raise ValueError(f"tensor 'score.weight' has shape {tuple(value.shape)}, expected "
                                 f"{(1, cfg.embed_dim)}: a reward model has num_labels=1")
            params["score"] = value[0].astype(dtype)
            continue
        if short not in expected:
            if short.startswith("layers.") and _LAYER.match(short):
                raise ValueError(f"unexpected tensor {hf_name!r} for a {cfg.family} config "
                                 f"with {cfg.num_layers} layers")
            continue
        value = np.asarray(load())
        if tuple(value.shape) != expected[short]:
            raise ValueError(f"tensor {hf_name!r} has shape {tuple(value.shape)}, expected "
                             f"{expected[short]} for this config")
        ours, array = _to_ours(short, value, cfg)
        path, layer = _stacked(ours, cfg)
        _set(params, path, array.astype(dtype), layer, cfg.num_layers)
        found.add(short)
    missing = sorted(set(expected) - found, key=_natural)
    if missing:
        raise ValueError(f"missing tensor(s) in the checkpoint: {['model.' + m for m in missing]}")
    if lm_head is not None and not np.array_equal(np.asarray(lm_head()).astype(dtype),
                                                  params["input_embedding"]):
        raise ValueError("tensor 'lm_head.weight' differs from 'model.embed_tokens.weight': "
                         "this Gemma ties its output projection to the input embedding, so an "
                         "untied checkpoint would give other logits")
    return params


def params_to_hf(params: Mapping[str, Any], cfg: GemmaConfig, *,
                 include_lm_head: bool = True) -> dict[str, np.ndarray]:
    """A state dict of numpy arrays (the inverse of `params_from_hf`).

    For a causal LM, `lm_head.weight` is the tied embedding, included as `model.state_dict()`
    has it; reward-model params (with `score`) give a `*ForSequenceClassification` dict.
    """
    out = {}
    for short in _hf_shapes(cfg):
        out["model." + short] = _from_ours(short, params, cfg)
    if "score" in params:
        out["score.weight"] = np.asarray(params["score"])[None]
    elif include_lm_head:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def save_hf(params: Mapping[str, Any], cfg: GemmaConfig, directory: str | os.PathLike) -> None:
    """Writes `config.json` and safetensors (sharded past 5 GiB) that transformers loads: a
    `*ForCausalLM`, or for reward-model params (with `score`) a `*ForSequenceClassification`
    with `num_labels=1` (what `AutoModelForSequenceClassification` and WARP's
    `reward.hf_dir` read)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards.write(directory, params_to_hf(params, cfg, include_lm_head=False))
    hf_config = config_to_hf(cfg)
    if "score" in params:
        hf_config.architectures, hf_config.num_labels = [_HF_REWARD_ARCH[cfg.family]], 1
    hf_config.to_json_file(directory / "config.json")


def block_of(name: str) -> str | None:
    """The transformer block (`"layer_i"`, as in `merging.block_groups`) of a Hugging Face
    tensor name (`model.layers.i.*`, `model.language_model.layers.i.*`), or None outside the
    blocks."""
    match = _BLOCK.match(name)
    return f"layer_{int(match.group(1))}" if match else None


_BLOCK = re.compile(r"^(?:.*\.)?layers\.(\d+)\.")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def _layer_map(cfg: GemmaConfig) -> dict[str, tuple[str, ...]]:
    """HF names inside `layers.i.` -> our path inside `layer_i`."""
    names = {
        "input_layernorm.weight": ("pre_attention_norm", "scale"),
        "self_attn.q_proj.weight": ("attn", "q"),
        "self_attn.k_proj.weight": ("attn", "k"),
        "self_attn.v_proj.weight": ("attn", "v"),
        "self_attn.o_proj.weight": ("attn", "o"),
        "mlp.gate_proj.weight": ("mlp", "gate"),
        "mlp.up_proj.weight": ("mlp", "up"),
        "mlp.down_proj.weight": ("mlp", "down"),
    }
    if cfg.family == "gemma":
        names["post_attention_layernorm.weight"] = ("pre_ffw_norm", "scale")
    else:
        names |= {"post_attention_layernorm.weight": ("post_attention_norm", "scale"),
                  "pre_feedforward_layernorm.weight": ("pre_ffw_norm", "scale"),
                  "post_feedforward_layernorm.weight": ("post_ffw_norm", "scale")}
    if cfg.use_qk_norm:
        names |= {"self_attn.q_norm.weight": ("attn", "query_norm", "scale"),
                  "self_attn.k_norm.weight": ("attn", "key_norm", "scale")}
    return names


def _hf_shapes(cfg: GemmaConfig) -> dict[str, tuple[int, ...]]:
    d, n, k, h, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    per_layer = {"q_proj": (n * h, d), "k_proj": (k * h, d), "v_proj": (k * h, d),
                 "o_proj": (d, n * h), "gate_proj": (f, d), "up_proj": (f, d),
                 "down_proj": (d, f), "q_norm": (h,), "k_norm": (h,)}
    shapes = {"embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_layers):
        for name in _layer_map(cfg):
            module = name.split(".")[-2]
            shapes[f"layers.{i}.{name}"] = per_layer.get(module, (d,))
    shapes["norm.weight"] = (d,)
    return shapes


def _our_path(short: str, cfg: GemmaConfig) -> tuple[str, ...]:
    if short == "embed_tokens.weight":
        return ("input_embedding",)
    if short == "norm.weight":
        return ("final_norm", "scale")
    layer, rest = _LAYER.match(short).groups()
    return (f"layer_{layer}", *_layer_map(cfg)[rest])


def _to_ours(short: str, value: np.ndarray, cfg: GemmaConfig):
    path = _our_path(short, cfg)
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    leaf = path[-1] if path[-1] != "scale" else None
    if leaf == "q":
        value = value.reshape(n, h, -1).transpose(2, 0, 1)
    elif leaf in ("k", "v"):
        value = value.reshape(k, h, -1).transpose(2, 0, 1)
    elif leaf == "o":
        value = value.reshape(-1, n, h).transpose(1, 2, 0)
    elif leaf in ("gate", "up", "down"):
        value = value.T
    return path, value


def _from_ours(short: str, params: Mapping[str, Any], cfg: GemmaConfig) -> np.ndarray:
    path, layer = _stacked(_our_path(short, cfg), cfg)
    node = params
    for key in path:
        if key not in node:
            raise ValueError(f"params has no {'/'.join(path)} (needed for {short!r})")
        node = node[key]
    value = np.asarray(node if layer is None else node[layer])
    leaf = path[-1]
    if leaf in ("q", "k", "v"):
        value = value.transpose(1, 2, 0).reshape(-1, value.shape[0])
    elif leaf == "o":
        value = value.transpose(2, 0, 1).reshape(value.shape[2], -1)
    elif leaf in ("gate", "up", "down"):
        value = value.T
    return np.ascontiguousarray(value)


def _stacked(path: tuple[str, ...], cfg: GemmaConfig) -> tuple[tuple[str, ...], int | None]:
    """Our path of a tensor in `cfg`'s layout, and its layer's index along the stacked axis
    (None unless `cfg.scan_layers` and the tensor belongs to a block)."""
    if cfg.scan_layers and path[0].startswith("layer_"):
        return ("layers", *path[1:]), int(path[0].removeprefix("layer_"))
    return path, None


def _set(tree: dict, path: tuple[str, ...], value, layer: int | None, num_layers: int) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    if layer is None:
        tree[path[-1]] = value
        return
    if path[-1] not in tree:  # the stacked array, filled one layer at a time
        tree[path[-1]] = np.empty((num_layers, *value.shape), value.dtype)
    tree[path[-1]][layer] = value


def _first(value, default):
    if value is None:
        return default
    return value[0] if isinstance(value, (list, tuple)) else value


def _rope_theta(rope: Mapping[str, Any], hf_config: Any, where: str) -> float:
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise ValueError(f"unsupported RoPE type {kind!r} in {where}: Gemma uses default/linear")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError(f"no rope_theta in {where}")
    return float(theta)


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
