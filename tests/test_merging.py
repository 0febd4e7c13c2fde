"""Merges against the paper's formulas written independently in float64 numpy."""

import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from warp_jax import merging


def _ref_slerp2(init, t1, t2, lam):
    """Eq. 2 of the paper on flat float64 vectors."""
    d1, d2 = t1 - init, t2 - init
    cos = np.dot(d1, d2) / (np.linalg.norm(d1) * np.linalg.norm(d2))
    omega = np.arccos(np.clip(cos, -1, 1))
    s = np.sin(omega)
    return init + np.sin((1 - lam) * omega) / s * d1 + np.sin(lam * omega) / s * d2


def _ref_slerp(init, thetas, weights):
    """Appendix B.3, Eq. 26: merge the first m-1 in weight space, then slerp with the m-th."""
    merged, total = thetas[0], weights[0]
    for theta, w in zip(thetas[1:], weights[1:], strict=True):
        total += w
        merged = _ref_slerp2(init, merged, theta, w / total)
    return merged


def _tree(rng, scale=1.0):
    return {
        "embed": rng.normal(size=(6, 4)).astype(np.float32) * scale,
        "block": {"w": rng.normal(size=(4, 3)).astype(np.float32) * scale,
                  "b": rng.normal(size=(3,)).astype(np.float32) * scale},
    }


def _f64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


@pytest.fixture(scope="module")
def trees():
    rng = np.random.default_rng(0)
    init = _tree(rng)
    policies = [jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32),
                             init) for _ in range(4)]
    return init, policies


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_slerp_two_policies_per_tensor_matches_eq2(trees, lam):
    init, policies = trees
    out = merging.slerp_tree(jax.tree.map(jnp.asarray, init),
                             [jax.tree.map(jnp.asarray, p) for p in policies[:2]],
                             weights=(1 - lam, lam))
    i64, p64 = _f64(init), [_f64(p) for p in policies[:2]]
    for path in (("embed",), ("block", "w"), ("block", "b")):
        def get(t, path=path):
            return t[path[0]] if len(path) == 1 else t[path[0]][path[1]]
        want = _ref_slerp2(get(i64).ravel(), get(p64[0]).ravel(), get(p64[1]).ravel(), lam)
        np.testing.assert_allclose(np.asarray(get(out)).ravel(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", [None, (0.2, 0.3, 0.5), (0.1, 0.2, 0.3, 0.4), (0.5, 0, 0.5)])
def test_slerp_recursion_matches_appendix_b3(trees, weights):
    init, policies = trees
    num = 3 if weights is None or len(weights) == 3 else 4
    policies = policies[:num]
    w = weights or [1.0 / num] * num
    out = merging.slerp_tree(init, policies, weights)
    for key in ("embed",):
        want = _ref_slerp(init[key].astype(np.float64).ravel(),
                          [p[key].astype(np.float64).ravel() for p in policies], list(w))
        np.testing.assert_allclose(out[key].ravel(), want, rtol=1e-5, atol=1e-6)


def test_slerp_grouped_angle_uses_the_concatenated_block(trees):
    init, policies = trees
    groups = {"embed": None, "block": {"w": "block0", "b": "block0"}}
    out = merging.slerp_tree(init, policies[:3], groups=groups)

    def flat(t):
        return np.concatenate([t["block"]["w"].ravel(), t["block"]["b"].ravel()]).astype(float)

    want = _ref_slerp(flat(init), [flat(p) for p in policies[:3]], [1 / 3] * 3)
    np.testing.assert_allclose(flat(out), want, rtol=1e-5, atol=1e-6)
    want_embed = _ref_slerp(init["embed"].ravel().astype(float),
                            [p["embed"].ravel().astype(float) for p in policies[:3]], [1 / 3] * 3)
    np.testing.assert_allclose(out["embed"].ravel(), want_embed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1])
def test_slerp_stacked_layers_get_one_angle_per_slice(axis):
    rng = np.random.default_rng(1)
    layers = 3
    shape_a = (layers, 4, 2) if axis == 0 else (4, layers, 2)
    init = {"a": rng.normal(size=shape_a), "b": rng.normal(size=(layers, 5))}
    init = jax.tree.map(lambda x: x.astype(np.float32), init)
    policies = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), init)
                for _ in range(2)]
    groups = {"a": merging.Stacked("layers", axis), "b": merging.Stacked("layers", 0)}
    out = merging.slerp_tree(jax.tree.map(jnp.asarray, init),
                             [jax.tree.map(jnp.asarray, p) for p in policies], groups=groups)

    def layer(t, i):
        a = np.take(np.asarray(t["a"], np.float64), i, axis=axis)
        return np.concatenate([a.ravel(), np.asarray(t["b"], np.float64)[i]])

    for i in range(layers):
        want = _ref_slerp2(layer(init, i), layer(policies[0], i), layer(policies[1], i), 0.5)
        np.testing.assert_allclose(layer(out, i), want, rtol=1e-5, atol=1e-6)


