"""The sampler against full forward passes of the same model and transformers' warpers."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from warp_jax import sampling, sharding, stacking, trainer
from warp_jax.backends import cpu as cpu_backend
from warp_jax.gemma import Gemma, GemmaConfig

B, P, N = 4, 7, 8


@pytest.fixture(scope="module")
def setup():
    cfg = GemmaConfig.from_preset("tiny_gemma2", vocab_size=48)
    params = Gemma(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = nn.unbox(params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, size=(B, P)).astype(np.int32)
    mask = np.ones((B, P), bool)
    mask[1, :3] = False
    mask[3, :6] = False
    tokens[~mask] = 0
    return cfg, params, jnp.asarray(tokens), jnp.asarray(mask), jax.jit(Gemma(cfg).apply)


def _full_logits(setup, out):
    _cfg, params, tokens, mask, apply = setup
    seq = jnp.concatenate([tokens, out.tokens], axis=1)
    seq_mask = jnp.concatenate([mask, out.mask], axis=1)
    positions = jnp.maximum(jnp.cumsum(seq_mask, axis=1) - 1, 0)
    logits, _ = apply({"params": params}, seq, positions, seq_mask)
    return np.asarray(logits[:, P - 1:-1])  # the logits that predicted each sampled token


def test_logprobs_equal_a_full_forward(setup, sampler_backend):
    cfg, params, tokens, mask, _ = setup
    out = sampling.sample(params, cfg, tokens, mask, jax.random.key(1), N, temperature=0.9,
                          backend=sampler_backend)
    assert out.tokens.shape == out.logprobs.shape == out.mask.shape == (B, N)
    logits = _full_logits(setup, out) / 0.9
    logp = jax.nn.log_softmax(logits, axis=-1)
    want = np.take_along_axis(np.asarray(logp), np.asarray(out.tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=1e-4, rtol=1e-4)
    assert np.asarray(out.mask).all()


def test_greedy_takes_the_argmax(setup, sampler_backend):
    cfg, params, tokens, mask, _ = setup
    out = sampling.sample(params, cfg, tokens, mask, jax.random.key(0), N, temperature=0.0,
                          backend=sampler_backend)
    logits = _full_logits(setup, out)
    np.testing.assert_array_equal(np.asarray(out.tokens), logits.argmax(-1))
    want = np.max(np.asarray(jax.nn.log_softmax(logits, axis=-1)), axis=-1)
    np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=1e-4)


def _kept_by_sorting(logits, top_k, top_p):
    """The top-k / top-p sets by sorting each row in float64: True where a token is kept."""
    kept = np.ones(logits.shape, bool)
    for row, keep in zip(logits.reshape(-1, logits.shape[-1]).astype(np.float64),
                         kept.reshape(-1, logits.shape[-1]), strict=True):
        if top_k is not None:
            keep &= row >= np.sort(row)[::-1][top_k - 1]
        if top_p is not None:
            ordered = np.sort(np.where(keep, row, -np.inf))[::-1]
            probs = np.exp(ordered - ordered[0])
            probs /= probs.sum()
            before = np.cumsum(probs) - probs  # the mass of the more likely tokens
            keep &= row >= ordered[before < top_p].min()
    return kept


@pytest.mark.parametrize("top_k,top_p", [(3, None), (None, 0.5), (5, 0.7)])
def test_top_k_and_top_p_never_emit_an_excluded_token(setup, top_k, top_p, sampler_backend):
    cfg, params, tokens, mask, _ = setup
    for seed in range(3):
        out = sampling.sample(params, cfg, tokens, mask, jax.random.key(seed), N,
                              temperature=1.0, top_k=top_k, top_p=top_p,
                              backend=sampler_backend)
        logits = _full_logits(setup, out)
        kept = _kept_by_sorting(logits, top_k, top_p)
        sampled = np.asarray(out.tokens)[..., None]
        assert np.take_along_axis(kept, sampled, -1).all()
        # Log-probabilities renormalised over the kept tokens.
        kept_logits = np.where(kept, logits, -np.inf)
        want = np.take_along_axis(np.asarray(jax.nn.log_softmax(kept_logits, -1)), sampled,
                                  -1)[..., 0]
        np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=1e-4, rtol=1e-4)


# top_p traced, so that one compile per top_k serves every example.
_BACKENDS = {"xla": sampling.XlaBackend(), "cpu": cpu_backend.CpuBackend()}
_TOP_K_FILTERS = {name: jax.jit(lambda logits, k, b=b: b.filter(logits, k, None),
                                static_argnums=1) for name, b in _BACKENDS.items()}
_TOP_P_FILTERS = {name: jax.jit(b.filter, static_argnums=1) for name, b in _BACKENDS.items()}
_CHUNK = cpu_backend._TOP_K_CHUNK
VOCAB = 40 * _CHUNK  # 40 chunks: the CPU backend's top-k searches chunks for k <= 10


@pytest.mark.parametrize("backend", sorted(_BACKENDS))
@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31), scale=st.sampled_from([0.01, 1.0, 30.0]),
       ties=st.booleans(), masked=st.booleans(),
       top_k=st.sampled_from([None, 1, 3, 10, 11, VOCAB]),
       top_p=st.one_of(st.none(), st.floats(0.01, 0.99)))
def test_filter_keeps_the_sets_that_sorting_finds(backend, seed, scale, ties, masked, top_k,
                                                  top_p):
    """Each backend's thresholds (the CPU one's radix select, the XLA one's sort) against
    sorting in float64, and against transformers' top-k / top-p warpers where no logits tie:
    ties, both signs, -0.0, -inf entries, and top-k over chunk candidates (k <= 10) or the
    whole vocabulary. (top_p stops short of 1, where float32 and float64 disagree on the
    vanishing tail.)"""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(3, VOCAB)) * scale).astype(np.float32)
    if ties:
        logits = np.round(logits)  # many equal logits, and -0.0 beside 0.0
    if masked:
        logits[:, rng.integers(0, VOCAB, size=VOCAB // 5)] = -np.inf
    if top_p is None:
        filtered = _TOP_K_FILTERS[backend](jnp.asarray(logits), 1 if top_k is None else top_k)
    else:
        filtered = _TOP_P_FILTERS[backend](jnp.asarray(logits), top_k, jnp.float32(top_p))
    want = _kept_by_sorting(logits, top_k, top_p) & np.isfinite(logits)
    if top_k is None and top_p is None:
        want = _kept_by_sorting(logits, 1, None)
    np.testing.assert_array_equal(np.isfinite(np.asarray(filtered)), want)
    if not ties:  # transformers' warpers, which break ties by sort order, keep the same sets
        ref = torch.from_numpy(logits)
        if top_k is not None:
            ref = transformers.TopKLogitsWarper(top_k)(None, ref)
        if top_p is not None:
            ref = transformers.TopPLogitsWarper(top_p)(None, ref)
        if top_k is not None or top_p is not None:
            np.testing.assert_array_equal(np.isfinite(np.asarray(filtered)),
                                          np.isfinite(ref.numpy()))


def test_top_k_candidates_put_chunks_above_the_cut_first():
    """Ten chunks whose maximum is the cut come before the one chunk above it, which holds
    the 3 largest logits: choosing the first chunks at or above the cut would miss them."""
    logits = np.zeros((1, VOCAB), np.float32)
    logits[0, : 10 * _CHUNK : _CHUNK] = 5.0
    logits[0, 30 * _CHUNK + np.arange(3)] = [9.0, 8.0, 7.0]
    kept = np.isfinite(np.asarray(_TOP_K_FILTERS["cpu"](jnp.asarray(logits), 3)))[0]
    np.testing.assert_array_equal(np.flatnonzero(kept), 30 * _CHUNK + np.arange(3))


def test_keys_determine_the_tokens(setup):
    cfg, params, tokens, mask, _ = setup
    a = sampling.sample(params, cfg, tokens, mask, jax.random.key(5), N)
    b = sampling.sample(params, cfg, tokens, mask, jax.random.key(5), N)
    c = sampling.sample(params, cfg, tokens, mask, jax.random.key(6), N)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_eos_masks_the_rest_of_the_row(setup):
    cfg, params, tokens, mask, _ = setup
    greedy = sampling.sample(params, cfg, tokens, mask, jax.random.key(0), N, temperature=0.0)
    first = np.asarray(greedy.tokens)
    # One end token, then two (an instruction-tuned Gemma's <eos> and <end_of_turn>).
    for eos, stops_by in ((int(first[0, 2]), {0: 3}),
                          ([int(first[0, 2]), np.int64(first[3, 1])], {0: 3, 3: 2})):
        out = sampling.sample(params, cfg, tokens, mask, jax.random.key(0), N,
                              temperature=0.0, eos_id=eos)
        toks, lp, m = (np.asarray(x) for x in out)
        for row in range(B):
            hits = np.flatnonzero(np.isin(first[row], eos))
            stop = hits[0] if hits.size else N - 1
            assert m[row, :stop + 1].all() and not m[row, stop + 1:].any()
            assert np.all(toks[row, stop + 1:] == cfg.pad_id) and np.all(lp[row, stop + 1:] == 0)
            np.testing.assert_array_equal(toks[row, :stop + 1], first[row, :stop + 1])
        for row, most in stops_by.items():
            assert m[row].sum() <= most


def test_second_call_does_not_recompile(setup, sampler_backend):
    cfg, params, tokens, mask, _ = setup
    sampling.sample(params, cfg, tokens, mask, jax.random.key(0), N, backend=sampler_backend)
    before = sampling._sample._cache_size()
    other = jax.tree.map(lambda x: x * 1.01, params)
    sampling.sample(other, cfg, (tokens + 1) % cfg.vocab_size, mask, jax.random.key(9), N,
                    backend=sampler_backend)
    assert sampling._sample._cache_size() == before
    # The top-p value is traced too: a new one does not recompile.
    sampling.sample(params, cfg, tokens, mask, jax.random.key(0), N, top_k=3, top_p=0.5)
    before = sampling._sample._cache_size()
    sampling.sample(params, cfg, tokens, mask, jax.random.key(0), N, top_k=3, top_p=0.9)
    assert sampling._sample._cache_size() == before


def test_bfloat16_decode_loop_reads_its_matrices_in_bfloat16(setup):
    """Float32 weights computed in bfloat16 are cast once, before the loop: each decode step
    then reads 2 bytes per weight, not 4 and a conversion (1.6x the tok/s on an H200)."""
    cfg, params, tokens, mask, _ = setup
    cfg = dataclasses.replace(cfg, dtype="bfloat16")
    text = sampling._sample.lower(
        params, tokens, mask, jax.random.key(0), jnp.float32(0.9), jnp.float32(1.0),
        jnp.asarray([-1], jnp.int32), cfg=cfg, max_new_tokens=N, greedy=False, top_k=None,
        use_top_p=False, backend=sampling.get_backend("xla")).as_text()
    loops = [line for line in text.splitlines() if "stablehlo.while" in line]
    carried = set(re.findall(r"tensor<([\dx]+)x(f32|bf16)>", max(loops, key=len)))
    matrices = {"x".join(map(str, x.shape)) for x in jax.tree.leaves(params) if x.ndim >= 2}
    assert {shape for shape, dtype in carried if dtype == "bf16"} >= matrices
    assert not {shape for shape, dtype in carried if dtype == "f32"} & matrices
    norm_scales = {str(x.shape[0]) for x in jax.tree.leaves(params) if x.ndim == 1}
    assert norm_scales <= {shape for shape, dtype in carried if dtype == "f32"}  # kept as is


def test_sharded_equals_unsharded(setup, sampler_backend):
    """Params and batch sharded over the mesh give the unsharded tokens and log-probs."""
    cfg, params, tokens, mask, _ = setup
    mesh = sharding.make_mesh(data=2, fsdp=2, model=2)
    boxed = jax.eval_shape(Gemma(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    shardings = sharding.param_shardings(boxed["params"], mesh)
    sharded_params = jax.device_put(params, shardings)
    batch = sharding.logical_sharding(("batch", None), tokens.shape, mesh)
    out = sampling.sample(sharded_params, cfg, jax.device_put(tokens, batch),
                          jax.device_put(mask, batch), jax.random.key(3), N,
                          backend=sampler_backend)
    ref = sampling.sample(params, cfg, tokens, mask, jax.random.key(3), N,
                          backend=sampler_backend)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


@pytest.mark.parametrize("axes, tensor_parallel, kv_split", [
    (dict(run=2, fsdp=4), 4, False), (dict(run=2, fsdp=2, model=2), 4, False),
    (dict(run=2, data=2, fsdp=2), 2, True)])
def test_decode_layout_gives_the_training_layouts_tokens(setup, sampler_backend, axes,
                                                         tensor_parallel, kv_split, capfd):
    """Two stacked runs sampled in the decode layout (tensor x data parallel; 2 KV heads split
    over 2 devices, replicated over 4) draw the tokens and log-probs that each run draws alone
    on one device, and the compiler follows the move from the training layout without
    rematerialising whole weights."""
    cfg, params, tokens, mask, _ = setup
    mesh = sharding.make_mesh(**axes)
    boxed = jax.eval_shape(Gemma(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    layout = sharding.decode_layout(boxed["params"], mesh)
    assert (layout.tensor_parallel, layout.kv_heads_split) == (tensor_parallel, kv_split)
    runs = [params, jax.tree.map(lambda x: x * 1.5, params)]
    stacked = jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs), *runs),
                             sharding.param_shardings(boxed["params"], mesh, [("run", 2)]))
    rows = sharding.batch_sharding(mesh, 2, num_runs=2)
    keys = jax.random.split(jax.random.key(5), 2)

    def one_run(p, t, m, key):
        return trainer.decode(p, cfg, t, m, key, N, layout, temperature=0.9,
                              backend=sampler_backend)

    with sharding.activation_sharding(mesh):
        out = jax.jit(stacking.stack_runs(one_run, mesh, 2, (0, 0, 0, 0)))(
            stacked, *(jax.device_put(jnp.stack([x, x]), rows) for x in (tokens, mask)), keys)
    for m, run_params in enumerate(runs):
        ref = sampling.sample(run_params, cfg, tokens, mask, keys[m], N,
                              backend=sampler_backend)
        np.testing.assert_array_equal(out.tokens[m], ref.tokens)
        np.testing.assert_array_equal(out.mask[m], ref.mask)
        np.testing.assert_allclose(out.logprobs[m], ref.logprobs, atol=1e-5)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_decode_layouts_the_model_cannot_take_are_one_clear_error(setup):
    cfg, *_ = setup
    boxed = jax.eval_shape(Gemma(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    shape = {"run": 1, "data": 1, "fsdp": 8, "model": 1}
    assert sharding.decode_tensor_parallel(boxed["params"], shape) == 4  # 4 heads
    with pytest.raises(ValueError, match=r"decode_layout = '8': 8 does not divide the model's "
                                         r"heads, MLP or vocabulary dimension\(s\) "
                                         r"\[4\]; 'auto' picks 4"):
        sharding.decode_tensor_parallel(boxed["params"], shape, "8")
    with pytest.raises(ValueError, match=r"decode_layout = 3: the tensor-parallel degree must "
                                         r"be mesh.model \(1\) times a divisor of mesh.fsdp "
                                         r"\(8\): one of \[1, 2, 4, 8\]"):
        sharding.decode_tensor_parallel(boxed["params"], shape, 3)
    with pytest.raises(ValueError, match=r"decode_layout = 'wide': use 'auto', 'train' or"):
        sharding.decode_tensor_parallel(boxed["params"], shape, "wide")


@pytest.mark.parametrize("backend", sorted(_BACKENDS))
def test_top_p_after_top_k_counts_every_tie_at_the_kth_logit(backend):
    """Top-k 3 keeps 8.0 and forty tied 5.0s, one per chunk, more than the CPU backend's
    candidate chunks hold: top-p must weigh all forty (8.0 alone holds a third of the mass)."""
    logits = np.full((1, VOCAB), -10.0, np.float32)
    logits[0, ::_CHUNK] = 5.0
    logits[0, 5] = 8.0
    kept = np.isfinite(np.asarray(_TOP_P_FILTERS[backend](jnp.asarray(logits), 3,
                                                          jnp.float32(0.5))))
    np.testing.assert_array_equal(kept, _kept_by_sorting(logits, 3, 0.5))
    assert kept.sum() == 41


@pytest.mark.parametrize("backend", sorted(_BACKENDS))
def test_filter_on_a_sharded_batch_equals_unsharded(backend):
    """Both filters (the CPU one's candidate gather and selects) on rows sharded over the
    mesh."""
    mesh = sharding.make_mesh(data=8)
    logits = np.random.default_rng(0).normal(size=(8, VOCAB)).astype(np.float32)
    rows = sharding.logical_sharding(("batch", None), logits.shape, mesh)
    top_p_filter = _TOP_P_FILTERS[backend]
    out = top_p_filter(jax.device_put(logits, rows), 3, jnp.float32(0.9))
    np.testing.assert_array_equal(out, top_p_filter(jnp.asarray(logits), 3, jnp.float32(0.9)))
    assert np.isfinite(np.asarray(out)).sum(axis=1).max() <= 3


def test_bad_arguments(setup):
    cfg, params, tokens, mask, _ = setup
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling.sample(params, cfg, tokens, mask, key, 0)
    with pytest.raises(ValueError, match="top_p"):
        sampling.sample(params, cfg, tokens, mask, key, N, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        sampling.sample(params, cfg, tokens, mask, key, N, top_k=-1)
    with pytest.raises(ValueError, match="top_k"):
        sampling.sample(params, cfg, tokens, mask, key, N, top_k=2.5)
    with pytest.raises(ValueError, match=r"\[B, P\]"):
        sampling.sample(params, cfg, tokens, mask[:, :3], key, N)
    with pytest.raises(ValueError, match="prompt_tokens must hold integer token ids, got float32"):
        sampling.sample(params, cfg, tokens.astype(jnp.float32), mask, key, N)
    for eos in (cfg.vocab_size, [], [1, -1], 1.0, "1"):
        with pytest.raises(ValueError, match="eos_id"):
            sampling.sample(params, cfg, tokens, mask, key, N, eos_id=eos)
    with pytest.raises(ValueError, match=r"row\(s\) \[1, 3\] are not left-padded"):
        sampling.sample(params, cfg, tokens, mask[:, ::-1], key, N)  # right-padded
    with pytest.raises(ValueError, match=r"row\(s\) \[2\] have no prompt token"):
        sampling.sample(params, cfg, tokens, mask.at[2].set(False), key, N)
    with pytest.raises(ValueError, match=r"prompt_tokens\[1, 5\] = -1 is outside the vocab"):
        sampling.sample(params, cfg, tokens.at[1, 5].set(-1), mask, key, N)
    with pytest.raises(ValueError, match=rf"= {cfg.vocab_size} is outside the vocabulary"):
        sampling.sample(params, cfg, tokens.at[0, 0].set(cfg.vocab_size), mask, key, N)
    # Padding may hold any id.
    sampling.sample(params, cfg, tokens.at[1, 0].set(-1), mask, key, N)
    with pytest.raises(ValueError, match="temperature must be concrete"):
        jax.jit(lambda t: sampling.sample(params, cfg, tokens, mask, key, N, temperature=t))(0.9)
    for bad in ("tpu", None, object()):
        with pytest.raises(ValueError, match="backend must be one of"):
            sampling.sample(params, cfg, tokens, mask, key, N, backend=bad)


def test_arguments_users_pass_from_numpy_and_jax(setup):
    """NumPy ints and concrete JAX scalars work as their Python equivalents, Python lists as
    prompts; a top-k of 0 or above the vocabulary and a top-p of 1 keep every token, as in
    transformers."""
    cfg, params, tokens, mask, _ = setup
    key = jax.random.key(4)
    ref = sampling.sample(params, cfg, tokens, mask, key, N, temperature=0.9, eos_id=5)
    compiled = sampling._sample._cache_size()
    out = sampling.sample(params, cfg, tokens.tolist(), np.asarray(mask), key, np.int64(N),
                          temperature=jnp.float32(0.9), top_k=cfg.vocab_size + 1, top_p=1.0,
                          eos_id=np.int32(5))
    assert sampling._sample._cache_size() == compiled  # the same program: no filter at all
    for got, want in zip(out, ref, strict=True):
        np.testing.assert_array_equal(got, want)
    out = sampling.sample(params, cfg, tokens, mask, key, N, top_k=np.int64(0), eos_id=5)
    assert sampling._sample._cache_size() == compiled
    for got, want in zip(out, ref, strict=True):
        np.testing.assert_array_equal(got, want)


def test_draws_follow_the_softmax_and_skip_masked_tokens(sampler_backend):
    """Each backend's token draw, one row per call as under vmap: frequencies within five
    standard errors of the softmax, log-probs equal to its log, -inf never drawn."""
    vocab, draws = 300, 20_000  # 300: not a multiple of the CPU backend's block size
    rng = np.random.default_rng(0)
    logits = rng.normal(size=vocab).astype(np.float32) * 2
    logits[[0, 7, 128, 255, 299]] = -np.inf
    probs = np.exp(logits - logits[np.isfinite(logits)].max())
    probs /= probs.sum()
    backend = sampling.get_backend(sampler_backend)
    noise = backend.noise(jax.random.key(0), draws, 1)
    tokens, logp = jax.jit(jax.vmap(lambda n: backend.draw(n, jnp.asarray(logits)[None])))(noise)
    tokens, logp = np.asarray(tokens)[:, 0], np.asarray(logp)[:, 0]
    assert np.all(np.isfinite(logits[tokens]))
    np.testing.assert_allclose(logp, np.log(probs[tokens]), rtol=1e-4, atol=1e-5)
    freq = np.bincount(tokens, minlength=vocab) / draws
    sigma = np.sqrt(probs * (1 - probs) / draws)
    assert np.all(np.abs(freq - probs) <= 5 * sigma + 1e-4)
