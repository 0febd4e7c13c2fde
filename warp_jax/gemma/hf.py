"""Hugging Face import and export: configs, state dicts and safetensors directories (the
tensor table: `hf_tensors`)."""

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
from warp_jax.gemma.hf_tensors import (
    _LAYER,
    _from_ours,
    _natural,
    _set,
    _stacked,
    _tensors,
    _to_ours,
    _unused_shared_kv,
    stacked_length,
)

_PREFIX = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?")
_HF_ARCH = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
            "gemma3": "Gemma3ForCausalLM", "gemma4": "Gemma4ForCausalLM"}
_HF_REWARD_ARCH = {"gemma": "GemmaForSequenceClassification",
                   "gemma2": "Gemma2ForSequenceClassification",
                   "gemma3": "Gemma3TextForSequenceClassification",
                   # transformers has no Gemma 4 sequence classifier: the causal LM's layout
                   # plus `score.weight`, which AutoModelForCausalLM loads without the head.
                   "gemma4": "Gemma4ForCausalLM"}


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
    sizes = hf_config.get("text_config", hf_config)
    missing = [k for k in _SIZE_FIELDS if not isinstance(sizes, dict) or k not in sizes]
    if missing:  # transformers would fill them with its defaults: another model
        raise ValueError(f"{path}: lacks {', '.join(missing)} (a checkpoint's config.json "
                         "gives the model's sizes)")
    return config_from_hf(hf_config)


_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")


def config_from_hf(hf_config: Any, **overrides: Any) -> GemmaConfig:
    """A `GemmaConfig` from a transformers Gemma/Gemma2/Gemma3(Text)/Gemma4(Text) config (or
    its dict). A multimodal Gemma 3 or 4 config gives its text decoder's (the vision and audio
    towers are not supported, and their tensors are skipped on import)."""
    if isinstance(hf_config, Mapping):
        import transformers

        hf_config = transformers.AutoConfig.for_model(**hf_config)
    if (getattr(hf_config, "model_type", None) in ("gemma3", "gemma4")
            and hasattr(hf_config, "text_config")):
        _reject_unsupported(hf_config)  # the multimodal config holds tie_word_embeddings
        hf_config = hf_config.text_config
    model_type = getattr(hf_config, "model_type", None)
    family = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3",
              "gemma4_text": "gemma4"}.get(model_type)
    if family is None:
        raise ValueError(
            f"unknown architecture: model_type {model_type!r}; supported: gemma, gemma2, "
            "gemma3_text, gemma4_text (and the text decoder of gemma3 and gemma4; their "
            "vision and audio towers are not supported)"
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
        num_heads=c.num_attention_heads, mlp_dim=c.intermediate_size, family=family,
        norm_eps=c.rms_norm_eps, pad_id=_first(c.pad_token_id, 0),
        eos_id=_first(c.eos_token_id, 1), bos_id=_first(c.bos_token_id, 2),
    )
    if family == "gemma4":  # head shapes vary by layer type: read per layer
        return GemmaConfig(**{**fields, **_gemma4_fields(c), **overrides})
    fields.update(num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim)
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


def _gemma4_fields(c: Any) -> dict[str, Any]:
    """The Gemma 4 fields of a `Gemma4TextConfig`: per-type head shapes (its
    `per_layer_config`), KV sharing, per-layer inputs, experts and proportional RoPE."""
    types = tuple("local" if t == "sliding_attention" else "global" for t in c.layer_types)
    shapes: dict[str, set[tuple[int, int]]] = {"local": set(), "global": set()}
    for i, kind in enumerate(types):
        layer = c.per_layer_config[i]
        shapes[kind].add((layer.head_dim, layer.num_key_value_heads))
    if any(len(found) > 1 for found in shapes.values()):
        raise ValueError(f"unsupported per_layer_config in the {c.model_type} config: this "
                         "Gemma 4 gives all global layers one head shape and all sliding "
                         f"layers another, got (head_dim, num_key_value_heads) {shapes}")
    (head_dim, kv_heads), = shapes["local"] or shapes["global"]
    (global_head_dim, global_kv), = shapes["global"] or shapes["local"]
    rope = c.rope_parameters or {}
    full, sliding = rope.get("full_attention", {}), rope.get("sliding_attention", {})
    for where, params, kinds in (("full_attention", full, ("default", "proportional")),
                                 ("sliding_attention", sliding, ("default",))):
        if params.get("rope_type", "default") not in kinds:
            raise ValueError(f"unsupported RoPE type {params['rope_type']!r} in rope_parameters"
                             f"['{where}']: Gemma 4 uses {' or '.join(kinds)}")
    proportional = full.get("rope_type") == "proportional"
    moe = bool(c.enable_moe_block)
    return dict(
        family="gemma4", attention_pattern=types, head_dim=head_dim, num_kv_heads=kv_heads,
        sliding_window=c.sliding_window if "local" in types else None,
        final_logit_softcap=c.final_logit_softcapping, use_post_attn_norm=True,
        use_post_ffw_norm=True, use_qk_norm=True,
        rope_base=float(full.get("rope_theta", 1_000_000.0)),
        rope_local_base=float(sliding.get("rope_theta", 10_000.0)),
        rope_scale_factor=float(full.get("factor", 1.0)) if proportional else 1.0,
        rope_global_fraction=float(full.get("partial_rotary_factor", 1.0)) if proportional
        else 1.0,
        global_head_dim=global_head_dim, num_global_kv_heads=global_kv,
        attention_k_eq_v=bool(c.attention_k_eq_v), num_kv_shared_layers=c.num_kv_shared_layers,
        double_wide_mlp=bool(c.use_double_wide_mlp),
        per_layer_input_dim=c.hidden_size_per_layer_input or 0,
        per_layer_vocab_size=(c.vocab_size_per_layer_input if c.hidden_size_per_layer_input
                              and c.vocab_size_per_layer_input != c.vocab_size else None),
        num_experts=c.num_experts if moe else 0,
        experts_per_token=c.top_k_experts if moe else 0,
        expert_mlp_dim=c.moe_intermediate_size if moe else 0,
    )


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
        if name == "use_bidirectional_attention" and value == "vision":
            continue  # Gemma 4: bidirectional among image tokens only, causal on text
        if value is not None and bool(value) != default:
            raise ValueError(f"unsupported {name}={value!r} in the {hf_config.model_type} "
                             f"config: this Gemma supports only {name}={default} ({why})")