def test_lerp_and_liti_and_ema_match_their_formulas(trees):
    init, policies = trees
    w = (0.2, 0.3, 0.5)
    out = merging.lerp_tree(init, policies[:3], w)
    want = init["embed"] + sum(wm * (p["embed"] - init["embed"]) for wm, p in zip(w, policies,
                                                                                  strict=False))
    np.testing.assert_allclose(out["embed"], want, rtol=1e-6)
    liti = merging.liti_tree(init, policies[0], 0.3)
    np.testing.assert_allclose(liti["embed"], 0.7 * init["embed"] + 0.3 * policies[0]["embed"],
                               rtol=1e-6)
    ema = merging.ema_update(init, policies[0], 0.01)
    np.testing.assert_allclose(ema["embed"], 0.99 * init["embed"] + 0.01 * policies[0]["embed"],
                               rtol=1e-6)
    tv = merging.task_vector(policies[0], init)
    np.testing.assert_allclose(tv["embed"], policies[0]["embed"] - init["embed"], rtol=1e-6)


def test_endpoints(trees):
    init, policies = trees
    p0, p1 = policies[:2]

    def close(a, b):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)

    close(merging.slerp_tree(init, [p0, p1], (1.0, 0.0)), p0)
    close(merging.slerp_tree(init, [p0, p1], (0.0, 1.0)), p1)
    close(merging.slerp_tree(init, [p0]), p0)
    close(merging.lerp_tree(init, [p0, p1], (0.0, 1.0)), p1)
    close(merging.liti_tree(init, p0, 0.0), init)
    close(merging.liti_tree(init, p0, 1.0), p0)
    close(merging.ema_update(init, p0, 0.0), init)
    close(merging.ema_update(init, p0, 1.0), p0)


_vectors = hnp.arrays(np.float64, st.integers(3, 12),
                      elements=st.floats(-10, 10, allow_nan=False, allow_subnormal=False))


@settings(max_examples=60, deadline=None)
@given(a=_vectors, b=_vectors, lam=st.floats(0, 1), norm=st.floats(0.1, 10))
def test_slerp_preserves_equal_norms_lemma1(a, b, lam, norm):
    n = min(a.size, b.size)
    a, b = a[:n], b[:n]
    if np.linalg.norm(a) < 1e-3 or np.linalg.norm(b) < 1e-3:
        return
    d1 = a / np.linalg.norm(a) * norm
    d2 = b / np.linalg.norm(b) * norm
    cos = np.dot(d1, d2) / norm**2
    if cos < -0.99:  # antiparallel vectors fall back to LERP, which does not keep the norm
        return
    init = np.zeros(n, np.float32)
    out = merging.slerp_tree(init, [d1.astype(np.float32), d2.astype(np.float32)],
                             (1 - lam, lam))
    np.testing.assert_allclose(np.linalg.norm(out), norm, rtol=2e-3)


@settings(max_examples=60, deadline=None)
@given(a=_vectors, b=_vectors, lam=st.floats(0, 1))
def test_lerp_norm_formula_lemma2(a, b, lam):
    n = min(a.size, b.size)
    a, b = a[:n], b[:n]
    if np.linalg.norm(a) < 1e-3 or np.linalg.norm(b) < 1e-3:
        return
    d1, d2 = a / np.linalg.norm(a), b / np.linalg.norm(b)
    cos = np.dot(d1, d2)
    init = np.ones(n, np.float32)
    out = merging.lerp_tree(init, [(init + d1).astype(np.float32), (init + d2).astype(np.float32)],
                            (1 - lam, lam))
    want = np.sqrt(max(0.0, 1 - 2 * (1 - cos) * (lam - lam**2)))
    np.testing.assert_allclose(np.linalg.norm(out - init), want, atol=1e-4)


def test_parallel_and_zero_task_vectors_fall_back_to_lerp_without_nan():
    init = jnp.zeros((8,), jnp.float32)
    d = jnp.arange(8, dtype=jnp.float32)
    for p0, p1 in [(d, 2 * d), (d, d), (init, d), (init, init), (d, -d)]:
        out = merging.slerp_tree(init, [p0, p1], (0.7, 0.3))
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, 0.7 * p0 + 0.3 * p1, rtol=1e-5, atol=1e-6)


def test_dtype_structure_and_namespace_preserved(trees):
    init, policies = trees
    def bf(t):
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), t)
    out = merging.slerp_tree(bf(init), [bf(p) for p in policies[:2]])
    assert jax.tree.structure(out) == jax.tree.structure(init)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    ref = merging.slerp_tree(init, policies[:2])
    np.testing.assert_allclose(np.asarray(out["embed"], np.float32), ref["embed"], atol=3e-2)
    for fn in (lambda: merging.slerp_tree(init, policies[:2]),
               lambda: merging.lerp_tree(init, policies[:2]),
               lambda: merging.liti_tree(init, policies[0], 0.3),
               lambda: merging.ema_update(init, policies[0], 0.1)):
        assert all(isinstance(x, np.ndarray) and x.dtype == np.float32
                   for x in jax.tree.leaves(fn()))


