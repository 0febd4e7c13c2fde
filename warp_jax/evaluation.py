"""Evaluation: rewards and Monte-Carlo KL to the SFT policy, task-vector geometry, fronts."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from warp_jax import losses, merging, rewards, sampling, sharding, trainer
from warp_jax.gemma import GemmaConfig, abstract_params

_CHUNK = 1 << 16  # elements per float64 chunk of the task-vector statistics


def mean_se(values, cluster_size: int = 1) -> tuple[float, float]:
    """The mean of `values` and its standard error, clustered: each run of `cluster_size`
    consecutive values (the samples of one prompt) is one draw where there are several,
    since samples of the same prompt are correlated (about half of a reward's variance is
    between prompts) and an SE over them as independent draws is too small; the samples of
    a single prompt are independent draws. NaN for a single value."""
    values = np.asarray(values, np.float64)
    clusters = values.reshape(-1, cluster_size).mean(1)
    if len(clusters) < 2:
        clusters = values
    se = (clusters.std(ddof=1) / np.sqrt(len(clusters)) if len(clusters) > 1
          else float("nan"))
    return float(values.mean()), float(se)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature",
                                             "num_samples", "eos_id", "backend", "layout"))
def sample_and_kl(params, sft_params, tokens, mask, rng, *, cfg, max_new_tokens, temperature,
                  num_samples, eos_id, backend, layout=None):
    """The evaluation's program: `num_samples` completions of each prompt (sampled in the
    decode `layout`, if any) and their sequence-level log-ratio to `sft_params`
    (`evaluate_policy` adds the rewards); both log-probs from full forward passes on the
    params' own layout."""
    tokens, mask = (jnp.repeat(x, num_samples, axis=0) for x in (tokens, mask))
    out = trainer.decode(params, cfg, tokens, mask, rng, max_new_tokens, layout,
                         temperature=temperature, eos_id=eos_id, backend=backend)
    # Both log-probs from the same full forward pass: the sampler's own differ from it by
    # rounding, and tokens are drawn where that rounding raised their log-probs, so in
    # bfloat16 they would bias the KL upwards (a test model's KL to itself: 0.42 nats over 64
    # tokens).
    logp, logp_sft = (trainer.completion_logprobs(cfg, p, tokens, mask, out.tokens, out.mask,
                                                    temperature)[0]
                      for p in (params, sft_params))
    kl = losses.sequence_logprob(logp - logp_sft, out.mask)
    return tokens, mask, out.tokens, out.mask, kl


def prompt_sharding(mesh: Mesh | None, rows: int) -> NamedSharding | None:
    """The evaluation's `rows` prompts split over `mesh`'s batch axes (`data`, `fsdp`), so
    each device samples its share; None (every device samples all of them, as without a
    mesh) where those axes do not divide the rows."""
    if mesh is None or rows % math.prod(mesh.shape[a] for a in sharding.RULES["batch"]):
        return None
    return sharding.batch_sharding(mesh, 2)


