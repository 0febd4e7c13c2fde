"""Gemma 4's routed experts against the dense formulation (every expert on every token,
weighted by the router), the grouped matmul against each group through its own matrix, and
the TPU compiler's count of what the routed experts compute and move. Transformers' logits, cached
decode and greedy generation for a Gemma 4 with experts are in test_gemma.py; the sharded and
stacked train step in test_reinforce.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from warp_jax import hlo, plan, sharding
from warp_jax.gemma import GemmaConfig
from warp_jax.gemma.grouped import grouped_matmul
from warp_jax.gemma.moe import Experts, Router


def _each_group(x, w, sizes):
    """Row by row: each row times the matrix of the group it falls in."""
    group = np.repeat(np.arange(len(sizes)), sizes)
    return jnp.einsum("nd,ndf->nf", x, w[group])


@settings(max_examples=12, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=3, max_size=3), min_size=2, max_size=2),
       st.booleans())
def test_grouped_matmul_runs_each_group_through_its_matrix(sizes, stacked_weights):
    """Forward and both gradients, for one problem and for two under `vmap` (the weights
    stacked or shared), empty groups included, against the row-by-row product."""
    rows = max(sum(s) for s in sizes)
    sizes = np.array([[*s[:-1], s[-1] + rows - sum(s)] for s in sizes], np.int32)  # cover
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, rows, 4))
    w = jax.random.normal(keys[1], (2, 3, 4, 5))
    g = jax.random.normal(keys[2], (2, rows, 5))

    def loss(fn):
        return lambda x, w, s, g: jnp.sum(fn(x, w, s) * g)

    # One problem: the summed terms are 4 products of unit normals, float32 rounding.
    for r in range(2):
        got = jax.value_and_grad(loss(grouped_matmul), (0, 1))(x[r], w[r], sizes[r], g[r])
        want = jax.value_and_grad(loss(_each_group), (0, 1))(x[r], w[r], sizes[r], g[r])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                     got, want)
    w_in = w if stacked_weights else w[0]
    axes = (0, 0 if stacked_weights else None, 0, 0)
    got = jax.grad(lambda *a: jnp.sum(jax.vmap(loss(grouped_matmul), axes)(*a)), (0, 1))(
        x, w_in, sizes, g)
    want = jax.grad(lambda *a: sum(loss(_each_group)(
        a[0][r], a[1][r] if stacked_weights else a[1], sizes[r], g[r]) for r in range(2)),
        (0, 1))(x, w_in, sizes, g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


CFG = GemmaConfig.from_preset("tiny_gemma4_moe")


def _dense(params, x):
    """Every expert on every token, weighted by the router (zero off each token's top k)."""
    w, i = Router(CFG).apply({"params": params["router"]}, x)
    weights = jnp.einsum("BTKE,BTK->BTE", jax.nn.one_hot(i, CFG.num_experts), w)
    gate_up, down = params["experts"]["gate_up"], params["experts"]["down"]
    h = jnp.einsum("BTD,EDCI->BTECI", x, gate_up)
    hidden = jax.nn.gelu(h[..., 0, :], approximate=True) * h[..., 1, :]
    return jnp.einsum("BTEI,BTE,EID->BTD", hidden, weights, down)


def _routed(params, x):
    return Experts(CFG).apply({"params": params["experts"]}, x,
                              *Router(CFG).apply({"params": params["router"]}, x))


def test_routed_experts_equal_the_dense_formulation_and_its_gradients():
    """Outputs and the gradients with respect to the input, the router and the experts."""
    x = jax.random.normal(jax.random.key(1), (3, 5, CFG.embed_dim))
    router = nn.unbox(Router(CFG).init(jax.random.key(2), x))["params"]
    routes = Router(CFG).apply({"params": router}, x)
    params = {"router": router,
              "experts": nn.unbox(Experts(CFG).init(jax.random.key(3), x, *routes))["params"]}
    probe = jax.random.normal(jax.random.key(4), x.shape)
    got = jax.value_and_grad(lambda p, x: jnp.sum(_routed(p, x) * probe), (0, 1))(params, x)
    want = jax.value_and_grad(lambda p, x: jnp.sum(_dense(p, x) * probe), (0, 1))(params, x)
    # float32 sums of embed_dim (64) and expert width (32) unit-scale products
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5), got, want)
    assert float(jnp.max(jnp.abs(got[1][0]["router"]["proj"]))) > 0