def test_float64_numpy_leaves_are_merged_in_float64(trees):
    init, policies = trees
    init, policies = _f64(init), [_f64(p) for p in policies[:3]]
    w = (0.5, 0.3, 0.2)
    out = merging.slerp_tree(init, policies, w)
    want = _ref_slerp(init["embed"].ravel(), [p["embed"].ravel() for p in policies], list(w))
    assert out["embed"].dtype == np.float64
    np.testing.assert_allclose(out["embed"].ravel(), want, rtol=1e-12)
    x0, x1 = init["embed"], policies[0]["embed"]
    for got, want in (
        (merging.liti_tree(init, policies[0], 0.3), 0.7 * x0 + 0.3 * x1),
        (merging.ema_update(init, policies[0], 0.01), 0.99 * x0 + 0.01 * x1),
        (merging.lerp_tree(init, policies, w),
         x0 + sum(wm * (p["embed"] - x0) for wm, p in zip(w, policies, strict=True))),
    ):
        assert got["embed"].dtype == np.float64
        np.testing.assert_allclose(got["embed"], want, rtol=1e-12)


def test_jit_matches_eager(trees):
    init, policies = trees
    def j(t):
        return jax.tree.map(jnp.asarray, t)
    groups = {"embed": None, "block": {"w": "b", "b": "b"}}
    eager = merging.slerp_tree(j(init), [j(p) for p in policies[:3]], groups=groups)
    jitted = jax.jit(lambda i, ps: merging.slerp_tree(i, ps, groups=groups))(
        j(init), [j(p) for p in policies[:3]])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 eager, jitted)
    traced_eta = jax.jit(merging.liti_tree)(j(init), j(policies[0]), 0.3)
    np.testing.assert_allclose(traced_eta["embed"], merging.liti_tree(init, policies[0], 0.3)[
        "embed"], rtol=1e-6)


def test_sharded_in_sharded_out():
    mesh = jax.make_mesh((2, 4), ("fsdp", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharding = NamedSharding(mesh, P("fsdp", "model"))
    rng = np.random.default_rng(3)
    def make():
        return jax.device_put(rng.normal(size=(16, 32)).astype(np.float32), sharding)
    init, p0, p1 = {"w": make()}, {"w": make()}, {"w": make()}
    ref = merging.slerp_tree(jax.device_get(init), [jax.device_get(p0), jax.device_get(p1)])
    fns = {
        "slerp": lambda i, a, b: merging.slerp_tree(i, [a, b]),
        "lerp": lambda i, a, b: merging.lerp_tree(i, [a, b]),
        "liti": lambda i, a, b: merging.liti_tree(i, a, 0.3),
        "ema": lambda i, a, b: merging.ema_update(i, a, 0.01),
    }
    for name, fn in fns.items():
        for out in (fn(init, p0, p1), jax.jit(fn)(init, p0, p1)):
            assert out["w"].sharding.is_equivalent_to(sharding, 2), name
    np.testing.assert_allclose(jax.jit(fns["slerp"])(init, p0, p1)["w"], ref["w"], rtol=1e-5)


def test_bad_inputs_raise_clear_errors(trees):
    init, policies = trees
    p0, p1 = policies[:2]
    bad_shape = {**p1, "block": {**p1["block"], "w": np.zeros((5, 3), np.float32)}}
    with pytest.raises(ValueError, match=re.escape("policies[1]['block']['w']: shape (5, 3)")):
        merging.slerp_tree(init, [p0, bad_shape])
    with pytest.raises(ValueError, match=r"missing leaves \[\"\['embed'\]\"\]"):
        merging.lerp_tree(init, [p0, {"block": p1["block"]}])
    with pytest.raises(ValueError, match="M = 0"):
        merging.slerp_tree(init, [])
    with pytest.raises(ValueError, match=re.escape("weights[1] = -0.5")):
        merging.slerp_tree(init, [p0, p1], (1.5, -0.5))
    with pytest.raises(ValueError, match=re.escape("sum to 0.9")):
        merging.lerp_tree(init, [p0, p1], (0.5, 0.4))
    with pytest.raises(ValueError, match="3 entries for M = 2"):
        merging.slerp_tree(init, [p0, p1], (0.2, 0.3, 0.5))
    with pytest.raises(ValueError, match=re.escape("eta must be in [0, 1], got 1.5")):
        merging.liti_tree(init, p0, 1.5)
    with pytest.raises(ValueError, match=re.escape("mu must be in [0, 1], got -0.1")):
        merging.ema_update(init, p0, -0.1)
    with pytest.raises(ValueError, match="merged"):
        merging.liti_tree(init, {"embed": p0["embed"]}, 0.5)
    with pytest.raises(ValueError, match="groups must have the structure"):
        merging.slerp_tree(init, [p0, p1], groups={"embed": None})
    stacked_msg = "groups['block']['w']: Stacked group 'L' has 4 slices"
    with pytest.raises(ValueError, match=re.escape(stacked_msg)):
        merging.slerp_tree(init, [p0, p1], groups={"embed": None, "block": {
            "w": merging.Stacked("L", 0), "b": merging.Stacked("L", 0)}})
    with pytest.raises(TypeError, match="sequence"):
        merging.slerp_tree(init, p0)
