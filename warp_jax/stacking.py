"""M independent runs as one program: every leaf of their state, prompts and keys with a
leading `[M]` axis, sharded over the mesh's `run` axis (WARP's parallel runs, DESIGN.md §4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from warp_jax import sharding


def stack_runs(fn: Callable, mesh: Mesh | None, num_runs: int | None, in_axes) -> Callable:
    """`fn` of one run over M runs stacked along a leading axis (`jax.vmap`; `in_axes` as
    there), whose activations the model's constraints split over the mesh's `run` axis where
    it divides M; `fn` itself without stacked runs (`num_runs` None)."""
    if not num_runs:
        return fn
    run = sharding.run_axis(mesh, num_runs)[0] if mesh is not None else None
    return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=run)


def broadcast(params: Any, num_runs: int) -> Any:
    """One run's `params` as `num_runs` stacked copies (inside a jitted init, so that the
    copies only ever exist sharded over `run`: an eager stack would first hold all M of each
    device's shard on that device)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_runs, *x.shape)), params)


def param_shapes(boxed) -> dict[str, tuple[int, ...]]:
    """One run's param shapes, by leaf path, from the abstract boxed params."""
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return {jax.tree_util.keystr(path): tuple(nn.unbox(x).shape) for path, x in leaves}


def is_stacked(params, shapes: dict[str, tuple[int, ...]], num_runs: int | None) -> bool:
    """Whether `params` has a leading `[num_runs]` axis; raises `ValueError` if it is neither
    one run's params nor `num_runs` stacked ones."""
    got = {jax.tree_util.keystr(path): np.shape(x)
           for path, x in jax.tree_util.tree_leaves_with_path(params)}
    missing, extra = sorted(shapes.keys() - got.keys()), sorted(got.keys() - shapes.keys())
    if missing or extra:
        raise ValueError(f"params do not match the model config: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    kinds = set()
    for path, shape in got.items():
        if shape == shapes[path]:
            kinds.add("one")
        elif num_runs and shape == (num_runs, *shapes[path]):
            kinds.add("stacked")
        else:
            stacked = f" or {(num_runs, *shapes[path])} for {num_runs} stacked runs" \
                if num_runs else ""
            raise ValueError(f"params{path}: shape {shape}, expected {shapes[path]}{stacked}")
    if len(kinds) > 1:
        raise ValueError(f"params mix one run's shapes and {num_runs} stacked runs' shapes")
    return kinds == {"stacked"}
