"""The reproduction study: the paper's six observations at small scale, on real review text,
over several RL seeds, each judged by a rule fixed before the run (`claims`).

`run(config, workdir)` checks the proxy reward against its gate, trains what every claim
needs (the stages below) through `experiment.Experiment`, so it checkpoints and resumes like
the main job, then judges the claims (`claims.judge`) and writes `workdir/claims.json`. The
SFT policy, the gold classifier and the proxy reward model are shared by all seeds; a seed
changes the RL runs' prompt order and sampling keys. The stages, every seed's runs stacked:

- SFT anchor: REINFORCE anchored at the SFT policy for T steps at each `study.sft_betas`
  (claim 1);
- baselines: REINFORCE with the SFT and with the EMA anchor for M x T steps, the run-steps of
  one WARP iteration (claim 4), and the LITI front of the EMA-anchored one towards the SFT
  policy (claim 5's compute-matched control);
- iterations 1..I: M EMA-anchored runs per seed, each seed's SLERP and its LITI front
  towards the SFT policy on `warp.eta_grid`; at iteration 1 also the EMA weights' evaluations
  (claim 1), the fronts of each run alone and of each disjoint pair (claim 5), SLERP and LERP
  of two runs at `study.lambdas` (claim 2) and the task-vector geometry of every pair of
  runs (claim 3).
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

import jax
import numpy as np

from warp_jax import claims, evaluation, merging, sharding
from warp_jax.experiment import Experiment

REWARDS, CLAIMS, RULES = claims.REWARDS, claims.CLAIMS, claims.RULES


def validate(c) -> None:
    """Raises `ValueError` naming the first bad `study` field (or a field the study needs)."""
    s = c.study

    def fail(field, valid):
        section, key = field.split(".")
        value = c[section][key]
        value = value.to_dict() if hasattr(value, "to_dict") else value  # one line
        raise ValueError(f"config.{field} = {value!r}: {valid}")

    if not isinstance(s.seeds, int) or s.seeds < 2:
        fail("study.seeds", "must be an int >= 2: a verdict needs the spread over seeds")
    if c.warp.runs < 2:
        fail("warp.runs", "the study merges and compares runs: use 2 or more")
    if c.warp.iterations < 2:
        fail("warp.iterations", "claim 6 compares iterations: use 2 or more")
    if not c.reward.oracle:
        fail("reward.oracle", "the study judges every claim on a gold reward too: use 'gold'")
    if not s.sft_betas or any(not 0 <= b < float("inf") for b in s.sft_betas):
        fail("study.sft_betas", "needs betas, finite and >= 0")
    if not s.lambdas or any(not 0 < x < 1 for x in s.lambdas):
        fail("study.lambdas", "needs values in (0, 1)")
    if not s.kl_levels or any(not 0 < x < float("inf") for x in s.kl_levels):
        fail("study.kl_levels", "needs KL values > 0 (nats)")
    if not 0 < s.alpha < 1:
        fail("study.alpha", "must be in (0, 1)")
    units = {*REWARDS.values(), "log_kl", "cosine", "fraction"}
    if set(s.sesoi) != units or any(not 0 < v < float("inf") for v in s.sesoi.values()):
        fail("study.sesoi", f"needs a smallest effect of interest > 0 for each of "
             f"{sorted(units)}")
    if not 0 < s.max_task_cosine <= 1:
        fail("study.max_task_cosine", "must be in (0, 1]")
    if not -1 < s.min_weight_cosine < 1:
        fail("study.min_weight_cosine", "must be in (-1, 1)")
    if not 0 <= s.gate_accuracy <= 1:
        fail("study.gate_accuracy", "must be in [0, 1]")
    if not -1 <= s.gate_spearman <= 1:
        fail("study.gate_spearman", "must be in [-1, 1]")


def gate(workdir: pathlib.Path, study) -> dict:
    """Whether the proxy reward is worth optimising, from `workdir/reward_model.json`: its
    held-out pair accuracy and its Spearman correlation with gold on fresh SFT samples
    against `study.gate_accuracy` and `study.gate_spearman`."""
    record = json.loads((workdir / "reward_model.json").read_text())
    accuracy, spearman = record["held_out_accuracy"], record.get("sft_spearman", float("nan"))
    short = [f"{name} {value:.3f} < {bound}" for name, value, bound in (
        ("held-out pair accuracy", accuracy, study.gate_accuracy),
        ("Spearman(proxy, gold) on SFT samples", spearman, study.gate_spearman))
        if not value >= bound]
    return {"passed": not short, "held_out_accuracy": accuracy, "sft_spearman": spearman,
            "accuracy_bound": study.gate_accuracy, "spearman_bound": study.gate_spearman,
            "reason": "; ".join(short)}


def run(config, workdir: str | os.PathLike) -> list[dict]:
    """Runs (or resumes) the study of `config` (experiments/configs/reproduce.py) in
    `workdir`; returns the claims it wrote to `workdir/claims.json`."""
    started = time.time()
    validate(config)
    exp = Experiment.start(config, workdir)
    checked = gate(exp.workdir, config.study)
    if sharding.is_main_process():
        print(f"proxy gate: held-out pair accuracy {checked['held_out_accuracy']:.3f} "
              f"(needs {checked['accuracy_bound']}), Spearman with gold on SFT samples "
              f"{checked['sft_spearman']:.3f} (needs {checked['spearman_bound']}): "
              + ("passed" if checked["passed"] else
                 "NOT passed, every gold verdict will be 'untestable'"), file=sys.stderr)
    study = Study(exp, started)
    records = study.collect()
    judged = _strict_json(claims.judge(records, study.geometry, config.study,
                                       config.study.seeds, checked))
    meta = study.finish()
    meta["setup"].update(sft_betas=list(config.study.sft_betas), gate=checked)
    if sharding.is_main_process():
        _write_json(exp.workdir / "claims.json", judged)
        _write_json(exp.workdir / "study.json", {"records": records, "geometry": study.geometry,
                                                 **meta})
    return judged


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
        self.beta: float = self.config.rl.beta  # the EMA-anchored runs' and baselines'
        self.sft_point: dict = {}  # the SFT policy's evaluation

    def collect(self) -> list[dict]:
        self.sft_point = {**self._point("sft", lambda: self.exp.sft, method="sft"), "seed": None}
        records = [self.sft_point, *self.sft_anchor(), *self.baselines()]
        c = self.config.warp
        inits = [self.exp.sft] * len(self.seeds)
        for i in range(1, c.iterations + 1):
            policies, run_records = self._iteration_runs(i, inits)
            records += run_records
            for s in self.seeds:
                mine = policies[s * c.runs:(s + 1) * c.runs]
                if i == 1:
                    merged, found = self._iteration_one(s, mine)
                else:
                    merged = self.exp.slerp(inits[s], mine)
                    found = self._front(f"seed{s}_iter{i}_front", merged, s, i,
                                        tuple(range(c.runs)))
                records += found
                inits[s] = self.exp.liti(inits[s], merged, c.eta)
        return records

    def _stacked(self, stage: str, anchor: str, purpose: str, steps: int, method: str,
                 **fields) -> tuple[list, list[dict]]:
        """One run per seed from the SFT policy, stacked: their final policies and records
        (`run` r is seed r)."""
        runs = [(purpose, s) for s in self.seeds]
        policies = self.exp.train(stage, self.exp.sft, anchor, runs, steps, method, 0,
                                  beta=fields.get("beta", self.beta))
        return policies, [{**r, "seed": r["run"], **fields}
                          for r in self.exp.load_records(stage)]

    def sft_anchor(self) -> list[dict]:
        """REINFORCE anchored at the SFT policy for T steps at each `study.sft_betas` (the
        same prompt order and keys at every beta)."""
        return [r for beta in self.config.study.sft_betas
                for r in self._stacked(f"sft_anchor_beta{beta:g}", "sft", "sft_anchor",
                                       self.config.warp.steps, "sft_anchor", beta=beta)[1]]

    def baselines(self) -> list[dict]:
        """REINFORCE with each anchor for the M x T run-steps of one WARP iteration, and the
        LITI front of the EMA-anchored run's final policy (the compute-matched control)."""
        c = self.config.warp
        records, policies = [], {}
        for anchor in ("sft", "ema"):
            policies[anchor], found = self._stacked(f"baseline_reinforce_{anchor}", anchor,
                                                    "baseline", c.runs * c.steps,
                                                    f"reinforce_{anchor}")
            records += found
        for s in self.seeds:
            records += [{**r, "seed": s, "runs": None} for r in self.exp.front(
                f"seed{s}_control_front", policies["ema"][s], "control", 0, c.eta_grid)]
        return records

    def _iteration_runs(self, i: int, inits: list) -> tuple[list, list[dict]]:
        """Iteration i's M runs of every seed, stacked, each from its seed's init: their
        policies (seed-major) and records (at iteration 1 with their EMA weights')."""
        c = self.config.warp
        runs = [("warp_run", s, i, m) for s in self.seeds for m in range(c.runs)]
        init = (self.exp.sft if i == 1 else
                jax.tree.map(lambda *x: np.stack([sharding.to_host(a) for a in x]),
                             *[inits[s] for s in self.seeds for _ in range(c.runs)]))
        stage = f"iter{i}"
        policies = self.exp.train(stage, init, "ema", runs, c.steps, "warp_run", i,
                                  beta=self.beta,
                                  anchor_method="warp_run_ema" if i == 1 else None)
        return policies, [{**r, "seed": r["run"] // c.runs, "run": r["run"] % c.runs}
                          for r in self.exp.load_records(stage)]

    def _iteration_one(self, s: int, policies: list) -> tuple[Any, list[dict]]:
        """Seed `s`'s iteration-1 merge of all runs and its records: the fronts of every
        merge `claims.subsets` names, SLERP against LERP of two runs, and the geometry of
        every pair of runs."""
        exp, records, merged = self.exp, [], {}
        for subset in claims.subsets(len(policies)):
            merged[subset] = exp.slerp(exp.sft, [policies[m] for m in subset])
            name = "+".join(map(str, subset))
            records += self._front(f"seed{s}_runs{name}_front", merged[subset], s, 1, subset)
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
        return merged[tuple(range(len(policies)))], records

    def _front(self, stage: str, merged, seed: int, iteration: int,
               subset: tuple[int, ...]) -> list[dict]:
        return [{**r, "seed": seed, "runs": list(subset)}
                for r in self.exp.front(stage, merged, "warp", iteration,
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
