"""WARP, Algorithm 1 of the paper: I iterations of M RL runs with EMA anchors, merged by SLERP
of their task vectors, then LITI towards the iteration's init, which starts the next one.

`run(config, workdir)` is the whole job; everything around the algorithm (the stacked runs,
checkpoints, evaluation, baselines, outputs) is `warp_jax.experiment`.

References:
  Ramé et al., "WARP: On the Benefits of Weight Averaged Rewarded Policies", 2024, Alg. 1.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from warp_jax.experiment import Experiment


@dataclasses.dataclass
class WarpResult:
    inits: list[Any]  # theta_init of every iteration (the SFT policy first)
    merged: list[Any]  # theta_slerp of every iteration
    front: list[tuple[float, float, float]]  # (eta, proxy reward, KL) of the final front
    records: list[dict]  # every evaluated point (pareto_front.json)


def run(config, workdir: str | os.PathLike) -> WarpResult:
    """Runs WARP and its baselines as `config` says (experiments/configs/gemma_warp.py),
    writing checkpoints, metrics, records and outputs to `workdir`; resumes what a previous
    run there left."""
    exp = Experiment.start(config, workdir)
    c = config.warp
    records = exp.baselines()
    init, inits, merged_all = exp.sft, [exp.sft], []
    for i in range(1, c.iterations + 1):
        runs = [("warp_run", i, m) for m in range(c.runs)]  # each its own random streams
        # Lines 3-11: M runs from init (policy = EMA anchor = init), T REINFORCE steps each on
        # r_beta with their own EMA as the anchor, stacked on the mesh's `run` axis.
        policies = exp.train(f"iter{i}", init, "ema", runs, c.steps, "warp_run", i)
        merged = exp.slerp(init, policies)  # line 12: SLERP of the M task vectors, lambda 1/M
        merged_all.append(merged)
        records += exp.iteration_records(i, init, policies, merged)
        init = exp.liti(init, merged, c.eta)  # line 13: LITI towards the init
        inits.append(init)
    exp.finish(records, merged_all[-1])  # the output: the LITI front of the last merge
    final = [r for r in records if r["method"] == "warp" and r["iteration"] == c.iterations]
    return WarpResult(inits, merged_all,
                      [(r["eta"], r["proxy_reward"], r["kl"]) for r in final], records)
