"""The CPU kernels (packed matmul, GeGLU, decode attention) against numpy, and Gemma with them
against Gemma without them."""

import dataclasses
import functools
import os
import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warp_jax import cpu_kernels
from warp_jax.gemma import Gemma, GemmaConfig, init_cache
from warp_jax.gemma.model import packed_matrices

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(),
                                  reason=str(cpu_kernels.unavailable_reason()))


def test_kernel_builds_where_it_can():
    """On an x86-64 CPU with AVX-512F and a C++ compiler (CI's machine), the kernel must build:
    a compile error fails here instead of silently skipping the tests below."""
    can = (platform.machine() == "x86_64" and "avx512f" in cpu_kernels._cpu_flags().split()
           and (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")))
    if not can:
        pytest.skip("no AVX-512F x86-64 CPU or no C++ compiler here")
    assert cpu_kernels.unavailable_reason() is None


@pytest.fixture(scope="module")
def kernels():
    """Jitted pack + matmul, plain and with the matrix given transposed (compiled per shape)."""
    def run(x, w, transposed):
        return cpu_kernels.matmul(x, cpu_kernels.pack(w, transposed=transposed))

    return jax.jit(run, static_argnames="transposed")


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 19), k=st.integers(1, 70), n=st.integers(1, 100),
       transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_matmul_equals_numpy(kernels, m, k, n, transposed, seed):
    """Every row count around the 8-row tiles, column counts around the 32-column panels
    (the padding of the last panel is never written out), either layout of the matrix."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = kernels(x, w.T if transposed else w, transposed=transposed)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@needs_kernel
def test_matmul_uses_both_threads_on_large_shapes(kernels):
    """Shapes above the threading threshold (8 x 768 x 3072, the 100M model's MLP), where the
    panels are split between the calling thread and XLA's pool."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 768)).astype(np.float32)
    w = rng.standard_normal((768, 3072)).astype(np.float32)
    np.testing.assert_allclose(kernels(x, w, transposed=False), x.astype(np.float64) @ w,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(kernels(x, np.ascontiguousarray(w.T), transposed=True),
                               x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_vmap_runs_one_call_per_item():
    """As when WARP's M runs are vmapped on one device: batched weights, batched inputs or
    both."""
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((3, 5, 16)).astype(np.float32)
    ws = rng.standard_normal((3, 16, 40)).astype(np.float32)
    want = np.einsum("bmk,bkn->bmn", xs.astype(np.float64), ws)
    both = jax.jit(jax.vmap(lambda x, w: cpu_kernels.matmul(x, cpu_kernels.pack(w))))
    np.testing.assert_allclose(both(xs, ws), want, rtol=1e-5, atol=1e-5)
    packed = cpu_kernels.pack(jnp.asarray(ws[0]))
    inputs = jax.jit(jax.vmap(lambda x: cpu_kernels.matmul(x, packed)))
    np.testing.assert_allclose(inputs(xs), xs @ ws[0], rtol=1e-5, atol=1e-5)


@needs_kernel
def test_several_matrices_in_one_call():
    """`matmuls`: the threads split the panels of all the matrices (q, k, v of a layer)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 256)).astype(np.float32)
    ws = [rng.standard_normal((256, n)).astype(np.float32) for n in (256, 64, 40)]
    got = jax.jit(lambda x, ws: cpu_kernels.matmuls(x, [cpu_kernels.pack(w) for w in ws]))(x, ws)
    for y, w in zip(got, ws, strict=True):
        np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)


def _gelu_tanh(g):
    """The tanh GELU (transformers' `gelu_pytorch_tanh`), in float64, as `g / (1 + exp(-2y))`:
    `0.5 g (1 + tanh(y))` loses its digits to cancellation far below zero."""
    with np.errstate(over="ignore", invalid="ignore"):
        return g / (1 + np.exp(-2 * np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))


@pytest.fixture(scope="module")
def geglu():
    return jax.jit(lambda x, gate, up: cpu_kernels.geglu(x, cpu_kernels.pack(gate),
                                                         cpu_kernels.pack(up)))


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 19), k=st.integers(1, 70), f=st.integers(1, 100),
       seed=st.integers(0, 2**16))
def test_geglu_equals_numpy(geglu, m, k, f, seed):
    """gelu(x @ gate) * (x @ up) against float64 numpy, around the 8-row tiles and 32-column
    panels; the pre-activations spread over [-6, 6] and beyond, where the GELU bends."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    gate, up = (rng.standard_normal((k, f)).astype(np.float32) * 3 / np.sqrt(k) for _ in "gu")
    got = geglu(x, gate, up)
    x64 = x.astype(np.float64)
    assert got.shape == (m, f) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _gelu_tanh(x64 @ gate) * (x64 @ up), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_geglu_edges_and_threads(geglu):
    """The 100M model's MLP shape (above the threading threshold); saturated pre-activations
    (the GELU is 0 far below zero and the identity far above), NaN and inf passed through."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 768)).astype(np.float32)
    gate, up = (rng.standard_normal((768, 3072)).astype(np.float32) / 20 for _ in "gu")
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(geglu(x, gate, up), _gelu_tanh(x64 @ gate) * (x64 @ up),
                               rtol=1e-4, atol=1e-5)
    g = np.array([[-1e20, -50.0, -10.0, -3.0, 0.0, 3.0, 50.0, 1e20, np.nan, np.inf]], np.float32)
    got = np.asarray(geglu(g.T, np.ones((1, 1), np.float32), np.ones((1, 1), np.float32)))[:, 0]
    with np.errstate(over="ignore"):  # 1e40 is inf in float32, as in the kernel
        want = (_gelu_tanh(g[0].astype(np.float64)) * g[0]).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30)


def _attention_reference(q, k_new, v_new, k_cache, v_cache, mask, slot, softcap):
    """The decode step's attention in float64 numpy: caches written at `slot`, grouped query
    heads, soft-cap, masked softmax (masked scores at the model's finite minimum)."""
    b, n, h = q.shape
    k, s = k_new.shape[1], mask.shape[1]
    keys, values = k_cache.reshape(b, k, h, s).copy(), v_cache.reshape(b, k, s, h).copy()
    keys[..., slot], values[:, :, slot] = k_new, v_new
    scores = np.einsum("bkgh,bkhs->bkgs", q.reshape(b, k, n // k, h).astype(np.float64), keys)
    if softcap:
        scores = np.tanh(scores / softcap) * softcap
    scores = np.where(mask[:, None, None], scores, -2.3819763e38)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bkgs,bksh->bkgh", probs, values).reshape(b, n, h)
    return out, keys.reshape(k_cache.shape), values.reshape(v_cache.shape)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 5), k=st.integers(1, 3), g=st.integers(1, 3), h=st.integers(1, 40),
       s=st.integers(1, 40), data=st.data(), softcap=st.sampled_from([None, 5.0]),
       seed=st.integers(0, 2**16))
def test_decode_attention_equals_numpy(b, k, g, h, s, data, softcap, seed):
    """Any KV-head grouping (caches without the K axis when K = 1, as the model keeps them),
    slot and mask, including a row with no allowed slot (a uniform softmax, as XLA's); the
    caches come back with the new key and value written and nothing else changed."""
    slot = data.draw(st.integers(0, s - 1))
    rng = np.random.default_rng(seed)
    n = k * g
    q = rng.standard_normal((b, n, h)).astype(np.float32)
    k_new, v_new = (rng.standard_normal((b, k, h)).astype(np.float32) for _ in "kv")
    lead = (b,) if k == 1 else (b, k)
    k_cache = rng.standard_normal((*lead, h, s)).astype(np.float32)
    v_cache = rng.standard_normal((*lead, s, h)).astype(np.float32)
    mask = (rng.random((b, s)) < 0.7) & (np.arange(s) <= slot)
    mask[0] = False
    got = jax.jit(functools.partial(cpu_kernels.decode_attention, softcap=softcap))(
        q, k_new, v_new, k_cache, v_cache, mask, slot)
    want = _attention_reference(q, k_new, v_new, k_cache, v_cache, mask, slot, softcap)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for cache, expected in zip(got[1:], want[1:], strict=True):
        assert cache.shape == expected.shape
        np.testing.assert_array_equal(cache, expected)


@needs_kernel
def test_decode_attention_under_vmap():
    """As in WARP's vmapped runs on one device: each item's caches updated in place, each
    item's attention its own."""
    rng = np.random.default_rng(4)
    runs, b, k, g, h, s = 3, 2, 2, 2, 8, 12
    q = rng.standard_normal((runs, b, k * g, h)).astype(np.float32)
    k_new, v_new = (rng.standard_normal((runs, b, k, h)).astype(np.float32) for _ in "kv")
    k_cache = rng.standard_normal((runs, b, k, h, s)).astype(np.float32)
    v_cache = rng.standard_normal((runs, b, k, s, h)).astype(np.float32)
    mask = np.broadcast_to(np.arange(s) <= 5, (runs, b, s))
    got = jax.jit(jax.vmap(cpu_kernels.decode_attention, in_axes=(0, 0, 0, 0, 0, 0, None)))(
        q, k_new, v_new, k_cache, v_cache, mask, 5)
    for run in range(runs):
        want = _attention_reference(q[run], k_new[run], v_new[run], k_cache[run], v_cache[run],
                                    mask[run], 5, None)
        np.testing.assert_allclose(got[0][run], want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[1][run], want[1])
        np.testing.assert_array_equal(got[2][run], want[2])


@needs_kernel
def test_decode_attention_bad_inputs():
    q, kv, mask = jnp.ones((2, 4, 8)), jnp.ones((2, 1, 8)), jnp.ones((2, 16), bool)
    caches = jnp.ones((2, 8, 16)), jnp.ones((2, 16, 8))
    with pytest.raises(ValueError, match="decode_attention expects"):
        cpu_kernels.decode_attention(q, jnp.ones((2, 3, 8)), jnp.ones((2, 3, 8)), *caches,
                                     mask, 0)
    with pytest.raises(ValueError, match="decode_attention expects"):
        cpu_kernels.decode_attention(q, kv, kv, caches[1], caches[0], mask, 0)
    with pytest.raises(ValueError, match="float32 caches"):
        cpu_kernels.decode_attention(q, kv, kv, *(c.astype(jnp.bfloat16) for c in caches),
                                     mask, 0)


@needs_kernel
def test_pack_lays_out_panels_of_32_columns():
    w = np.arange(3 * 40, dtype=np.float32).reshape(3, 40)
    packed = cpu_kernels.pack(jnp.asarray(w))
    assert packed.panels.shape == (2, 3, cpu_kernels.PANEL) and packed.columns == 40
    np.testing.assert_array_equal(packed.panels[0], w[:, :32])
    np.testing.assert_array_equal(packed.panels[1, :, :8], w[:, 32:])
    np.testing.assert_array_equal(packed.panels[1, :, 8:], 0)  # zero padding
    transposed = cpu_kernels.pack(jnp.asarray(w.T), transposed=True)
    np.testing.assert_array_equal(transposed.panels, packed.panels)


@needs_kernel
def test_bad_shapes():
    packed = cpu_kernels.pack(jnp.ones((4, 5)))
    with pytest.raises(ValueError, match=r"matmul expects x \[M, 4\]"):
        cpu_kernels.matmul(jnp.ones((2, 3)), packed)
    with pytest.raises(ValueError, match="pack expects a matrix"):
        cpu_kernels.pack(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="geglu expects x"):
        cpu_kernels.geglu(jnp.ones((2, 4)), packed, cpu_kernels.pack(jnp.ones((4, 6))))
    with pytest.raises(ValueError, match="geglu expects x"):
        cpu_kernels.geglu(jnp.ones((2, 3)), packed, packed)


@needs_kernel
@pytest.mark.parametrize("preset", ["tiny", "tiny_gemma2", "tiny_gemma3"])
def test_gemma_with_packed_matrices_equals_gemma(preset):
    """Every matmul of the decoder (q/k/v/o, the MLP, the vocabulary projection) through the
    kernel: the same logits and cache, with a cache and without, on boxed params, for each
    Gemma generation's features."""
    cfg = dataclasses.replace(GemmaConfig.from_preset(preset), vocab_size=100)
    boxed = Gemma(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    tokens = jax.random.randint(jax.random.key(1), (3, 6), 0, cfg.vocab_size)
    plain = {"params": boxed}
    packed = {"params": boxed, "packed": packed_matrices(boxed)}
    apply = jax.jit(Gemma(cfg).apply)
    np.testing.assert_allclose(apply(packed, tokens)[0], apply(plain, tokens)[0],
                               rtol=1e-4, atol=1e-4)
    cache = init_cache(cfg, 3, 8)
    (got, got_cache), (want, want_cache) = (apply(v, tokens, cache=cache) for v in (packed, plain))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 got_cache, want_cache)
    # A decode step (one token per row, the attention in `decode_attention`) after the prompt.
    step = tokens[:, :1]
    (got, got_cache), (want, want_cache) = (apply(v, step, cache=c)
                                            for v, c in ((packed, got_cache), (plain, want_cache)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 got_cache, want_cache)
