"""The reproduction study: the paper's six observations at small scale, on real review text,
over several RL seeds, each judged by a rule fixed before the run.

`run(config, workdir)` trains what every claim needs (the stages below) through
`experiment.Experiment`, so it checkpoints and resumes like the main job, then judges the
claims (`judge`) and writes `workdir/claims.json`. The SFT policy, the gold classifier and the
proxy reward model are shared by all seeds; a seed changes the RL runs' prompt order and
sampling keys. The stages:

- pilot: SFT-anchored REINFORCE at each `study.pilot_betas`; the study's beta is the smallest
  whose KL term binds (`pick_beta`);
- baselines: REINFORCE with the SFT and with the EMA anchor, `I * T` steps, the seeds stacked;
- iterations 1..I: M runs per seed (all seeds stacked), each seed's SLERP and the LITI front
  of it towards the SFT policy; at iteration 1 also the fronts of the first m runs' merge
  (m = 1..M), SLERP against LERP of two runs at `study.lambdas`, and the task-vector geometry
  of every pair of runs.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import platform
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from warp_jax import evaluation, merging, sharding
from warp_jax.experiment import Experiment

REWARDS = {"proxy": "proxy_reward", "gold": "oracle_reward"}
CLAIMS = {
    1: "The EMA anchor gives a better KL-reward trade-off than the SFT anchor",
    2: "SLERP of task vectors gives higher reward and higher KL than LERP at the same lambda",
    3: "Task vectors of independent runs are close to orthogonal; full weights stay collinear",
    4: "The LITI front lies above the RL runs' own trajectories and above the baselines",
    5: "Merging more runs (M = 1, 2, ..., M) improves the front",
    6: "Iterating improves the front, then saturates",
}
# Every rule is fixed before the run. "Front" is the upper envelope of a curve's evaluations
# (SFT point included), read at the KL levels `study.levels` x the KL that every compared
# curve reaches. "The paired test" is a one-sided one-sample t-test over seeds at level
# `study.alpha`; an effect is `supported` if it is > 0 in every seed and the test passes,
# `not supported` if its mean over seeds is <= 0, else `inconclusive`.
RULES = {
    1: "per seed, the EMA-anchor front minus the SFT-anchor front, averaged over the matched "
       "KL levels: the effect",
    2: "per seed, SLERP minus LERP of the first two runs of iteration 1 at each lambda in "
       "study.lambdas (averaged): the reward difference and the KL difference are both effects; "
       "supported if both are, not supported if either is not",
    3: "per seed, over the blocks and every pair of iteration-1 runs: supported if the mean "
       "|task-vector cosine| < study.max_task_cosine and the mean full-weight cosine > "
       "study.min_weight_cosine in every seed; not supported if the mean over seeds fails "
       "either; else inconclusive (the same for both rewards: no reward enters)",
    4: "per seed, (a) iteration 1's LITI front minus each of its runs' evaluations and (b) the "
       "last iteration's front minus each baseline evaluation, over the points within the "
       "front's KL range (averaged): both effects; supported if both are, not supported if "
       "either is not",
    5: "per seed, the front of the merge of all M iteration-1 runs minus that of one run (M = "
       "1), averaged over the matched KL levels: the effect",
    6: "per seed, the front of iteration 2 minus that of iteration 1 (the first gain) is an "
       "effect, and the mean last gain (iteration I minus I - 1) must be below the mean "
       "first gain; supported if both hold, not supported if the first gain is not supported, "
       "else inconclusive",
}


def validate(c) -> None:
    """Raises `ValueError` naming the first bad `study` field (or a field the study needs)."""
    s = c.study

    def fail(field, valid):
        section, key = field.split(".")
        raise ValueError(f"config.{field} = {c[section][key]!r}: {valid}")

    if not isinstance(s.seeds, int) or s.seeds < 2:
        fail("study.seeds", "must be an int >= 2: a verdict needs the spread over seeds")
    if c.warp.baseline_runs != s.seeds:
        fail("warp.baseline_runs", f"the study runs each baseline once per seed: use "
             f"study.seeds ({s.seeds})")
    if set(c.warp.baselines) != {"reinforce_sft", "reinforce_ema"}:
        fail("warp.baselines", "the study compares both REINFORCE baselines: use "
             "('reinforce_sft', 'reinforce_ema')")
    if c.warp.runs < 2:
        fail("warp.runs", "the study merges and compares runs: use 2 or more")
    if not c.reward.oracle:
        fail("reward.oracle", "the study judges every claim on a gold reward too: use 'gold'")
    if any(not 0 <= b < float("inf") for b in s.pilot_betas):
        fail("study.pilot_betas", "must be finite and >= 0")
    if s.pilot_betas and (not isinstance(s.pilot_steps, int) or s.pilot_steps < 2):
        fail("study.pilot_steps", "must be an int >= 2")
    if not 0 <= s.bind < float("inf"):
        fail("study.bind", "must be finite and >= 0")
    if not s.lambdas or any(not 0 < x < 1 for x in s.lambdas):
        fail("study.lambdas", "needs values in (0, 1)")
    if not s.levels or any(not 0 < x <= 1 for x in s.levels):
        fail("study.levels", "needs values in (0, 1]")
    if not 0 < s.alpha < 1:
        fail("study.alpha", "must be in (0, 1)")
    if not 0 < s.max_task_cosine <= 1:
        fail("study.max_task_cosine", "must be in (0, 1]")
    if not -1 < s.min_weight_cosine < 1:
        fail("study.min_weight_cosine", "must be in (-1, 1)")


def run(config, workdir: str | os.PathLike) -> list[dict]:
    """Runs (or resumes) the study of `config` (experiments/configs/reproduce.py) in
    `workdir`; returns the claims it wrote to `workdir/claims.json`."""
    started = time.time()
    validate(config)
    exp = Experiment.start(config, workdir)
    study = Study(exp, started)
    records = study.collect()
    claims = _strict_json(judge(records, study.geometry, config.study, config.study.seeds))
    meta = study.finish()
    if sharding.is_main_process():
        _write_json(exp.workdir / "claims.json", claims)
        _write_json(exp.workdir / "study.json", {"records": records, "geometry": study.geometry,
                                                 **meta})
    return claims


def _strict_json(value: Any) -> Any:
    """`value` with every NaN or infinity (an undefined statistic) as None: strict JSON."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _write_json(path: pathlib.Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_strict_json(value), indent=1, allow_nan=False))
    os.replace(tmp, path)


