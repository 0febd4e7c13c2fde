"""Grouped matmuls for routed experts: rows sorted by group, each group through its own matrix.

`grouped_matmul(x [N, D], w [G, D, F], group_sizes [G]) -> [N, F]` is `jax.lax.ragged_dot`
with two things it lacks:
- **Batching by folding.** Under `vmap` (the M stacked runs, DESIGN.md §4) a batch of B
  problems runs as one problem of B x G groups over B x N rows, instead of XLA's batched
  ragged dot, which TPU lowering does not implement in JAX 0.10 ("ragged_dot vmap over any
  dim but 0 - NYI"). Dropless routing fills every row, so the folded groups line up.
- **A routed weight gradient on TPU.** The gradient with respect to `w` contracts over the
  ragged rows; XLA's TPU lowering of that is a dense product masked per group (G x the
  routed FLOPs), so on TPU it runs megablox's `tgmm` kernel, which visits only each group's
  rows; on other platforms XLA's `ragged_dot_general`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental.pallas.ops.tpu.megablox.gmm import tgmm as _megablox_tgmm

_ROW_TILE = 128
_CONTRACT_ROWS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[])


def _batched(n: int, in_batched, *args):
    return [a if b else jnp.broadcast_to(a, (n, *a.shape)) for a, b in
            zip(args, in_batched, strict=True)]


@custom_vmap
def _rows_by_group(x, w, group_sizes):
    return jax.lax.ragged_dot(x, w, group_sizes)


@_rows_by_group.def_vmap
def _rows_by_group_folded(n, in_batched, x, w, group_sizes):
    x, w, group_sizes = _batched(n, in_batched, x, w, group_sizes)
    out = _rows_by_group(x.reshape(-1, x.shape[-1]), w.reshape(-1, *w.shape[2:]),
                         group_sizes.reshape(-1))
    return out.reshape(n, -1, out.shape[-1]), True


def _per_group_xla(x, g, group_sizes):
    return jax.lax.ragged_dot_general(x, g, group_sizes, _CONTRACT_ROWS)


def _per_group_tpu(x, g, group_sizes):
    pad = -x.shape[0] % _ROW_TILE
    if pad:  # megablox tiles the rows: zero rows, counted in the last group, add nothing
        x, g = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x, g))
        group_sizes = group_sizes.at[-1].add(pad)
    tile = (_ROW_TILE, min(x.shape[1], 512), min(g.shape[1], 512))
    return _megablox_tgmm(x.T, g, group_sizes, preferred_element_type=x.dtype, tiling=tile)


@custom_vmap
def _per_group(x, g, group_sizes):
    """`[G, D, F]`: for each group, its rows of `x [N, D]` against its rows of `g [N, F]`."""
    return jax.lax.platform_dependent(x, g, group_sizes, tpu=_per_group_tpu,
                                      default=_per_group_xla)


@_per_group.def_vmap
def _per_group_folded(n, in_batched, x, g, group_sizes):
    x, g, group_sizes = _batched(n, in_batched, x, g, group_sizes)
    out = _per_group(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                     group_sizes.reshape(-1))
    return out.reshape(n, -1, *out.shape[1:]), True


@jax.custom_vjp
def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Row i of `x [N, D]` times `w[g] [D, F]` for the group g it falls in (`group_sizes [G]`
    consecutive rows each, summing to N): `[N, F]`."""
    return _rows_by_group(x, w, group_sizes)


def _forward(x, w, group_sizes):
    return _rows_by_group(x, w, group_sizes), (x, w, group_sizes)


def _backward(saved, g):
    x, w, group_sizes = saved
    return (_rows_by_group(g, jnp.swapaxes(w, 1, 2), group_sizes),
            _per_group(x, g, group_sizes), None)


grouped_matmul.defvjp(_forward, _backward)