def _tpu_flops(fn, *shapes):
    device = plan.topology("v5e-8").devices[:1]
    replicated = NamedSharding(Mesh(np.array(device), ("x",)), PartitionSpec())
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated) for s in shapes]
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("backward", [False, True])
def test_tpu_compiler_counts_the_routed_flops_not_every_experts(backward):
    """Compiled by libtpu for a v5e chip, a layer of 64 experts with top 2 costs within 1.5x
    of one with 2 experts (forward, and forward and backward); the dense formulation, the
    failure this guards against, costs 32x in the experts' matmuls."""
    def layer(experts, dense=False):
        cfg = GemmaConfig.from_preset("tiny_gemma4_moe", embed_dim=256, num_experts=experts,
                                      experts_per_token=2, expert_mlp_dim=512,
                                      dtype="bfloat16")
        x = jax.ShapeDtypeStruct((4, 128, cfg.embed_dim), jnp.bfloat16)
        p = jax.eval_shape(lambda: nn.unbox(Experts(cfg).init(
            jax.random.key(0), jnp.zeros(x.shape, x.dtype), jnp.ones((4, 128, 2)),
            jnp.zeros((4, 128, 2), jnp.int32)))["params"])
        w = jax.ShapeDtypeStruct((4, 128, 2), jnp.float32)
        i = jax.ShapeDtypeStruct((4, 128, 2), jnp.int32)

        def forward(p, x, w, i):
            if dense:
                weights = jnp.einsum("BTKE,BTK->BTE", jax.nn.one_hot(i, experts, dtype=x.dtype),
                                     w.astype(x.dtype))
                h = jnp.einsum("BTD,EDCI->BTECI", x, p["gate_up"])
                hidden = jax.nn.gelu(h[..., 0, :]) * h[..., 1, :]
                return jnp.einsum("BTEI,BTE,EID->BTD", hidden, weights, p["down"])
            return Experts(cfg).apply({"params": p}, x, w, i)

        fn = jax.grad(lambda *a: jnp.sum(forward(*a).astype(jnp.float32)), (0, 1)) \
            if backward else forward
        return _tpu_flops(lambda gu, dn, x, w, i: fn({"gate_up": gu, "down": dn}, x, w, i),
                          p["gate_up"], p["down"], x, w, i)

    two, many = layer(2), layer(64)
    assert many <= 1.5 * two, (two, many)
    assert layer(64, dense=True) > 16 * two


def test_tpu_compiler_reduce_scatters_the_experts_gradient_over_fsdp():
    """Compiled by libtpu for 8 v5e chips that split the rows and the weights' `embed` axis
    (FSDP), the experts' weight gradient leaves each chip as a reduce-scatter of its bytes
    (each chip keeps 1/8), not an all-reduce that gives every chip the whole gradient; the
    inputs' gradient, summed over the k experts, is the only other traffic."""
    cfg = GemmaConfig.from_preset("tiny_gemma4_moe", embed_dim=256, num_experts=8,
                                  experts_per_token=2, expert_mlp_dim=512, dtype="bfloat16",
                                  param_dtype="bfloat16")
    mesh = sharding.make_mesh(fsdp=8, devices=plan.topology("v5e-8").devices)
    rows, k = (8, 128), cfg.experts_per_token
    x = jnp.zeros((*rows, cfg.embed_dim), jnp.bfloat16)
    boxed = jax.eval_shape(lambda: Experts(cfg).init(
        jax.random.key(0), x, jnp.ones((*rows, k)), jnp.zeros((*rows, k), jnp.int32)))["params"]
    shardings = sharding.param_shardings(boxed, mesh)
    params = jax.tree.map(lambda b, sh: jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=sh),
                          nn.unbox(boxed), shardings)
    by_row = sharding.batch_sharding(mesh, 3)
    inputs = [jax.ShapeDtypeStruct((*rows, n), dtype, sharding=by_row) for n, dtype in
              ((cfg.embed_dim, jnp.bfloat16), (k, jnp.float32), (k, jnp.int32))]

    def loss(p, x, w, i):
        return jnp.sum(Experts(cfg).apply({"params": p}, x, w, i).astype(jnp.float32))

    with sharding.activation_sharding(mesh):
        text = jax.jit(jax.grad(loss), out_shardings=shardings).lower(
            params, *inputs).compile().as_text()
    sent = hlo.traffic(text).bytes
    weights = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
    assert sent["reduce-scatter"] == pytest.approx(weights * 7 / 8, rel=0.05), sent
    assert sent["all-reduce"] < weights / 8, sent
