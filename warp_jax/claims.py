"""The reproduction study's six claims: the effects each is judged by, measured once per
seed from the study's records (`study.Study`), and the verdicts drawn from them
(`verdicts`).

Every rule here is fixed before the run, and `RULES` states it in the report before any
number. A *front* is the upper envelope of a curve's evaluations with the SFT policy at
KL 0, read in log KL between measured points (`evaluation.front_at`); fronts are compared at
the absolute KL levels `study.kl_levels`, each extended flat beyond its last point (the best
reward measured within that KL budget: a curve that reaches further is not cut to the
other's range), except where a rule says "within both" (only the levels both reach).
"""

from __future__ import annotations

import numpy as np

from warp_jax import evaluation, verdicts
from warp_jax.verdicts import Effect

REWARDS = {"proxy": "proxy_reward", "gold": "oracle_reward"}
CLAIMS = {
    1: "The EMA anchor gives a better KL-reward front than the SFT anchor, at any beta",
    2: "SLERP of two runs raises the reward over theirs and slightly raises the KL; LERP "
       "lowers the KL",
    3: "Task vectors of independent runs are close to orthogonal; full weights stay collinear",
    4: "The LITI front lies above the runs' own trajectories and above baselines given the "
       "same run-steps; KL falls proportionally faster than reward as eta decreases",
    5: "Merging more runs (M = 1, 2, 4) improves the front, more than the same run-steps in "
       "one run",
    6: "Iterating improves the front, then saturates",
}
RULES = {
    1: "per SFT-anchor beta in study.sft_betas: each EMA-anchored iteration-1 run's front "
       "minus the SFT-anchored run's (same steps, same seed), within both, averaged over the "
       "runs. Supported if supported at every beta. Also reported (not in the verdict): the "
       "EMA weights' front minus their live policy's, within both (the paper's Fig. 14)",
    2: "runs 0 and 1 of iteration 1, averaged over study.lambdas: SLERP's reward minus the "
       "runs' rewards interpolated at lambda; log SLERP KL minus log of the runs' KL "
       "interpolated; log of the runs' KL interpolated minus log LERP KL. Also reported: the "
       "SLERP curve (runs and lambdas) read at each LERP point's KL minus its reward",
    3: "over the blocks and every pair of iteration-1 runs: study.max_task_cosine minus the "
       "mean absolute task-vector cosine, and the mean full-weight cosine minus "
       "study.min_weight_cosine (no reward enters: the same on both)",
    4: "iteration 1's LITI front (M x T run-steps) minus (a) each of its runs' evaluations "
       "within the front's KL range, (b) the SFT-anchored and (c) the EMA-anchored REINFORCE "
       "run of M x T steps (fronts at study.kl_levels); (d) over the front's 0 < eta < 1: "
       "the fraction of the reward gain kept minus the fraction of the KL kept",
    5: "iteration 1's fronts: each disjoint pair's merge minus each of its two runs' LITI "
       "fronts; all M runs' merge minus each pair's; all M runs' merge minus the LITI front "
       "of the EMA-anchored run of M x T steps (the compute-matched control)",
    6: "the front of iteration 2 minus iteration 1's (the first gain, > 0), and of the last "
       "iteration minus the one before (the last gain: within +-sesoi, an equivalence test)",
}


def match(records: list[dict], **fields) -> list[dict]:
    """The records whose fields equal `fields` (a missing field matches nothing)."""
    return [r for r in records if all(r.get(k) == v for k, v in fields.items())]


def points(records: list[dict], key: str, **fields) -> list[tuple[float, float]]:
    """(KL, `key`) of the records that `match` `fields`: the points of one curve."""
    return [(r["kl"], r[key]) for r in match(records, **fields)]


def _origin(records, key) -> list[tuple[float, float]]:
    sft = next(r for r in records if r["method"] == "sft")
    return [(0.0, sft[key])]


class _Records:
    """The records of one seed, indexed for the lookups the rules make."""

    def __init__(self, records: list[dict], seed: int):
        self.all = [r for r in records if r.get("seed") == seed]

    def match(self, **fields) -> list[dict]:
        return match(self.all, **fields)

    def points(self, key: str, **fields) -> list[tuple[float, float]]:
        return points(self.all, key, **fields)


