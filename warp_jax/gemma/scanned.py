"""The scanned params layout (`GemmaConfig.scan_layers`): the blocks stacked along a leading
axis, as `nn.scan` stores them, and back; a plain pytree transform of the params."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from warp_jax.gemma.config import GemmaConfig


def stack_layers(params: Any, layers: int | GemmaConfig) -> Any:
    """The scanned layout (`GemmaConfig.scan_layers`) of unscanned params: the blocks
    `"layer_0" .. "layer_{L-1}"` become one `"layers"` subtree whose leaves stack them along a
    new leading axis; everything else (a reward model's `"score"` too) is kept.

    `layers` is L, or the model's config: for Gemma 4 (`cfg.scan_period` P), `"layers"`
    holds one subtree per layer of the period, `"layer_j"`, stacking blocks j, j + P, ... of
    the first `cfg.scan_depth`; the blocks after those stay as they are."""
    cfg = layers if isinstance(layers, GemmaConfig) else None
    num_layers = cfg.num_layers if cfg else layers
    missing = [f"layer_{i}" for i in range(num_layers) if f"layer_{i}" not in params]
    if missing or "layers" in params:
        raise ValueError(f"stack_layers: expected unscanned params with blocks layer_0.."
                         f"layer_{num_layers - 1}; missing {missing[:3]}"
                         + (" (already scanned: has 'layers')" if "layers" in params else ""))

    def stack(indices):
        blocks = [params[f"layer_{i}"] for i in indices]
        return jax.tree.map(lambda *xs: _xp(xs).stack(xs), *blocks)

    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    if cfg is None or cfg.scan_period is None:
        out["layers"] = stack(range(num_layers))
        return out
    period, depth = cfg.scan_period, cfg.scan_depth
    out["layers"] = {f"layer_{j}": stack(range(j, depth, period)) for j in range(period)}
    out |= {f"layer_{i}": params[f"layer_{i}"] for i in range(depth, num_layers)}
    return out


def unstack_layers(params: Any) -> Any:
    """The unscanned layout of scanned params (the inverse of `stack_layers`)."""
    if "layers" not in params:
        raise ValueError("unstack_layers: expected scanned params (a 'layers' subtree)")
    out = {k: v for k, v in params.items() if k != "layers"}
    layers = params["layers"]
    periodic = all(re.fullmatch(r"layer_\d+", key) for key in layers)
    stacks = ([layers[f"layer_{j}"] for j in range(len(layers))] if periodic else [layers])
    repeats = jax.tree.leaves(layers)[0].shape[0]
    for r in range(repeats):
        for j, stack in enumerate(stacks):
            out[f"layer_{r * len(stacks) + j}"] = jax.tree.map(lambda x, r=r: x[r], stack)
    return out


def _xp(arrays):
    return np if all(isinstance(x, np.ndarray) for x in arrays) else jnp
