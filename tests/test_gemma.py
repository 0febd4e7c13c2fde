"""Flax Gemma against transformers' Gemma, Gemma 2, Gemma 3 and Gemma 4 on random tiny
configs."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.ad_checkpoint import print_saved_residuals

from warp_jax import evaluation, merging, sampling, sharding
from warp_jax.gemma import (
    Gemma,
    GemmaConfig,
    abstract_params,
    hf,
    init_cache,
    stack_layers,
    unstack_layers,
)

B, T = 3, 11

HF_CONFIGS = {
    # MHA with head_dim != d / heads.
    "gemma_mha": transformers.GemmaConfig(
        vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, intermediate_size=96),
    "gemma_mqa": transformers.GemmaConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, intermediate_size=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    # GQA, sliding window shorter than the sequence, both soft-caps active.
    "gemma2_gqa": transformers.Gemma2Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, intermediate_size=96, sliding_window=4,
        query_pre_attn_scalar=20, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    # QK-norm, local/global RoPE bases, linear RoPE scaling on global layers, 5:1 pattern.
    "gemma3": transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=96, sliding_window=3,
        query_pre_attn_scalar=24, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    # Per-layer inputs, the last three layers sharing keys and values (and their caches) with
    # double-wide MLPs, keys as values and wider global heads with proportional RoPE.
    "gemma4": transformers.Gemma4TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
        num_global_key_value_heads=1, attention_k_eq_v=True, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=128, num_kv_shared_layers=3, use_double_wide_mlp=True,
        layer_types=["sliding_attention", "full_attention"] * 3, sliding_window=3,
        final_logit_softcapping=3.0),
    # Mixture of experts beside the MLP; no per-layer inputs, separate values.
    "gemma4_moe": transformers.Gemma4TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
        hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "full_attention"]),
}
# Scanned only: a Gemma 4 whose pattern repeats every 2 layers, whose last three layers
# share the keys and values of layers 5 and 6: two periods under the scan, six layers after
# them; per-layer inputs, double-wide MLPs on the shared layers, keys as values, wider global
# heads.
SCAN_ONLY = {
    "gemma4_periods": transformers.Gemma4TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=10,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
        num_global_key_value_heads=1, attention_k_eq_v=True, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=128, num_kv_shared_layers=3, use_double_wide_mlp=True,
        layer_types=["sliding_attention", "full_attention"] * 5, sliding_window=3,
        final_logit_softcapping=3.0),
}
# `scan_layers` takes every model with a whole period before its first KV-sharing donor
# ("gemma4" has none: layer 1 is one).
SCANNABLE = sorted([*(name for name in HF_CONFIGS if name != "gemma4"), *SCAN_ONLY])


def _hf_model(hf_config, seed=0, embed_std=0.3):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norm weights too
            p.normal_(0.0, 0.3)
        for name, buffer in model.named_buffers():  # Gemma 4's learned block scalars
            if name.endswith("layer_scalar"):
                buffer.uniform_(0.5, 1.5)
        model.get_input_embeddings().weight.mul_(embed_std / 0.3)
        if getattr(model.config, "hidden_size_per_layer_input", 0):
            model.get_per_layer_input_embeddings().weight.mul_(embed_std / 0.3)
    return model.eval()


def _inputs(vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), bool)
    mask[1, :4] = False  # left padding
    mask[2, :1] = False
    tokens[~mask] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


def _hf_logits(model, tokens, mask, positions):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)),
                    position_ids=torch.from_numpy(positions.astype(np.int64)))
    return out.logits.float().numpy()


def _max_rel_err(ours, ref, mask):
    ours, ref = np.asarray(ours)[mask], np.asarray(ref)[mask]
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@functools.cache
def _case(name):
    model = _hf_model({**HF_CONFIGS, **SCAN_ONLY}[name])
    cfg = hf.config_from_hf(model.config)
    state = model.state_dict()
    params = hf.params_from_hf(state, cfg)
    apply = jax.jit(Gemma(cfg).apply)
    return name, model, cfg, state, params, apply


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def case(request):
    return _case(request.param)


@pytest.fixture(scope="module", params=SCANNABLE)
def scannable_case(request):
    return _case(request.param)


def test_config_from_hf_reads_every_feature():
    cfg2 = hf.config_from_hf(HF_CONFIGS["gemma2_gqa"])
    assert cfg2.attention_types == ("local", "global", "local")
    assert (cfg2.sliding_window, cfg2.attn_logit_softcap, cfg2.final_logit_softcap) == (4, 2, 3)
    assert cfg2.query_pre_attn_scalar == 20 and cfg2.use_post_ffw_norm
    cfg3 = hf.config_from_hf(HF_CONFIGS["gemma3"])
    assert cfg3.attention_types == ("local",) * 5 + ("global", "local")
    assert (cfg3.rope_base, cfg3.rope_local_base, cfg3.rope_scale_factor) == (1e6, 1e4, 8.0)
    assert cfg3.use_qk_norm and cfg3.family == "gemma3"
    cfg4 = hf.config_from_hf(HF_CONFIGS["gemma4"])
    assert cfg4.attention_types == ("local", "global") * 3 and cfg4.family == "gemma4"
    assert (cfg4.head_dim, cfg4.num_kv_heads, cfg4.global_head_dim,
            cfg4.num_global_kv_heads) == (8, 2, 16, 1)
    assert cfg4.attention_k_eq_v and cfg4.double_wide_mlp and cfg4.per_layer_input_dim == 8
    assert cfg4.kv_sources == (None, None, None, 1, 2, 1)  # each type's last producer
    assert (cfg4.rope_base, cfg4.rope_local_base, cfg4.rope_global_fraction) == (1e6, 1e4, 0.25)
    moe = hf.config_from_hf(HF_CONFIGS["gemma4_moe"])
    assert (moe.num_experts, moe.experts_per_token, moe.expert_mlp_dim) == (4, 2, 16)
    assert moe.per_layer_input_dim == 0 and not moe.attention_k_eq_v


def test_logits_match_transformers(case):
    name, model, cfg, _, params, apply = case
    tokens, mask, positions = _inputs(cfg.vocab_size)
    ref = _hf_logits(model, tokens, mask, positions)
    ours, _ = apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                    jnp.asarray(mask))
    assert ours.shape == (B, T, cfg.vocab_size)
    assert _max_rel_err(ours, ref, mask) < 1e-4, name


def _random_hf_config(rng, family):
    """A random tiny Gemma, Gemma 2 or Gemma 3 config: head counts, widths, layer patterns,
    windows, scalars and soft-caps the fixed cases above do not name."""
    kv_heads, group = int(rng.choice([1, 2, 4])), int(rng.choice([1, 2, 3]))
    heads = kv_heads * group
    common = dict(vocab_size=int(rng.integers(50, 300)), num_hidden_layers=int(rng.integers(1, 5)),
                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                  hidden_size=heads * int(rng.choice([4, 8, 16])),  # transformers wants N | D
                  head_dim=int(rng.choice([4, 8, 16, 32])),
                  intermediate_size=int(rng.choice([32, 64, 96])),
                  rms_norm_eps=float(rng.choice([1e-6, 1e-5])))
    if family == "gemma":
        return transformers.GemmaConfig(**common, rope_parameters={
            "rope_type": "default", "rope_theta": float(rng.choice([1e4, 500.0]))})
    local = dict(sliding_window=int(rng.integers(2, 20)),
                 query_pre_attn_scalar=int(rng.integers(4, 64)))
    if family == "gemma2":
        return transformers.Gemma2Config(
            **common, **local,
            attn_logit_softcapping=float(rng.choice([5.0, 50.0])) if rng.random() < 0.7 else None,
            final_logit_softcapping=float(rng.choice([3.0, 30.0])) if rng.random() < 0.7 else None)
    return transformers.Gemma3TextConfig(
        **common, **local,
        layer_types=[str(rng.choice(["sliding_attention", "full_attention"]))
                     for _ in range(common["num_hidden_layers"])],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": float(rng.choice([1.0, 8.0])),
                               "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})


@pytest.mark.parametrize("seed", range(6))
def test_logits_match_transformers_on_random_configs(seed):
    rng = np.random.default_rng(seed)
    model = _hf_model(_random_hf_config(rng, ("gemma", "gemma2", "gemma3")[seed % 3]), seed=seed)
    cfg = hf.config_from_hf(model.config)
    params = hf.params_from_hf(model.state_dict(), cfg)
    batch, length = int(rng.integers(1, 5)), int(rng.integers(1, 24))
    tokens = rng.integers(3, cfg.vocab_size, size=(batch, length)).astype(np.int32)
    mask = np.arange(length) >= rng.integers(0, length, size=(batch, 1))  # left padding
    tokens[~mask] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    ref = _hf_logits(model, tokens, mask, positions)
    ours, _ = Gemma(cfg).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                               jnp.asarray(mask))
    assert _max_rel_err(ours, ref, mask) < 1e-4, model.config


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_greedy_sampling_matches_transformers_generate(name, sampler_backend):
    # Small embeddings, so that the blocks, not the embedding of the last token, pick the
    # next one: the rows then differ from step to step and between the four families.
    model = _hf_model(HF_CONFIGS[name], seed=1, embed_std=0.05)
    cfg = hf.config_from_hf(model.config)
    params = hf.params_from_hf(model.state_dict(), cfg)
    tokens, mask, _ = _inputs(cfg.vocab_size)
    n = 10
    free = sampling.sample(params, cfg, tokens, mask, jax.random.key(0), n, temperature=0.0,
                           backend=sampler_backend)
    # Two end tokens, as instruction-tuned Gemmas have: row 0 stops after 4 tokens at most.
    eos = [int(free.tokens[0, 3]), int(free.tokens[2, 6])]
    out = sampling.sample(params, cfg, tokens, mask, jax.random.key(0), n, temperature=0.0,
                          eos_id=eos, backend=sampler_backend)
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)), do_sample=False,
            max_new_tokens=n, eos_token_id=eos, pad_token_id=cfg.pad_id, output_logits=True,
            return_dict_in_generate=True)
    new = ref.sequences[:, T:].numpy()
    assert new.shape[1] == n and len(set(new[1:].ravel().tolist())) > 3, new
    logp = torch.stack([torch.log_softmax(x, dim=-1) for x in ref.logits], dim=1)
    ref_logp = torch.gather(logp, 2, ref.sequences[:, T:, None])[..., 0].numpy()
    tokens_out, logp_out, live = (np.asarray(x) for x in out)
    np.testing.assert_array_equal(tokens_out, new)
    ends = np.isin(new, eos)
    emitted = np.cumsum(ends, axis=1) - ends  # end tokens before each step
    np.testing.assert_array_equal(live, emitted == 0)
    assert live[0].sum() <= 4
    np.testing.assert_allclose(logp_out[live], ref_logp[live], atol=1e-4)


def test_default_positions_and_mask_are_a_plain_causal_forward(case):
    _, model, cfg, _, params, apply = case
    tokens, _, _ = _inputs(cfg.vocab_size, seed=1)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    ours, cache = apply({"params": params}, jnp.asarray(tokens))
    assert cache is None
    assert _max_rel_err(ours, ref, np.ones((B, T), bool)) < 1e-4


def test_cached_decoding_matches_full_forward(case):
    _, _, cfg, _, params, apply = case
    tokens, mask, positions = _inputs(cfg.vocab_size, seed=2)
    full, _ = apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                    jnp.asarray(mask))
    prefill = 6
    cache = init_cache(cfg, B, T + 2)
    step, cache = apply({"params": params}, jnp.asarray(tokens[:, :prefill]),
                        jnp.asarray(positions[:, :prefill]), jnp.asarray(mask[:, :prefill]),
                        cache)
    logits = [step]
    for t in range(prefill, T):
        step, cache = apply({"params": params}, jnp.asarray(tokens[:, t:t + 1]),
                            jnp.asarray(positions[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]),
                            cache)
        logits.append(step)
    assert int(cache["index"]) == T
    decoded = np.concatenate([np.asarray(x) for x in logits], axis=1)
    np.testing.assert_allclose(decoded[mask], np.asarray(full)[mask], rtol=1e-5, atol=1e-5)


def test_params_round_trip_exactly(case):
    _, _, cfg, state, params, _ = case
    back = hf.params_to_hf(params, cfg)
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value.numpy(), err_msg=name)


def test_save_hf_loads_in_transformers(case, tmp_path):
    name, _, cfg, _, params, apply = case
    hf.save_hf(params, cfg, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    assert type(loaded).__name__ == hf._HF_ARCH[cfg.family]
    tokens, mask, positions = _inputs(cfg.vocab_size, seed=3)
    ref = _hf_logits(loaded, tokens, mask, positions)
    ours, _ = apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                    jnp.asarray(mask))
    assert _max_rel_err(ours, ref, mask) < 1e-4, name
    reread = hf.params_from_hf(tmp_path, cfg)
    jax.tree.map(np.testing.assert_array_equal, reread, params)


def test_gemma3_multimodal_checkpoint_loads_its_text_decoder(tmp_path):
    """Gemma 3 from 4B up ships as `Gemma3ForConditionalGeneration`: the text decoder is read
    from its `model.language_model.*` tensors (the vision tower is skipped) and gives the
    logits transformers gives for text-only input."""
    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
        boi_token_index=297, eoi_token_index=298)).eval()
    model.save_pretrained(tmp_path)
    cfg = hf.config_from_hf(transformers.AutoConfig.from_pretrained(tmp_path))
    assert cfg.family == "gemma3" and cfg.vocab_size == 300 and cfg.use_qk_norm
    params = hf.params_from_hf(tmp_path, cfg)
    tokens, mask, positions = _inputs(cfg.vocab_size, seed=5)
    ours, _ = Gemma(cfg).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                               jnp.asarray(mask))
    assert _max_rel_err(ours, _hf_logits(model, tokens, mask, positions), mask) < 1e-4


def test_gemma4_multimodal_checkpoint_loads_its_text_decoder(tmp_path):
    """Gemma 4 checkpoints are `Gemma4ForConditionalGeneration`: the text decoder (per-layer
    inputs included) is read from `model.language_model.*`, the vision tower skipped."""
    text = HF_CONFIGS["gemma4"].to_dict()
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, patch_size=4,
                  pooling_kernel_size=1, position_embedding_size=64)
    torch.manual_seed(0)
    model = transformers.Gemma4ForConditionalGeneration(transformers.Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None)).eval()
    model.save_pretrained(tmp_path)
    cfg = hf.config_from_hf(transformers.AutoConfig.from_pretrained(tmp_path))
    assert cfg.family == "gemma4" and cfg.per_layer_input_dim == 8
    params = hf.params_from_hf(tmp_path, cfg)
    tokens, mask, positions = _inputs(cfg.vocab_size, seed=5)
    ours, _ = Gemma(cfg).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                               jnp.asarray(mask))
    assert _max_rel_err(ours, _hf_logits(model, tokens, mask, positions), mask) < 1e-4


def test_gemma4_shared_layers_have_no_keys_values_or_cache():
    """KV-shared layers own no key/value tensors or cache; checkpoints that carry them for
    those layers (transformers ignores them) load; elsewhere an extra tensor is an error."""
    _, _, cfg, state, params, _ = _case("gemma4")
    assert [f"layer_{i}" in init_cache(cfg, 1, 4) for i in range(6)] == [True] * 3 + [False] * 3
    assert "k" not in params["layer_4"]["attn"] and "v" not in params["layer_1"]["attn"]
    assert params["layer_1"]["attn"]["k"].shape == (32, 1, 16)  # global: K = 1, H = 16
    assert params["layer_4"]["mlp"]["gate"].shape == (32, 128)  # double-wide
    extra = dict(state)
    extra["model.layers.4.self_attn.k_proj.weight"] = torch.zeros(16, 32)
    jax.tree.map(np.testing.assert_array_equal, hf.params_from_hf(extra, cfg), params)
    extra["model.layers.2.self_attn.v_norm.weight"] = torch.zeros(8)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.2\.self_attn"):
        hf.params_from_hf(extra, cfg)


def test_gemma4_per_layer_tables_merge_one_angle_per_layer():
    """The per-layer input tables sit outside the blocks: SLERP gives the slices of layer i of
    both tables one angle of their own."""
    params = _case("gemma4")[4]
    groups = merging.block_groups(params)
    assert groups["per_layer_embedding"] == merging.Stacked("per_layer", 1)
    assert set(jax.tree.leaves(groups["layer_2"])) == {"layer_2"}
    rng = np.random.default_rng(2)
    runs = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(x.dtype) * 0.1, params)
            for _ in range(2)]
    merged = merging.slerp_tree(params, runs, groups=groups)
    for layer in (0, 5):
        def flat(t, layer=layer):
            return np.concatenate([np.ravel(t[name][:, layer]) for name in
                                   ("per_layer_embedding", "per_layer_projection")]).astype(float)

        d1, d2 = flat(runs[0]) - flat(params), flat(runs[1]) - flat(params)
        omega = np.arccos(d1 @ d2 / np.linalg.norm(d1) / np.linalg.norm(d2))
        want = flat(params) + np.sin(omega / 2) / np.sin(omega) * (d1 + d2)
        np.testing.assert_allclose(flat(merged), want, rtol=1e-4, atol=1e-5)


def test_sharded_forward_equals_unsharded():
    cfg = GemmaConfig.from_preset("tiny_gemma2")
    model = Gemma(cfg)
    tokens = jnp.asarray(_inputs(cfg.vocab_size)[0] % cfg.vocab_size)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    mesh = sharding.make_mesh(fsdp=2, model=4)
    shardings = sharding.param_shardings(boxed, mesh)
    init = jax.jit(lambda k: model.init(k, tokens)["params"], out_shardings=shardings)
    params = nn.unbox(init(jax.random.key(0)))
    q = params["layer_0"]["attn"]["q"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model", None)
    assert len({s.device for s in q.addressable_shards}) == 8
    sharded = jax.jit(model.apply, in_shardings=(
        {"params": shardings}, sharding.replicated(mesh)))({"params": params}, tokens)[0]
    single = jax.tree.map(lambda x: np.asarray(x), params)
    unsharded = jax.jit(model.apply)({"params": single}, tokens)[0]
    np.testing.assert_allclose(sharded, unsharded, rtol=1e-5, atol=1e-5)


def test_block_groups_give_one_angle_per_block(case):
    _, _, _cfg, _, params, _ = case
    groups = merging.block_groups(params)
    assert groups["input_embedding"] is None and groups["final_norm"]["scale"] is None
    assert set(jax.tree.leaves(groups["layer_1"])) == {"layer_1"}
    rng = np.random.default_rng(0)
    runs = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(x.dtype) * 0.1, params)
            for _ in range(2)]
    merged = merging.slerp_tree(params, runs, groups=groups)

    def flat(t):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(t["layer_0"])]).astype(float)

    d1, d2 = flat(runs[0]) - flat(params), flat(runs[1]) - flat(params)
    omega = np.arccos(d1 @ d2 / np.linalg.norm(d1) / np.linalg.norm(d2))
    want = flat(params) + np.sin(omega / 2) / np.sin(omega) * (d1 + d2)
    np.testing.assert_allclose(flat(merged), want, rtol=1e-4, atol=1e-5)


def test_logits_to_keep_are_the_last_positions_of_the_full_forward(case):
    _, _, cfg, _, params, apply = case
    tokens, mask, positions = _inputs(cfg.vocab_size, seed=3)
    args = (jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    full, _ = apply({"params": params}, *args)
    model = Gemma(cfg)
    last, _ = model.apply({"params": params}, *args, logits_to_keep=3)
    np.testing.assert_allclose(last, full[:, -3:], rtol=1e-5, atol=1e-5)
    # With a cache: the last block's queries run on the kept tokens only, but every token's
    # keys and values, the last block's included, are written.
    prefill = (jnp.asarray(tokens[:, :6]), jnp.asarray(positions[:, :6]), jnp.asarray(mask[:, :6]))
    _, want = apply({"params": params}, *prefill, init_cache(cfg, B, T))
    last, cache = model.apply({"params": params}, *prefill, init_cache(cfg, B, T),
                              logits_to_keep=2)
    np.testing.assert_allclose(last, full[:, 4:6], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(cache, want, rtol=1e-5, atol=1e-5)
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match=rf"logits_to_keep must be in \[1, {T}\]"):
            model.apply({"params": params}, *args, logits_to_keep=bad)


def test_remat_keeps_only_the_blocks_outputs_for_the_backward_pass(capsys):
    cfg = GemmaConfig.from_preset("tiny", num_layers=3)
    params = nn.unbox(Gemma(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    saved, grads = {}, {}
    for remat in (False, True):
        def loss(p, remat=remat):
            logits, _ = Gemma(cfg, remat=remat).apply({"params": p}, tokens, logits_to_keep=4)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0])

        print_saved_residuals(loss, params)
        saved[remat] = capsys.readouterr().out
        grads[remat] = jax.grad(loss)(params)
    chex.assert_trees_all_close(grads[True], grads[False], rtol=1e-6, atol=1e-7)
    inside = ("Attention.__call__", "MLP.__call__")
    assert all(name in saved[False] for name in inside)
    assert not any(name in saved[True] for name in inside)
    assert saved[True].count("(Block.__call__)") == cfg.num_layers


def test_scanned_layers_are_the_same_model(scannable_case):
    """`scan_layers`: params stacked along a layer axis, read from and written to Hugging Face
    exactly, the same logits (full, cached, last positions) and gradients as the unscanned
    model."""
    name, model, cfg, state, params, apply = scannable_case
    scan_cfg = cfg.replace(scan_layers=True)
    depth = scan_cfg.scan_depth // (scan_cfg.scan_period or 1)  # steps of the scan
    stacked = hf.params_from_hf(state, scan_cfg)
    jax.tree.map(np.testing.assert_array_equal, stacked, stack_layers(params, scan_cfg))
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), params)
    assert {x.shape[0] for x in jax.tree.leaves(stacked["layers"])} == {depth}
    for hf_name, value in hf.params_to_hf(stacked, scan_cfg).items():
        np.testing.assert_array_equal(value, state[hf_name].numpy(), err_msg=hf_name)

    scanned = Gemma(scan_cfg)
    tokens, mask, positions = _inputs(cfg.vocab_size)
    args = (jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    logits, _ = jax.jit(scanned.apply)({"params": stacked}, *args)
    assert _max_rel_err(logits, _hf_logits(model, tokens, mask, positions), mask) < 1e-4, name
    want, _ = apply({"params": params}, *args)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    last, _ = scanned.apply({"params": stacked}, *args, logits_to_keep=3)
    np.testing.assert_allclose(last, want[:, -3:], rtol=1e-5, atol=1e-5)

    prefill, cache = scanned.apply({"params": stacked}, *(x[:, :6] for x in args),
                                   init_cache(scan_cfg, B, T))
    assert {x.shape[:3] for x in jax.tree.leaves(cache["layers"])} == {(depth, B, T)}
    rest, cache = scanned.apply({"params": stacked}, *(x[:, 6:] for x in args), cache)
    decoded = np.concatenate([prefill, rest], axis=1)
    np.testing.assert_allclose(decoded[mask], np.asarray(want)[mask], rtol=1e-5, atol=1e-5)

    def loss(p, c):
        out, _ = Gemma(c, remat=True).apply({"params": p}, *args, logits_to_keep=4)
        return jnp.sum(jax.nn.log_softmax(out)[..., 0])

    chex.assert_trees_all_close(jax.grad(loss)(stacked, scan_cfg),
                                stack_layers(jax.grad(loss)(params, cfg), scan_cfg),
                                rtol=1e-4, atol=1e-4)


def test_scanned_slerp_merges_each_block_as_the_unscanned_one(scannable_case):
    _, _, cfg, _, params, _ = scannable_case
    rng = np.random.default_rng(1)
    runs = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(x.dtype) * 0.1, params)
            for _ in range(2)]
    want = merging.slerp_tree(params, runs, groups=merging.block_groups(params))
    period = cfg.scan_period
    stacked = [stack_layers(t, cfg) for t in (params, *runs)]
    groups = merging.block_groups(stacked[0])
    assert set(jax.tree.leaves(groups["layers"])) == (
        {merging.Stacked("layer", 0)} if period is None
        else {merging.Stacked("layer", 0, j, period) for j in range(period)})
    merged = merging.slerp_tree(stacked[0], stacked[1:], groups=groups)
    chex.assert_trees_all_close(unstack_layers(merged), want, rtol=1e-5, atol=1e-6)
    stats = evaluation.task_vector_stats(stacked[0], stacked[1:], groups)
    want_stats = evaluation.task_vector_stats(params, runs, merging.block_groups(params))
    assert stats.keys() == want_stats.keys()
    for key, value in stats.items():
        assert value == pytest.approx(want_stats[key]), key


@pytest.mark.parametrize("preset", ["tiny_gemma3", "tiny_gemma4_moe"])
def test_scanned_program_does_not_grow_with_depth(preset):
    """Unrolled, the compiled forward and backward grow with every block; scanned, a model of
    12 blocks compiles to the program of 6 (Gemma 4: 6 periods of 2 layers to 3)."""
    sizes = {}
    for scan in (False, True):
        for layers in (6, 12):
            cfg = GemmaConfig.from_preset(preset, num_layers=layers, scan_layers=scan)
            params = abstract_params(cfg)
            tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)

            def loss(p, tokens, cfg=cfg):
                return jnp.sum(Gemma(cfg, remat=True).apply({"params": p}, tokens)[0])

            hlo = jax.jit(jax.grad(loss)).lower(nn.unbox(params), tokens).as_text()
            sizes[scan, layers] = hlo.count("\n")
    assert sizes[False, 12] > 1.8 * sizes[False, 6]
    assert sizes[True, 12] == sizes[True, 6]


def test_bad_checkpoints_and_configs_name_the_problem(case):
    _, _, cfg, state, _, _ = case
    partial = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj"):
        hf.params_from_hf(partial, cfg)
    bad = dict(state)
    bad["model.norm.weight"] = torch.zeros(cfg.embed_dim + 1)
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape"):
        hf.params_from_hf(bad, cfg)
    with pytest.raises(ValueError, match="no safetensors"):
        hf.params_from_hf("/nonexistent/checkpoint", cfg)
    assert "lm_head.weight" in state  # tied: the embedding itself, accepted
    untied = dict(state)
    untied["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match=r"'lm_head\.weight' differs"):
        hf.params_from_hf(untied, cfg)


def test_unknown_architecture_and_bad_fields():
    with pytest.raises(ValueError, match="unknown architecture: model_type 'llama'"):
        hf.config_from_hf(transformers.LlamaConfig())
    # Gemma 2 runs "gelu" as the exact GELU; Gemma 1's legacy "gelu" means the tanh one.
    with pytest.raises(ValueError, match="unsupported hidden activation 'gelu' for gemma2"):
        hf.config_from_hf(transformers.Gemma2Config(hidden_activation="gelu"))
    assert hf.config_from_hf(transformers.GemmaConfig(hidden_act="gelu")).family == "gemma"
    # Fields whose other values would silently change the logits.
    for field, value in [("attention_bias", True), ("tie_word_embeddings", False),
                         ("use_bidirectional_attention", True)]:
        for config_class in (transformers.GemmaConfig, transformers.Gemma2Config,
                             transformers.Gemma3TextConfig):
            with pytest.raises(ValueError, match=f"unsupported {field}={value}"):
                hf.config_from_hf(config_class(**{field: value}))
    with pytest.raises(ValueError, match="unsupported tie_word_embeddings=False in the gemma3"):
        hf.config_from_hf(transformers.Gemma3Config(tie_word_embeddings=False))
    with pytest.raises(ValueError, match=r"scaling factor 2.0 in rope_parameters\['sliding"):
        hf.config_from_hf(transformers.Gemma3TextConfig(rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}))
    with pytest.raises(ValueError, match="num_kv_heads"):
        GemmaConfig.from_preset("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="embed_dim must be a positive int"):
        GemmaConfig.from_preset("tiny", embed_dim=-4)
    with pytest.raises(ValueError, match="unknown pattern 'zigzag'"):
        GemmaConfig.from_preset("tiny", attention_pattern="zigzag")
    with pytest.raises(ValueError, match="sliding_window"):
        GemmaConfig.from_preset("tiny", attention_pattern="alternating")
    with pytest.raises(ValueError, match="unknown Gemma preset"):
        GemmaConfig.from_preset("gemma5")
    # Gemma 4: only the text decoder, and its features only under family "gemma4".
    with pytest.raises(ValueError, match="unknown architecture: model_type 'gemma4_vision'"):
        hf.config_from_hf(transformers.Gemma4VisionConfig())
    with pytest.raises(ValueError, match="unsupported use_bidirectional_attention='all'"):
        hf.config_from_hf(transformers.Gemma4TextConfig(use_bidirectional_attention="all"))
    assert hf.config_from_hf(transformers.Gemma4TextConfig(
        use_bidirectional_attention="vision")).family == "gemma4"  # causal on text
    with pytest.raises(ValueError, match="num_experts is a Gemma 4 feature"):
        GemmaConfig.from_preset("tiny_gemma3", num_experts=4)
    with pytest.raises(ValueError, match=r"scan_layers: no whole period of 2 layers comes "
                                         r"before layer 1, whose keys and values later layers "
                                         r"share, so nothing would be scanned"):
        GemmaConfig.from_preset("tiny_gemma4", scan_layers=True)
    with pytest.raises(ValueError, match="experts_per_token"):
        GemmaConfig.from_preset("tiny_gemma4_moe", experts_per_token=5)
    with pytest.raises(ValueError, match=r"layer 1 shares keys and values .* no earlier layer "
                                         r"is global"):
        GemmaConfig.from_preset("tiny_gemma4", num_kv_shared_layers=5)


@pytest.mark.parametrize("name", ["gemma_2b", "gemma_7b", "gemma2_2b", "gemma2_9b",
                                  "gemma2_27b", "gemma3_1b", "gemma3_4b", "gemma3_12b",
                                  "gemma3_27b", "gemma4_26b_a4b", "gemma4_31b"])
def test_presets_have_the_published_sizes(name):
    cfg = GemmaConfig.from_preset(name)
    boxed = jax.eval_shape(Gemma(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(boxed))
    published = {"gemma_2b": 2.51e9, "gemma_7b": 8.54e9, "gemma2_2b": 2.61e9,
                 "gemma2_9b": 9.24e9, "gemma2_27b": 27.2e9, "gemma3_1b": 1.0e9,
                 "gemma3_4b": 3.88e9, "gemma3_12b": 11.77e9, "gemma3_27b": 27.0e9,
                 "gemma4_26b_a4b": 25.2e9, "gemma4_31b": 30.7e9}[name]
    assert abs(count / published - 1) < 0.03, (name, count)