def evaluate_policy(params: Any, sft_params: Any, cfg: GemmaConfig,
                    prompts: tuple[np.ndarray, np.ndarray], rng: jax.Array,
                    reward_fns: Mapping[str, Callable], *, max_new_tokens: int,
                    temperature: float = 0.9, num_samples: int = 1,
                    eos_id: int | Sequence[int] | None = None,
                    backend: str = "auto", mesh: Mesh | None = None,
                    decode_layout: str | int = "auto") -> dict[str, Any]:
    """Mean reward under every reward function and the Monte-Carlo KL(pi || pi_sft), each
    with its standard error clustered by prompt (`mean_se`), over `num_samples` completions
    of each held-out prompt.

    The KL is sequence level: the mean over samples `y ~ pi` of `sum_t log pi(y_t) -
    log pi_sft(y_t)`, both under the sampling temperature. Jittable rewards run on device;
    host rewards (`host = True`) on the decoded arrays. With two rewards or more,
    `rank_correlation` is the Spearman correlation of the first two's scores of the same
    completions (a proxy against its gold reward: it falls as a policy games the proxy).
    `backend` is the sampler's. On a
    `mesh` (that of the params), the prompts are split over its batch axes where they divide
    them (`prompt_sharding`), so each device samples its rows, not all of them, and the
    sampler runs in the decode layout `decode_layout` (`sharding.decode_layout`).
    """
    layout = sharding.decode_layout(abstract_params(cfg), mesh, decode_layout)
    rows = prompt_sharding(mesh, len(prompts[0]))
    if rows is None:
        tokens, mask = map(jnp.asarray, prompts)
    elif jax.process_count() > 1:
        tokens, mask = sharding.to_mesh(tuple(prompts), (rows, rows))
    else:
        tokens, mask = jax.device_put(tuple(prompts), rows)
    with contextlib.nullcontext() if rows is None else sharding.activation_sharding(mesh):
        out = sample_and_kl(
            params, sft_params, tokens, mask, rng, cfg=cfg,
            max_new_tokens=max_new_tokens, temperature=temperature, num_samples=num_samples,
            eos_id=sampling.end_token_ids(eos_id, cfg.vocab_size) or None,  # static: hashable
            backend=sampling.get_backend(backend), layout=layout)
    host_out = sharding.to_host(out)  # all of it, in every process
    result: dict[str, Any] = {}
    result["kl"], result["kl_se"] = mean_se(host_out[4], num_samples)
    scores = {name: rewards.score(fn, out[:4], host_out[:4]) for name, fn in reward_fns.items()}
    for name, values in scores.items():
        result[name], result[f"{name}_se"] = mean_se(values, num_samples)
    if len(scores) >= 2:
        first, second = list(scores.values())[:2]
        result["rank_correlation"] = rank_correlation(first, second)
    result["completions"] = host_out[2:4]
    return result


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation of two score vectors; NaN where either is constant."""
    import scipy.stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(a, b).statistic)


def task_vector_stats(init: Any, policies: Sequence[Any], groups: Any) -> dict[str, dict]:
    """Per group (transformer block): the cosine between the first two runs' task vectors
    and the ratio of their norms, and the same for the full weights (the paper's Fig. 11).

    Accumulated in float64 over chunks of each tensor, so it holds no copy of a tree (in
    every process: they all call it together).
    Leaves whose group label is None are reported under their own path; slice i of a leaf
    labelled `merging.Stacked(name, axis)` under `f"{name}_{block}"` (`Stacked.index`).
    """
    if len(policies) < 2:
        raise ValueError("task-vector statistics need at least two runs")
    labels = jax.tree.leaves(groups, is_leaf=lambda x: x is None)
    sums: dict[str, np.ndarray] = {}
    for (path, base), label, a, b in zip(jax.tree_util.tree_flatten_with_path(init)[0], labels,
                                         jax.tree.leaves(policies[0]),
                                         jax.tree.leaves(policies[1]), strict=True):
        leaves = [sharding.to_host(x) for x in (base, a, b)]
        if isinstance(label, merging.Stacked):  # one group per slice along the stacked axis
            parts = [(f"{label.name}_{label.index(i)}",
                      [np.take(x, i, axis=label.axis) for x in leaves])
                     for i in range(leaves[0].shape[label.axis])]
        else:
            parts = [(label if label is not None else jax.tree_util.keystr(path), leaves)]
        for key, arrays in parts:
            flat = [x.ravel() for x in arrays]
            for start in range(0, flat[0].size, _CHUNK):  # float64 temporaries of one chunk
                window = slice(start, start + _CHUNK)
                x0, xa, xb = (np.asarray(x[window], np.float64) for x in flat)
                task = merging.gram(x0, [xa, xb])  # task vectors, then full weights (base 0)
                full = merging.gram(np.zeros_like(x0), [xa, xb])
                sums[key] = sums.get(key, 0) + np.array(
                    [task[0, 1], task[0, 0], task[1, 1], full[0, 1], full[0, 0], full[1, 1]])

    def cosine(dot, aa, bb):
        return float(dot / np.sqrt(aa * bb)) if aa * bb > 0 else float("nan")

    def ratio(aa, bb):
        return float(np.sqrt(aa / bb)) if bb > 0 else float("nan")

    return {key: {"task_cosine": cosine(dot, aa, bb), "task_norm_ratio": ratio(aa, bb),
                  "weight_cosine": cosine(fdot, faa, fbb), "weight_norm_ratio": ratio(faa, fbb)}
            for key, (dot, aa, bb, fdot, faa, fbb) in sums.items()}


def reward_at_kl(front: Sequence[tuple[float, float]], kl: float) -> float | None:
    """The front's reward at `kl`, between its points sorted by KL interpolated linearly in
    log KL (where both neighbours are at positive KL; linearly in KL from a point at KL <= 0,
    the SFT policy's); None outside the front's KL range.

    Log KL because fronts are concave in KL: a straight line between two points far apart in
    KL under-reads the front between them, and by more for the curve with sparser points.
    """
    points = sorted(front)
    if not points or not points[0][0] <= kl <= points[-1][0]:
        return None
    i = int(np.searchsorted([k for k, _ in points], kl, side="left"))
    if points[i][0] == kl:
        return float(points[i][1])
    (k0, r0), (k1, r1) = points[i - 1], points[i]
    x, x0, x1 = ((np.log(kl), np.log(k0), np.log(k1)) if k0 > 0 else (kl, k0, k1))
    return float(r0 + (r1 - r0) * (x - x0) / (x1 - x0))


def upper_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated `(kl, reward)` points, by increasing KL: each has a higher reward
    than every point of lower or equal KL."""
    out: list[tuple[float, float]] = []
    for kl, reward in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or reward > out[-1][1]:
            out.append((kl, reward))
    return out


def front_at(points: Sequence[tuple[float, float]], kls, extend: bool = False) -> np.ndarray:
    """The upper front of `points` read at each of `kls` (`reward_at_kl`); NaN outside its
    KL range or, with `extend`, its last reward beyond its last point: the best reward
    measured within that KL budget, so that a curve that reaches further is not cut to the
    other's range."""
    front = upper_front(points)
    values = [reward_at_kl(front, k) for k in np.atleast_1d(kls)]
    if extend and front:
        values = [front[-1][1] if v is None and k > front[-1][0] else v
                  for v, k in zip(values, np.atleast_1d(kls), strict=True)]
    return np.array([np.nan if v is None else v for v in values])


def reach(points: Sequence[tuple[float, float]]) -> float:
    """The largest KL among `points` (that of its upper front's last point)."""
    return upper_front(points)[-1][0]


def gap_at(a: Sequence, b: Sequence, kls: Sequence[float], within_both: bool = False
           ) -> float:
    """Front `a` minus front `b` averaged over the absolute KL levels `kls`, each front
    extended flat beyond its last point (`front_at(extend=True)`); with `within_both` only at
    the levels both reach. NaN where no level is left."""
    kls = np.asarray(kls, np.float64)
    if within_both:
        kls = kls[kls <= min(reach(a), reach(b))]
    if not kls.size:
        return float("nan")
    return float(np.mean(front_at(a, kls, extend=True) - front_at(b, kls, extend=True)))


def matched_gap(a: Sequence, b: Sequence, levels: Sequence[float]) -> float:
    """Front `a` minus front `b`, averaged over `levels` x the KL up to which both fronts
    reach (a point beyond a front's last one is dominated by it)."""
    top = min(reach(a), reach(b))
    kls = np.asarray(levels) * top
    return float(np.mean(front_at(a, kls) - front_at(b, kls)))


def above(front: Sequence, points: Sequence) -> float:
    """The front's reward minus each point's, averaged over the points within its KL range
    (NaN if none is)."""
    gaps = [v - p[1] for p, v in zip(points, front_at(front, [p[0] for p in points]),
                                    strict=True) if np.isfinite(v)]
    return float(np.mean(gaps)) if gaps else float("nan")