class Study:
    """The stages of the study on one `Experiment`, each evaluated point a record with its
    `seed`; `collect()` runs them in order (resuming what is done)."""

    def __init__(self, exp: Experiment, started: float):
        self.exp, self.config = exp, exp.config
        self._wall_time, self._started = exp.workdir / "wall_time.json", started
        # The seconds of earlier invocations, read once; this one's is appended by `_tick`.
        self._before = (json.loads(self._wall_time.read_text())
                        if self._wall_time.exists() else [])
        self._ticked, self._spent = False, self._before
        exp.on_record = self._tick
        self.seeds = list(range(self.config.study.seeds))
        self.geometry: dict[str, list[dict]] = {}  # per seed: every pair of iteration-1 runs
        self.beta: float = self.config.rl.beta  # the pilot's choice, once it has run
        self.sft_point: dict = {}  # the SFT policy's evaluation

    def collect(self) -> list[dict]:
        self.sft_point = {**self._point("sft", lambda: self.exp.sft, method="sft"), "seed": None}
        records = [self.sft_point, *self.pilot()]
        records += self.baselines()
        c = self.config.warp
        inits = [self.exp.sft] * len(self.seeds)
        for i in range(1, c.iterations + 1):
            policies, run_records = self._iteration_runs(i, inits)
            records += run_records
            for s in self.seeds:
                mine = policies[s * c.runs:(s + 1) * c.runs]
                merged = self.exp.slerp(inits[s], mine)
                records += self._front(f"seed{s}_iter{i}_front", merged, s, i, "warp", c.runs)
                if i == 1:
                    records += self._iteration_one(s, mine)
                inits[s] = self.exp.liti(inits[s], merged, c.eta)
        return records

    def pilot(self) -> list[dict]:
        """SFT-anchored runs at each pilot beta; sets `self.beta` (`pick_beta`)."""
        s, records = self.config.study, []
        if not s.pilot_betas:
            return []
        for beta in s.pilot_betas:
            stage = f"pilot_beta{beta:g}"
            self.exp.train(stage, self.exp.sft, "sft", [("pilot", 0)], s.pilot_steps,
                           "pilot", 0, beta=beta)
            records += [{**r, "seed": 0, "beta": beta} for r in self.exp.load_records(stage)]
        self.beta = pick_beta(records, self.sft_point["proxy_reward"], s.bind)
        return records

    def baselines(self) -> list[dict]:
        """The REINFORCE baselines (`Experiment.baselines`), one run per seed."""
        return [{**r, "seed": r["run"]} for r in self.exp.baselines(beta=self.beta)]

    def _iteration_runs(self, i: int, inits: list) -> tuple[list, list[dict]]:
        """Iteration i's M runs of every seed, stacked, each from its seed's init: their
        policies (seed-major) and records."""
        c = self.config.warp
        runs = [("warp_run", s, i, m) for s in self.seeds for m in range(c.runs)]
        init = (self.exp.sft if i == 1 else
                jax.tree.map(lambda *x: np.stack([sharding.to_host(a) for a in x]),
                             *[inits[s] for s in self.seeds for _ in range(c.runs)]))
        stage = f"iter{i}"
        policies = self.exp.train(stage, init, "ema", runs, c.steps, "warp_run", i,
                                  beta=self.beta)
        return policies, [{**r, "seed": r["run"] // c.runs, "run": r["run"] % c.runs}
                          for r in self.exp.load_records(stage)]

    def _iteration_one(self, s: int, policies: list) -> list[dict]:
        """Seed `s`'s iteration-1 analyses: the fronts of the first m runs' merge (m < M),
        SLERP against LERP of two runs, and the geometry of every pair of runs."""
        exp, records = self.exp, []
        for m in range(1, len(policies)):
            merged = exp.slerp(exp.sft, policies[:m])
            records += self._front(f"seed{s}_runs{m}_front", merged, s, 1, "warp", m)
        merges = {"slerp": lambda w: merging.slerp_tree(exp.sft, policies[:2], w,
                                                        groups=exp.groups),
                  "lerp": lambda w: merging.lerp_tree(exp.sft, policies[:2], w)}
        for lam in self.config.study.lambdas:
            for method, merge in merges.items():
                records.append(self._point(
                    f"seed{s}_{method}_lambda{lam:g}",
                    lambda merge=merge, lam=lam: merge((1 - lam, lam)),
                    method=method, iteration=1, seed=s, lam=lam))
        stage = f"seed{s}_geometry"  # recorded once, like the evaluations: a rerun reads it
        expected = len(policies) * (len(policies) - 1) // 2
        pairs = exp.load_records(stage, keys=("runs",),
                                 complete=lambda rs: len(rs) == expected)
        if not pairs:
            pairs = [{"runs": [a, b], **evaluation.task_vector_stats(
                exp.sft, [policies[a], policies[b]], exp.groups)}
                for a, b in itertools.combinations(range(len(policies)), 2)]
            exp.save_records(stage, pairs)
        self.geometry[str(s)] = pairs
        return records

    def _front(self, stage: str, merged, seed: int, iteration: int, method: str,
               merged_runs: int) -> list[dict]:
        return [{**r, "seed": seed, "merged_runs": merged_runs}
                for r in self.exp.front(stage, merged, method, iteration,
                                        self.config.warp.eta_grid)]

    def _point(self, stage: str, params, **fields) -> dict:
        """The evaluation of `params()` (made only if not recorded before) as one record."""
        found = self.exp.load_records(stage, complete=lambda rs: len(rs) == 1)
        if found:
            return found[0]
        record = {"step": None, "eta": None, "run": None, **fields,
                  **self.exp.evaluate(params(), stage)}
        self.exp.save_records(stage, [record])
        return record

    def _tick(self) -> None:
        """Records this invocation's seconds so far in `wall_time.json` (one entry per
        invocation that computed something), after each record it writes: a killed
        invocation keeps the time up to its last record, a rerun that only reports adds
        none."""
        self._ticked = True
        self._spent = [*self._before, round(time.time() - self._started, 1)]
        if sharding.is_main_process():
            _write_json(self._wall_time, self._spent)

    def finish(self) -> dict:
        """Closes the experiment; the study's wall time over every invocation that computed
        something (`_tick`) and the beta it used."""
        self.exp.ckpt.close()
        self.exp.logger.close()
        if self._ticked:
            self._tick()
        spent = self._spent
        workdir, setup = self.exp.workdir, self.exp.setup
        task = json.loads((workdir / "task.json").read_text())
        parts = task["snippets_per_part"]
        meta = {"snippets": sum(parts.values()), "split": parts,
                "train_prompts": task["train_prompts"], "eval_prompts": task["eval_prompts"],
                "parameters": sum(x.size for x in jax.tree.leaves(setup.sft_params)),
                "vocab_size": setup.cfg.vocab_size,
                **{name: json.loads((workdir / f"{name}.json").read_text())
                   for name in ("gold", "reward_model")}}
        machine = {"platform": platform.machine(), "cpus": os.cpu_count(),
                   "backend": jax.default_backend(), "devices": jax.device_count()}
        return {"beta": self.beta, "wall_seconds": spent, "setup": meta, "machine": machine}


def pick_beta(pilot: Sequence[dict], sft_reward: float, bind: float) -> float:
    """The smallest pilot beta that binds: at the end of its SFT-anchored run, the KL term
    beta x KL costs at least `bind` x the proxy reward gained over the SFT policy (a KL
    penalty that is small next to the gain never shapes the run). The largest beta if none
    does."""
    betas = sorted({r["beta"] for r in pilot})
    for beta in betas:
        last = max((r for r in pilot if r["beta"] == beta), key=lambda r: r["step"])
        if beta * last["kl"] >= bind * (last["proxy_reward"] - sft_reward):
            return beta
    return betas[-1]


def effect(per_seed: Sequence[float], alpha: float) -> tuple[str, float]:
    """The verdict on an effect measured once per seed (see `RULES`), and the p-value of the
    one-sided t-test that its mean is > 0. Fewer than two finite values, or values without
    spread, define no test: `inconclusive` with p NaN (null in the JSON), never p = 0."""
    import scipy.stats

    x = np.asarray(per_seed, np.float64)
    if (len(x) < 2 or not np.isfinite(x).all()
            or np.ptp(x) <= 1e-9 * max(1.0, float(np.abs(x).max()))):
        return "inconclusive", float("nan")
    p = float(scipy.stats.ttest_1samp(x, 0.0, alternative="greater").pvalue)
    if (x > 0).all() and p < alpha:
        return "supported", p
    if x.mean() <= 0:
        return "not supported", p
    return "inconclusive", p


def _both(first: str, second: str) -> str:
    if "not supported" in (first, second):
        return "not supported"
    return "supported" if first == second == "supported" else "inconclusive"


def points(records, reward: str, **match) -> list[tuple[float, float]]:
    """(kl, reward) of the records whose fields equal `match`."""
    return [(r["kl"], r[reward]) for r in records
            if all(r.get(k) == v for k, v in match.items())]


def judge(records: list[dict], geometry: dict, study, num_seeds: int) -> list[dict]:
    """The six claims' verdicts on each reward (`RULES`): the list `claims.json` holds."""
    seeds = range(num_seeds)
    sft = next(r for r in records if r["method"] == "sft")
    iterations = max(r["iteration"] for r in records if r["method"] == "warp")
    runs = max(r["merged_runs"] for r in records if r["method"] == "warp")
    levels, alpha = study.levels, study.alpha
    out = []
    for name, key in REWARDS.items():
        origin = [(0.0, sft[key])]

        def curve(key=key, origin=origin, **match):
            return origin + points(records, key, **match)

        def front(s, i, m=runs, curve=curve):
            return curve(method="warp", seed=s, iteration=i, merged_runs=m)

        def entry(claim, verdict, per_seed, name=name, **extra):
            out.append({"claim": claim, "title": CLAIMS[claim], "verdict": verdict,
                        "rule": RULES[claim], "seeds": num_seeds, "per_seed": per_seed,
                        "reward": name, **extra})

        d = [evaluation.matched_gap(curve(method="reinforce_ema", seed=s),
                         curve(method="reinforce_sft", seed=s), levels) for s in seeds]
        verdict, p = effect(d, alpha)
        entry(1, verdict, d, p_value=p, mean=float(np.mean(d)))

        per_seed = []
        for s in seeds:
            pts = {(r["method"], r["lam"]): r for r in records
                   if r["method"] in ("slerp", "lerp") and r["seed"] == s}
            lams = sorted({lam for _, lam in pts})
            per_seed.append({
                "reward_diff": float(np.mean([pts["slerp", lam][key] - pts["lerp", lam][key]
                                              for lam in lams])),
                "kl_diff": float(np.mean([pts["slerp", lam]["kl"] - pts["lerp", lam]["kl"]
                                          for lam in lams]))})
        (vr, pr), (vk, pk) = (effect([x[f] for x in per_seed], alpha)
                              for f in ("reward_diff", "kl_diff"))
        entry(2, _both(vr, vk), per_seed, p_value={"reward_diff": pr, "kl_diff": pk})

        per_seed = []
        for s in seeds:
            pairs = geometry[str(s)]
            task = [abs(v["task_cosine"]) for g in pairs for k, v in g.items() if k != "runs"]
            weight = [v["weight_cosine"] for g in pairs for k, v in g.items() if k != "runs"]
            per_seed.append({"task_cosine": float(np.mean(task)),
                             "weight_cosine": float(np.mean(weight))})
        ok = [x["task_cosine"] < study.max_task_cosine and
              x["weight_cosine"] > study.min_weight_cosine for x in per_seed]
        mean_ok = (np.mean([x["task_cosine"] for x in per_seed]) < study.max_task_cosine and
                   np.mean([x["weight_cosine"] for x in per_seed]) > study.min_weight_cosine)
        entry(3, "supported" if all(ok) else "inconclusive" if mean_ok else "not supported",
              per_seed)

        per_seed = []
        for s in seeds:
            baseline_points = [p for anchor in ("sft", "ema")
                               for p in points(records, key, method=f"reinforce_{anchor}",
                                               seed=s)]
            run_points = points(records, key, method="warp_run", seed=s, iteration=1)
            per_seed.append({
                "above_runs": evaluation.above(front(s, 1), run_points),
                "above_baselines": evaluation.above(front(s, iterations), baseline_points)})
        (va, pa), (vb, pb) = (effect([x[f] for x in per_seed], alpha)
                              for f in ("above_runs", "above_baselines"))
        entry(4, _both(va, vb), per_seed, p_value={"above_runs": pa, "above_baselines": pb})

        by_m = [[evaluation.matched_gap(front(s, 1, m), front(s, 1, 1), levels)
                 for m in range(1, runs + 1)] for s in seeds]
        d = [gains[-1] for gains in by_m]
        verdict, p = effect(d, alpha)
        entry(5, verdict, d, p_value=p, mean=float(np.mean(d)), gain_over_one_run=by_m)

        gains = [[evaluation.matched_gap(front(s, i + 1), front(s, i), levels)
                  for i in range(1, iterations)] for s in seeds]
        if iterations < 2:
            entry(6, "inconclusive", gains, note="needs 2 iterations or more")
        else:
            first, last = [g[0] for g in gains], [g[-1] for g in gains]
            verdict, p = effect(first, alpha)
            if verdict == "supported" and not (iterations > 2 and
                                               np.mean(last) < np.mean(first)):
                verdict = "inconclusive"
            entry(6, verdict, [{"gains": g} for g in gains], p_value=p,
                  mean_first_gain=float(np.mean(first)), mean_last_gain=float(np.mean(last)))
    return out
