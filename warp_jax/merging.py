"""WARP's weight-space merges as pure pytree transforms: EMA, task vectors, LERP, SLERP, LITI.

Every function takes pytrees of `jax.Array` or `numpy.ndarray` leaves (numpy in, numpy out;
anything else goes through `jax.numpy`), returns the structure and leaf dtypes of `init` (or
`ema`), computes in float32 (float64 leaves in float64), works under `jax.jit` and keeps the
input sharding: merges are elementwise, and the only reductions are the per-group dot products
that SLERP needs.

References:
  Ramé et al., "WARP: On the Benefits of Weight Averaged Rewarded Policies", 2024.
  Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

# Below this sin(Omega) the two task vectors are treated as parallel and merged linearly.
LERP_FALLBACK_SIN = 1e-6
_WEIGHT_TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Stacked:
    """Group label for a leaf whose `axis` stacks several blocks (scanned layers).

    Slice `i` of the leaf along `axis` joins the group `(name, start + i * step)`: every leaf
    labelled `Stacked(name, axis, start, step)` must have the same length along its axis.
    (`start` and `step` place a Gemma 4 scan's layer j of each period: blocks j, j + P, ...)
    """

    name: Hashable
    axis: int = 0
    start: int = 0
    step: int = 1

    def index(self, i: int) -> int:
        """The block that slice `i` holds."""
        return self.start + i * self.step


def block_groups(params: PyTree) -> PyTree:
    """The paper's per-block angle groups of Gemma params (`warp_jax.gemma`): the `groups`
    argument of `slerp_tree`.

    Every tensor of a transformer block `"layer_i"` gets the label `"layer_i"` (one angle per
    block); the embedding and the final norm get None (one angle each). The stacked blocks of
    a scanned model (`params["layers"]`, `GemmaConfig.scan_layers`) get `Stacked("layer")`:
    slice i along their leading axis is block i, the same groups as the unscanned layout's
    (Gemma 4: slice r of `layers/layer_j` is block r * P + j).
    A block's experts and per-layer gate and projection are its tensors. Gemma 4's per-layer
    input tables (`per_layer_embedding` `[V, L, P]`, `per_layer_projection` `[D, L, P]`) live
    outside the blocks: their slices for layer i share one angle (`Stacked("per_layer", 1)`).
    """
    def label(name):
        if name in ("per_layer_embedding", "per_layer_projection"):
            return Stacked("per_layer", 1)
        return name if name.startswith("layer_") else None

    out = {name: jax.tree.map(lambda _, name=name: label(name), sub)
           for name, sub in params.items() if name != "layers"}
    if "layers" in params:
        layers = params["layers"]
        if all(re.fullmatch(r"layer_\d+", key) for key in layers):  # Gemma 4's periods
            out["layers"] = {key: jax.tree.map(
                lambda _, j=int(key[6:]): Stacked("layer", 0, j, len(layers)), sub)
                for key, sub in layers.items()}
        else:
            out["layers"] = jax.tree.map(lambda _: Stacked("layer", 0), layers)
    return out


def ema_update(ema: PyTree, params: PyTree, mu: float) -> PyTree:
    """Returns `(1 - mu) * ema + mu * params`, leafwise, in `ema`'s dtypes.

    WARP's stage 1 (Eq. EMA): the anchor of the KL regularisation follows the policy with
    rate `mu` (the paper uses 0.01) after every optimizer step.

    References:
      Ramé et al. 2024, §3.1.
    """
    _check_unit_interval(mu, "mu")
    paths, ema_leaves, treedef = _flatten(ema)
    param_leaves = _flatten_like(treedef, paths, ema_leaves, params, "params")
    xp = _namespace(ema_leaves + param_leaves)
    out = [
        ((1.0 - mu) * _f32(e, xp) + mu * _f32(p, xp)).astype(e.dtype)
        for e, p in zip(ema_leaves, param_leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def task_vector(params: PyTree, init: PyTree) -> PyTree:
    """Returns the task vector `params - init`, leafwise, in `params`' dtypes."""
    paths, param_leaves, treedef = _flatten(params)
    init_leaves = _flatten_like(treedef, paths, param_leaves, init, "init")
    xp = _namespace(param_leaves + init_leaves)
    out = [
        (_f32(p, xp) - _f32(i, xp)).astype(p.dtype)
        for p, i in zip(param_leaves, init_leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def lerp_tree(
    init: PyTree, policies: Sequence[PyTree], weights: Sequence[float] | None = None
) -> PyTree:
    """Linear merge of task vectors: `init + sum_m w_m * (policy_m - init)`.

    Args:
      init: the shared initialisation of the runs.
      policies: M >= 1 pytrees with `init`'s structure and shapes.
      weights: M non-negative weights summing to 1; uniform `1/M` when None.

    References:
      Ramé et al. 2024, §3.2 and Lemma 2.
    """
    _paths, init_leaves, treedef, policy_leaves = _flatten_policies(init, policies)
    w = validate_weights(weights, len(policies))
    xp = _namespace(init_leaves + [x for leaves in policy_leaves for x in leaves])
    out = []
    for i, leaf in enumerate(init_leaves):
        base = _f32(leaf, xp)
        acc = base
        for m, leaves in enumerate(policy_leaves):
            acc = acc + w[m] * (_f32(leaves[i], xp) - base)
        out.append(acc.astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def slerp_tree(
    init: PyTree,
    policies: Sequence[PyTree],
    weights: Sequence[float] | None = None,
    *,
    groups: PyTree | None = None,
) -> PyTree:
    """Spherical merge of the task vectors `delta_m = policy_m - init`.

    For two policies with weights `(1 - lam, lam)` and `Omega` the angle between `delta_1`
    and `delta_2`: `init + sin((1-lam) Omega)/sin(Omega) delta_1 + sin(lam Omega)/sin(Omega)
    delta_2`. For M > 2, the recursion of the paper's Appendix B.3: merge the first m-1
    policies, then slerp the result with the m-th at `lam = w_m / sum_{k<=m} w_k`. Task
    vectors that are (anti-)parallel or zero (`sin(Omega) < 1e-6`) are merged linearly.

    The tree is read twice: once for the Gram matrix of the task vectors of each group (from
    which every angle of the recursion follows), once to write `init + sum_m c_m delta_m`.

    Args:
      init: the shared initialisation of the runs.
      policies: M >= 1 pytrees with `init`'s structure and shapes.
      weights: M non-negative weights summing to 1; uniform `1/M` when None.
      groups: None for one angle per leaf, or a pytree with `init`'s structure whose leaves
        label the angle group of each leaf: leaves with equal hashable labels share one
        angle (the paper's per-transformer-block SLERP), `None` gives a leaf its own angle,
        and `Stacked(name, axis)` gives each slice along `axis` its own group.

    References:
      Ramé et al. 2024, Eq. 2 and Eq. 26; Shoemake 1985.
    """
    paths, init_leaves, treedef, policy_leaves = _flatten_policies(init, policies)
    w = validate_weights(weights, len(policies))
    labels = _group_labels(groups, treedef, paths, init_leaves)
    xp = _namespace(init_leaves + [x for leaves in policy_leaves for x in leaves])

    grams: dict[Hashable, Any] = {}
    for i, leaf in enumerate(init_leaves):
        key, axis = labels[i]
        g = gram(leaf, [leaves[i] for leaves in policy_leaves], axis, xp)
        grams[key] = g if key not in grams else grams[key] + g
    coefficients = {key: _slerp_coefficients(g, w, xp) for key, g in grams.items()}

    out = []
    for i, leaf in enumerate(init_leaves):
        key, axis = labels[i]
        c = coefficients[key]
        base = _f32(leaf, xp)
        acc = base
        for m, leaves in enumerate(policy_leaves):
            acc = acc + _along(c[..., m], axis, leaf.ndim) * (_f32(leaves[i], xp) - base)
        out.append(acc.astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def liti_tree(init: PyTree, merged: PyTree, eta: float) -> PyTree:
    """Linear interpolation towards the initialisation: `(1 - eta) * init + eta * merged`.

    WARP's stage 3: `eta = 0.3` gives the next iteration's init; sweeping `eta` in [0, 1]
    traces the KL-reward Pareto front.

    References:
      Ramé et al. 2024, §3.3.
    """
    _check_unit_interval(eta, "eta")
    paths, init_leaves, treedef = _flatten(init)
    merged_leaves = _flatten_like(treedef, paths, init_leaves, merged, "merged")
    xp = _namespace(init_leaves + merged_leaves)
    out = [
        ((1.0 - eta) * _f32(a, xp) + eta * _f32(b, xp)).astype(a.dtype)
        for a, b in zip(init_leaves, merged_leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def _slerp_coefficients(gram, w, xp):
    """Coefficients `c[..., m]` of the recursive SLERP, from the Gram matrix `[..., M, M]`."""
    num = gram.shape[-1]
    eye = xp.eye(num, dtype=gram.dtype)
    c = xp.broadcast_to(eye[0], gram.shape[:-1])
    total = w[0]
    for m in range(1, num):
        total = total + w[m]
        lam = xp.where(total > 0, w[m] / xp.where(total > 0, total, 1.0), 0.0).astype(gram.dtype)
        gc = xp.einsum("...ij,...j->...i", gram, c)
        alpha, beta = _slerp_pair(
            xp.sum(c * gc, axis=-1), gram[..., m, m], gc[..., m], lam, xp
        )
        c = alpha[..., None] * c + beta[..., None] * xp.broadcast_to(eye[m], c.shape)
    return c


def _slerp_pair(sq_norm_1, sq_norm_2, dot, lam, xp):
    """SLERP weights of two vectors given their squared norms and dot product."""
    denom = xp.sqrt(sq_norm_1 * sq_norm_2)
    nonzero = denom > 0
    cos = xp.clip(dot / xp.where(nonzero, denom, 1.0), -1.0, 1.0)
    omega = xp.arccos(cos)
    sin = xp.sin(omega)
    spherical = nonzero & (sin >= LERP_FALLBACK_SIN)
    safe_sin = xp.where(spherical, sin, 1.0)
    alpha = xp.where(spherical, xp.sin((1.0 - lam) * omega) / safe_sin, 1.0 - lam)
    beta = xp.where(spherical, xp.sin(lam * omega) / safe_sin, lam)
    return alpha, beta


def gram(base, thetas, axis: int | None = None, xp=None):
    """Dot products of the task vectors `theta_m - base` of one leaf: `[M, M]`, or
    `[L, M, M]` per slice along a stacked `axis`; float32 (float64 for float64 leaves), NumPy
    for NumPy leaves. The one owner of task-vector geometry: SLERP's angles and
    `evaluation.task_vector_stats` both come from it."""
    xp = xp or _namespace([base, *thetas])
    reduce_axes = None if axis is None else tuple(a for a in range(base.ndim) if a != axis)
    num = len(thetas)
    entries = [[None] * num for _ in range(num)]
    for a in range(num):
        for b in range(a, num):
            da, db = _f32(thetas[a], xp) - _f32(base, xp), _f32(thetas[b], xp) - _f32(base, xp)
            entries[a][b] = entries[b][a] = xp.sum(da * db, axis=reduce_axes)
    return xp.stack([xp.stack(row, axis=-1) for row in entries], axis=-2)


def _along(values, axis, ndim):
    """Reshapes per-slice `values` `[L]` to broadcast along `axis` of an `ndim` array."""
    if axis is None:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _group_labels(groups, treedef, paths, leaves):
    """Per leaf: `(group key, stacked axis or None)`."""
    if groups is None:
        return [(("leaf", i), None) for i in range(len(leaves))]
    try:
        labels = treedef.flatten_up_to(groups)
    except (ValueError, TypeError) as e:
        raise ValueError(f"groups must have the structure of init: {e}") from None
    out = []
    stacked_lengths: dict[Hashable, tuple[int, str]] = {}
    for i, (label, leaf) in enumerate(zip(labels, leaves, strict=True)):
        path = jax.tree_util.keystr(paths[i])
        if label is None:
            out.append((("leaf", i), None))
        elif isinstance(label, Stacked):
            if not -leaf.ndim <= label.axis < leaf.ndim:
                raise ValueError(
                    f"groups{path}: Stacked axis {label.axis} out of range for shape {leaf.shape}"
                )
            axis = label.axis % leaf.ndim
            length = leaf.shape[axis]
            placed = (label.name, label.start, label.step)
            first = stacked_lengths.setdefault(placed, (length, path))
            if first[0] != length:
                raise ValueError(
                    f"groups{path}: Stacked group {label.name!r} has {length} slices, but "
                    f"{first[1]} has {first[0]}"
                )
            out.append((("stacked", *placed), axis))
        else:
            try:
                hash(label)
            except TypeError:
                raise ValueError(
                    f"groups{path}: label {label!r} is not hashable; use a string, an int, "
                    "None or Stacked(name, axis)"
                ) from None
            out.append((("group", label), None))
    return out


def _flatten(tree):
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [p for p, _ in with_paths]
    leaves = [_as_array(x) for _, x in with_paths]
    return paths, leaves, treedef


def _flatten_like(treedef, paths, ref_leaves, tree, name):
    """Flattens `tree`, checking it has the reference structure and shapes."""
    other_paths, leaves, other_def = _flatten(tree)
    if other_def != treedef:
        ref = {jax.tree_util.keystr(p) for p in paths}
        got = {jax.tree_util.keystr(p) for p in other_paths}
        missing, extra = sorted(ref - got), sorted(got - ref)
        detail = []
        if missing:
            detail.append(f"missing leaves {missing[:5]}")
        if extra:
            detail.append(f"unexpected leaves {extra[:5]}")
        if not detail:
            detail.append(f"{other_def} vs {treedef}")
        raise ValueError(f"{name} does not have the tree structure of the reference: "
                         + "; ".join(detail))
    for path, ref, leaf in zip(paths, ref_leaves, leaves, strict=True):
        if ref.shape != leaf.shape:
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)}: shape {leaf.shape} does not match the "
                f"reference shape {ref.shape}"
            )
    return leaves


def _flatten_policies(init, policies):
    if isinstance(policies, dict) or not isinstance(policies, Sequence):
        raise TypeError(
            f"policies must be a sequence (list or tuple) of pytrees, got {type(policies).__name__}"
        )
    if len(policies) == 0:
        raise ValueError("policies is empty: merging needs M >= 1 policies (got M = 0)")
    paths, init_leaves, treedef = _flatten(init)
    policy_leaves = [
        _flatten_like(treedef, paths, init_leaves, p, f"policies[{m}]")
        for m, p in enumerate(policies)
    ]
    return paths, init_leaves, treedef, policy_leaves


def validate_weights(weights, num):
    """The M merge weights as floats (uniform when None); raises `ValueError` if invalid."""
    if weights is None:
        return [1.0 / num] * num
    if len(weights) != num:
        raise ValueError(f"weights has {len(weights)} entries for M = {num} policies")
    if any(isinstance(x, jax.core.Tracer) for x in weights) or isinstance(weights, jax.core.Tracer):
        return [weights[m] for m in range(num)]
    values = [float(x) for x in weights]
    for m, x in enumerate(values):
        if not x >= 0 or math.isinf(x):
            raise ValueError(f"weights[{m}] = {x}: weights must be finite and non-negative")
    if abs(sum(values) - 1.0) > _WEIGHT_TOL:
        raise ValueError(f"weights {values} sum to {sum(values)}, not 1")
    return values


def _check_unit_interval(value, name):
    if isinstance(value, jax.core.Tracer):
        return
    x = float(value)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _as_array(x):
    if isinstance(x, (np.ndarray, jax.Array)):
        return x
    if isinstance(x, (np.generic, float, int)):
        return np.asarray(x)
    raise TypeError(f"leaves must be jax or numpy arrays, got {type(x).__name__}")


def _namespace(leaves):
    return np if all(isinstance(x, np.ndarray) for x in leaves) else jnp


def _f32(x, xp):
    """`x` in float32, or in float64 if it is float64 (and JAX's x64 mode allows it)."""
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    if xp is np:
        return x.astype(dtype, copy=False)
    return jnp.asarray(x, jax.dtypes.canonicalize_dtype(dtype))