def _mean(values) -> float:
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _log(x: float) -> float:
    return float(np.log(x)) if x > 0 else float("nan")


def seed_effects(records: list[dict], geometry: dict, study, seed: int, reward: str
                 ) -> dict[int, dict[str, float]]:
    """Every effect of every claim for one seed and one reward (`REWARDS` key): claim ->
    {effect name: value} (NaN where the seed has no measurement)."""
    key = REWARDS[reward]
    origin = _origin(records, key)
    r = _Records(records, seed)
    levels = study.kl_levels
    runs = sorted({x["run"] for x in r.match(method="warp_run", iteration=1)})
    iterations = max(x["iteration"] for x in r.match(method="warp"))

    def curve(**fields):
        return origin + r.points(key, **fields)

    def front(iteration=1, subset=None):
        subset = tuple(runs) if subset is None else tuple(subset)
        return curve(method="warp", iteration=iteration, runs=list(subset))

    out: dict[int, dict[str, float]] = {}

    out[1] = {f"ema_over_sft_beta{beta:g}": _mean(
        evaluation.gap_at(curve(method="warp_run", iteration=1, run=m),
                          curve(method="sft_anchor", beta=beta), levels, within_both=True)
        for m in runs) for beta in study.sft_betas}
    out[1]["ema_weights_over_policy"] = _mean(
        evaluation.gap_at(curve(method="warp_run_ema", iteration=1, run=m),
                          curve(method="warp_run", iteration=1, run=m), levels,
                          within_both=True) for m in runs)

    last = max(x["step"] for x in r.match(method="warp_run", iteration=1))
    ends = [r.match(method="warp_run", iteration=1, run=m, step=last)[0] for m in runs[:2]]
    gains = {"reward": [], "slerp_kl": [], "lerp_kl": []}
    for lam in study.lambdas:
        slerp, = r.match(method="slerp", lam=lam)
        lerp, = r.match(method="lerp", lam=lam)
        between = {k: (1 - lam) * ends[0][k] + lam * ends[1][k] for k in (key, "kl")}
        gains["reward"].append(slerp[key] - between[key])
        gains["slerp_kl"].append(_log(slerp["kl"]) - _log(between["kl"]))
        gains["lerp_kl"].append(_log(between["kl"]) - _log(lerp["kl"]))
    slerp_curve = [(e["kl"], e[key]) for e in ends] + r.points(key, method="slerp")
    out[2] = {"slerp_reward_over_runs": _mean(gains["reward"]),
              "slerp_log_kl_over_runs": _mean(gains["slerp_kl"]),
              "lerp_log_kl_under_runs": _mean(gains["lerp_kl"]),
              "slerp_over_lerp_at_matched_kl": evaluation.above(
                  slerp_curve, r.points(key, method="lerp"))}

    pairs = geometry[str(seed)]
    task = [abs(v["task_cosine"]) for g in pairs for k, v in g.items() if k != "runs"]
    weight = [v["weight_cosine"] for g in pairs for k, v in g.items() if k != "runs"]
    out[3] = {"task_cosine_below_bound": study.max_task_cosine - _mean(task),
              "weight_cosine_above_bound": _mean(weight) - study.min_weight_cosine}

    liti = sorted(r.match(method="warp", iteration=1, runs=runs), key=lambda x: x["eta"])
    top = liti[-1]
    gain = top[key] - origin[0][1]
    kept = [(x[key] - origin[0][1]) / gain - x["kl"] / top["kl"]
            for x in liti if 0 < x["eta"] < 1] if gain > 0 and top["kl"] > 0 else []
    out[4] = {"above_own_runs": evaluation.above(
                  front(), r.points(key, method="warp_run", iteration=1)),
              "above_sft_baseline": evaluation.gap_at(
                  front(), curve(method="reinforce_sft"), levels),
              "above_ema_baseline": evaluation.gap_at(
                  front(), curve(method="reinforce_ema"), levels),
              "kl_falls_faster": _mean(kept)}

    halves = [runs[i:i + 2] for i in range(0, len(runs) - 1, 2)]
    out[5] = {"two_runs_over_one": _mean(
                  evaluation.gap_at(front(1, p), front(1, [m]), levels)
                  for p in halves for m in p),
              "all_runs_over_two": _mean(evaluation.gap_at(front(), front(1, p), levels)
                                         for p in halves),
              "all_runs_over_compute_matched": evaluation.gap_at(
                  front(), curve(method="control"), levels)}

    out[6] = {"first_gain": evaluation.gap_at(front(2), front(1), levels),
              "last_gain": evaluation.gap_at(front(iterations), front(iterations - 1), levels)}
    return out


