"""The device mesh (axes run, data, fsdp, model) and the one table of logical-axis rules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("run", "data", "fsdp", "model")

# Logical name -> mesh axes it may be split over (in order). A mesh axis that does not divide
# the dimension, or that an earlier dimension of the same array took, is dropped.
RULES: dict[str, tuple[str, ...]] = {
    "run": ("run",),
    "batch": ("data", "fsdp"),
    "vocab": ("model",),
    "embed": ("fsdp",),
    "heads": ("model",),
    "kv_heads": ("model",),
    "head_dim": (),
    "mlp": ("model",),
}


def make_mesh(run: int = 1, data: int = 1, fsdp: int = 1, model: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes `("run", "data", "fsdp", "model")` over `run*data*fsdp*model` devices."""
    shape = (run, data, fsdp, model)
    devices = list(jax.devices() if devices is None else devices)
    size = int(np.prod(shape))
    if any(s < 1 for s in shape) or size > len(devices):
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} needs "
                         f"{size} devices; {len(devices)} available")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4,
                         devices=devices[:size])


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """The mesh `PartitionSpec` of an array with these logical axis names and shape."""
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape, strict=True):
        axes = []
        size = 1
        for axis in RULES.get(name, ()) if name else ():
            n = mesh.shape[axis]
            if axis in used or n == 1 or dim % (size * n):
                continue
            axes.append(axis)
            size *= n
        used.update(axes)
        out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*out)


def logical_sharding(logical: Sequence[str | None], shape: Sequence[int],
                     mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical, shape, mesh))


def param_shardings(boxed_params: Any, mesh: Mesh) -> Any:
    """Shardings for params whose leaves are `nn.Partitioned` boxes (from `jax.eval_shape`
    of `init`), in the structure of the unboxed params."""

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            return logical_sharding(leaf.names, leaf.value.shape, mesh)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