def config_to_hf(cfg: GemmaConfig) -> Any:
    """The transformers config of `cfg` (GemmaConfig, Gemma2Config, Gemma3TextConfig or
    Gemma4TextConfig)."""
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
    if cfg.family == "gemma4":
        return _gemma4_config(cfg, common, layer_types)
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


def _gemma4_config(cfg: GemmaConfig, common: dict[str, Any], layer_types: list[str]) -> Any:
    import transformers

    if cfg.kv_heads_of("global") != cfg.num_kv_heads and not cfg.attention_k_eq_v:
        raise ValueError("a Gemma 4 config with num_global_kv_heads != num_kv_heads and "
                         "attention_k_eq_v=False has no transformers equivalent")
    if cfg.attn_logit_softcap is not None or cfg.query_pre_attn_scalar is not None:
        raise ValueError("Gemma 4 has no attention logit soft-cap or query_pre_attn_scalar")
    full = {"rope_type": "proportional", "partial_rotary_factor": cfg.rope_global_fraction,
            "rope_theta": cfg.rope_base}
    if cfg.rope_scale_factor != 1.0:
        full["factor"] = cfg.rope_scale_factor
    moe = dict(enable_moe_block=True, num_experts=cfg.num_experts,
               top_k_experts=cfg.experts_per_token,
               moe_intermediate_size=cfg.expert_mlp_dim) if cfg.num_experts else {}
    return transformers.Gemma4TextConfig(
        **common, **moe, layer_types=layer_types, sliding_window=cfg.sliding_window or 512,
        final_logit_softcapping=cfg.final_logit_softcap,
        rope_parameters={"full_attention": full, "sliding_attention": {
            "rope_type": "default", "rope_theta": cfg.rope_local_base or cfg.rope_base}},
        global_head_dim=cfg.head_dim_of("global"),
        num_global_key_value_heads=cfg.kv_heads_of("global"),
        attention_k_eq_v=cfg.attention_k_eq_v, num_kv_shared_layers=cfg.num_kv_shared_layers,
        use_double_wide_mlp=cfg.double_wide_mlp,
        hidden_size_per_layer_input=cfg.per_layer_input_dim,
        vocab_size_per_layer_input=cfg.per_layer_vocab_size or cfg.vocab_size)


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
    expected = _tensors(cfg)
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
            if _LAYER.match(short) and not _unused_shared_kv(short, cfg):
                raise ValueError(f"unexpected tensor {hf_name!r} for a {cfg.family} config "
                                 f"with {cfg.num_layers} layers")
            continue
        tensor = expected[short]
        value = np.asarray(load())
        if tuple(value.shape) != tensor.hf_shape:
            raise ValueError(f"tensor {hf_name!r} has shape {tuple(value.shape)}, expected "
                             f"{tensor.hf_shape} for this config")
        array = _to_ours(tensor, value)
        path, layer = _stacked(tensor.path, cfg)
        _set(params, path, array.astype(dtype), layer, stacked_length(cfg))
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
    for short, tensor in _tensors(cfg).items():
        out["model." + short] = _from_ours(short, tensor, params, cfg)
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