# What each effect claims and the unit of its smallest effect of interest
# (`study.sesoi[unit]`; "reward" is the reward's own): (kind, unit, primary).
_EFFECTS: dict[str, tuple[str, str, bool]] = {
    "ema_weights_over_policy": ("positive", "reward", False),
    "slerp_reward_over_runs": ("positive", "reward", True),
    "slerp_log_kl_over_runs": ("positive", "log_kl", True),
    "lerp_log_kl_under_runs": ("positive", "log_kl", True),
    "slerp_over_lerp_at_matched_kl": ("positive", "reward", False),
    "task_cosine_below_bound": ("positive", "cosine", True),
    "weight_cosine_above_bound": ("positive", "cosine", True),
    "above_own_runs": ("positive", "reward", True),
    "above_sft_baseline": ("positive", "reward", True),
    "above_ema_baseline": ("positive", "reward", True),
    "kl_falls_faster": ("positive", "fraction", True),
    "two_runs_over_one": ("positive", "reward", True),
    "all_runs_over_two": ("positive", "reward", True),
    "all_runs_over_compute_matched": ("positive", "reward", True),
    "first_gain": ("positive", "reward", True),
    "last_gain": ("equivalent", "reward", True),
}


def _spec(name: str) -> tuple[str, str, bool]:
    return _EFFECTS.get(name, ("positive", "reward", True))  # ema_over_sft_beta*


def judge(records: list[dict], geometry: dict, study, num_seeds: int,
          gate: dict | None = None) -> list[dict]:
    """The six claims' verdicts on each reward: the list `claims.json` holds. Within a
    reward the claims are one family for Holm's correction, each supported when all its
    primary effects are (`verdicts.judge_claims`); the secondary effects (reported, not in a
    verdict) are their own family. A `gate` that did not pass (the proxy too poor to tell
    anything about gold) makes every gold verdict `untestable`."""
    out = []
    for reward, key in REWARDS.items():
        per_seed = [seed_effects(records, geometry, study, s, reward)
                    for s in range(num_seeds)]
        numbers = sorted(per_seed[0])

        def effect(claim: int, name: str, per_seed=per_seed, key=key) -> Effect:
            kind, unit, _ = _spec(name)
            sesoi = study.sesoi[key if unit == "reward" else unit]
            return Effect(name, [seed[claim][name] for seed in per_seed], sesoi, kind)

        def names(claim: int, primary: bool, per_seed=per_seed) -> list[str]:
            return [n for n in per_seed[0][claim] if _spec(n)[2] == primary]

        judged = verdicts.judge_claims(
            [[effect(k, n) for n in names(k, True)] for k in numbers], study.alpha)
        secondary = [(k, n) for k in numbers for n in names(k, False)]
        loose = dict(zip(secondary, verdicts.judge([effect(k, n) for k, n in secondary],
                                                   study.alpha), strict=True))
        for claim, result in zip(numbers, judged, strict=True):
            effects = ([{**e, "primary": True} for e in result["effects"]]
                       + [{**loose[claim, n], "primary": False} for n in names(claim, False)])
            entry = {"claim": claim, "title": CLAIMS[claim], "rule": RULES[claim],
                     "reward": reward, "seeds": num_seeds,
                     **{k: v for k, v in result.items() if k != "effects"},
                     "effects": effects, "per_seed": [seed[claim] for seed in per_seed]}
            if reward == "gold" and gate is not None and not gate["passed"]:
                entry.update(verdict="untestable", seeds_needed=None,
                             note="the proxy did not pass the gate: " + gate["reason"])
            out.append(entry)
    return out


def subsets(runs: int) -> list[tuple[int, ...]]:
    """The iteration-1 merges whose fronts claim 5 compares: each run alone, each disjoint
    pair, all runs."""
    singles = [(m,) for m in range(runs)]
    pairs = [(m, m + 1) for m in range(0, runs - 1, 2)]
    return singles + pairs + [tuple(range(runs))]
