"""The experiment around WARP's Algorithm 1 (`warp.run`): the stacked RL runs with their
checkpoints and metrics, the jitted merges, evaluation records, fronts, task-vector geometry,
the baselines and the outputs.

Every stage is checkpointed under `workdir/checkpoints/<stage>` (runs every `eval.every`
steps, merges once), and the evaluation records of each stage under
`workdir/records/<stage>.json`, so a run resumes after a kill at any moment and produces the
same `pareto_front.json` as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from warp_jax import evaluation, merging, reinforce, rewards, sharding, streams
from warp_jax.checkpoint import Checkpoints
from warp_jax.ingredients import Ingredients, prepare
from warp_jax.report import write_outputs
from warp_jax.settings import mesh_shape, rl_config, validate_config
from warp_jax.workdir import record_config, writable


class _Logger:
    """Training metrics to `metrics.jsonl` and TensorBoard (`tensorboard/<stage>`), from
    process 0 only; each step once, also after a resume."""

    def __init__(self, workdir: pathlib.Path):
        self._on = sharding.is_main_process()
        self._workdir = workdir
        self._jsonl = None
        self._tb: dict[str, Any] = {}

    def start(self, stage: str, step: int) -> None:
        """Starts `stage` at `step`: drops what an interrupted run logged for it after `step`
        (those steps are trained again), in metrics.jsonl and TensorBoard."""
        if not self._on:
            return
        from tensorboardX import SummaryWriter

        path = self._workdir / "metrics.jsonl"
        if self._jsonl is not None:
            self._jsonl.close()
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            keep = [line for line in lines if _logged_before(line, stage, step)]
            if keep != lines:
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(keep), encoding="utf-8")
                os.replace(tmp, path)
        self._jsonl = open(path, "a", encoding="utf-8")
        if stage in self._tb:
            self._tb.pop(stage).close()
        self._tb[stage] = SummaryWriter(str(self._workdir / "tensorboard" / stage),
                                        purge_step=step + 1)

    def log(self, stage: str, run: int, step: int, metrics: dict[str, float]) -> None:
        if not self._on:
            return
        self._jsonl.write(json.dumps({"stage": stage, "run": run, "step": step, **metrics})
                          + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tb[stage].add_scalar(f"run{run}/{name}", value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        for writer in self._tb.values():
            writer.close()


def _logged_before(line: str, stage: str, step: int) -> bool:
    """Whether a metrics.jsonl line is whole and not of `stage` after `step`."""
    try:
        record = json.loads(line)
    except ValueError:  # cut short by a kill
        return False
    return line.endswith("\n") and (record.get("stage") != stage or record.get("step", 0) <= step)


class Experiment:
    """Everything around Algorithm 1: the ingredients, the mesh, checkpoints, metrics, the
    jitted merges, stacked RL runs, evaluation records, fronts and geometry, the outputs.

    Built by `Experiment.start(config, workdir)`, which validates the config and prepares
    (or restores) the tokenizer, SFT policy, rewards and prompts.
    """

    def __init__(self, config, workdir: pathlib.Path, setup: Ingredients):
        self.config, self.workdir, self.setup = config, workdir, setup
        self.ckpt = Checkpoints(workdir / "checkpoints")
        self.logger = _Logger(workdir)
        (workdir / "records").mkdir(exist_ok=True)
        self.mesh = sharding.make_mesh(**mesh_shape(config, len(jax.devices())))
        self.param_sharding = sharding.param_shardings(setup.boxed_params, self.mesh)
        self.sft = jax.device_put(setup.sft_params, self.param_sharding)
        rm_cfg, rm_params = setup.reward_model
        rm_params = jax.device_put(rm_params, sharding.param_shardings(
            rewards.abstract_params(rm_cfg), self.mesh))
        proxy = rewards.model_reward(rm_cfg, rm_params, config.reward.pooling)
        if setup.reward_norm is not None:
            proxy = rewards.Standardized(proxy, *(np.asarray(x, np.float32)
                                                  for x in setup.reward_norm))
        self.rewards = {"proxy_reward": proxy}
        if setup.oracle is not None:
            self.rewards["oracle_reward"] = setup.oracle
        self.groups = (merging.block_groups(setup.sft_params) if config.warp.granularity == "layer"
                       else None)
        # The merges and the unstacking of a run as one program each, with the params'
        # sharding out (op by op, every op on arrays spanning processes is its own program).
        out = dict(out_shardings=self.param_sharding)
        self.slerp = jax.jit(functools.partial(merging.slerp_tree, groups=self.groups), **out)
        self.lerp = jax.jit(merging.lerp_tree, **out)
        self.liti = jax.jit(merging.liti_tree, **out)
        self.unstack = jax.jit(lambda stacked, m: jax.tree.map(lambda x: x[m], stacked), **out)
        self._steps: dict[tuple[str, int], Any] = {}
        self.on_record: Callable[[], None] | None = None  # called after records are saved

    def step_fn(self, anchor: str, num_runs: int, beta: float | None = None):
        """The jitted step of `num_runs` stacked runs with `anchor` (and `beta` in place of
        the config's `rl.beta`, if given)."""
        key = (anchor, num_runs, beta)
        if key not in self._steps:
            rl = rl_config(self.config, anchor, self.setup.end_ids)
            self._steps[key] = reinforce.make_train_step(
                self.setup.cfg, rl if beta is None else dataclasses.replace(rl, beta=beta),
                self.rewards["proxy_reward"], mesh=self.mesh, num_runs=num_runs)
        return self._steps[key]

    def evaluate(self, params, where: str) -> dict[str, Any]:
        """Every point is evaluated with the same key (common random numbers), so differences
        between points are not sampling noise of the held-out completions' draws. A
        non-finite result (a diverged policy) is a `ValueError` naming `where`."""
        c = self.config
        result = evaluation.evaluate_policy(
            params, self.sft, self.setup.cfg, self.setup.eval_prompts, streams.key(c.seed, "eval"),
            self.rewards, max_new_tokens=c.rl.max_new_tokens,
            temperature=c.rl.temperature, num_samples=c.eval.samples,
            eos_id=self.setup.end_ids, backend=c.rl.sampler_backend, mesh=self.mesh,
            decode_layout=c.rl.decode_layout)
        result.pop("completions")
        bad = [k for k, v in result.items() if not math.isfinite(v) and k != "rank_correlation"]
        if bad:
            raise ValueError(f"{where}: non-finite {', '.join(bad)} (the policy diverged; try a "
                             "lower learning rate or a gradient clip)")
        return {k: round(v, 6) for k, v in result.items()}

    def _records(self, stage: str) -> pathlib.Path:
        return self.workdir / "records" / f"{stage}.json"

    def load_records(self, stage: str, upto: int | None = None,
                     complete: Callable[[list[dict]], bool] | None = None,
                     keys: tuple[str, ...] | None = None) -> list[dict]:
        """The records of `stage` (up to step `upto`); [] if there are none, or, with one
        warning line (the stage is evaluated again), if the file is damaged: not JSON, not a
        list of records that each hold `keys` (default: an evaluation's: method, run, step,
        eta, kl and every reward, numbers where numbers belong), or not what
        `complete` expects of them (every eta of a front, say)."""
        path = self._records(stage)
        if not path.exists():
            return []
        try:
            records = json.loads(path.read_text())
            problem = self._record_problem(records, keys, complete)
        except (ValueError, UnicodeDecodeError):
            problem = "not JSON"
        if problem:
            print(f"warning: {path} is {problem}; evaluating {stage} again", file=sys.stderr)
            return []
        return [r for r in records if upto is None or (r.get("step") or 0) <= upto]

    def _record_problem(self, records, keys, complete) -> str | None:
        """Why `records` are not a stage's records (None if they are)."""
        numbers = ("kl", *self.rewards)
        keys = keys or ("method", "run", "step", "eta", *numbers)
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            return "not a list of records"
        for i, record in enumerate(records):
            missing = [k for k in keys if k not in record]
            if missing:
                return f"incomplete (record {i} lacks {', '.join(missing)})"
            bad = [k for k in numbers if k in keys and not isinstance(record[k], int | float)]
            if bad:
                return f"damaged (record {i}: {', '.join(bad)} not a number)"
        if complete is not None and not complete(records):
            return "incomplete (records missing)"
        return None

    def save_records(self, stage: str, records: list[dict]) -> None:
        """Every process writes the same records (its own temporary file, then an atomic
        rename), so each finds them on resume, on a shared directory or its own disk."""
        path = self._records(stage)
        tmp = path.with_suffix(f".{jax.process_index()}.tmp")
        tmp.write_text(json.dumps(records, indent=1))
        os.replace(tmp, path)
        if self.on_record is not None:
            self.on_record()

    def train(self, stage: str, init, anchor: str, runs: list[tuple],
              steps: int, method: str, iteration: int, beta: float | None = None,
              anchor_method: str | None = None) -> list[Any]:
        """Trains len(runs) stacked runs from `init` (one policy, or one per run stacked on a
        leading axis), each with the random streams (prompt order and keys) named by its
        `(purpose, *indices)`, with `beta` in place of `rl.beta` if given; returns their
        final policies. With `anchor_method`, each evaluation also evaluates the runs' KL
        anchors (their EMA weights, with the EMA anchor), recorded under that method."""
        num_runs = len(runs)
        seed = self.config.seed
        orders = [streams.seed(seed, *run) for run in runs]
        run_keys = [streams.key(seed, *run) for run in runs]
        step_fn, init_fn = self.step_fn(anchor, num_runs, beta)
        # every run starts from `init`
        start, state, records = self._resume(stage, init_fn(init), steps, num_runs)
        self.logger.start(stage, start)
        batches = self.setup.train_prompts
        every = self.config.eval.every
        pending = None  # the previous step's metrics, read once the next step is dispatched

        def flush():
            if pending is not None:
                step, metrics = pending
                metrics = sharding.to_host(metrics)
                for m in range(num_runs):
                    self.logger.log(stage, m, step, {k: float(v[m]) for k, v in metrics.items()})

        for t in tqdm(range(start, steps), desc=stage, unit="step", initial=start, total=steps,
                      disable=not sharding.is_main_process()):
            prompts = tuple(jnp.stack(x) for x in zip(*(batches.batch(o, t) for o in orders),
                                                       strict=True))
            keys = jnp.stack([jax.random.fold_in(k, t) for k in run_keys])
            state, metrics = step_fn(state, prompts, keys)
            flush()
            pending = (t + 1, metrics)
            if (t + 1) % every == 0 or t + 1 == steps:
                flush()
                pending = None
                evaluated = [(method, state.params)]
                if anchor_method is not None:
                    evaluated.append((anchor_method, state.anchor_params))
                for (name, params), m in itertools.product(evaluated, range(num_runs)):
                    point = self.evaluate(self.unstack(params, m),
                                          f"{stage}, {name} {m}, step {t + 1}")
                    records.append({"method": name, "iteration": iteration, "run": m,
                                    "step": t + 1, "eta": None, **point})
                self.save_records(stage, records)
                self.ckpt.save(stage, t + 1, state)
        self.ckpt.wait()
        return [self.unstack(state.params, m) for m in range(num_runs)]

    def _resume(self, stage: str, state, steps: int, num_runs: int):
        """(step, state, records up to it) of `stage`'s latest good checkpoint, or
        (0, `state`, []) if it has none, or if its records are lost (it is redone)."""
        found = self.ckpt.restore_latest(stage, state)
        if found is None:
            return 0, state, []
        start, restored = found
        records = self.load_records(stage, upto=start)
        every = self.config.eval.every
        want = {(m, s) for m in range(num_runs) for s in range(1, start + 1)
                if s % every == 0 or s == steps}
        if {(r["run"], r["step"]) for r in records} >= want:
            return start, restored, records
        print(f"warning: {self._records(stage)} lacks evaluations up to step {start}; "
              f"training {stage} again from its start", file=sys.stderr)
        self.ckpt.remove(stage)
        return 0, state, []

    def front(self, stage: str, merged, method: str, iteration: int,
              etas) -> list[dict]:
        records = self.load_records(
            stage, complete=lambda rs: sorted(r["eta"] for r in rs) == sorted(etas))
        if records:  # evaluated before a resume
            return records
        for eta in etas:
            point = self.evaluate(self.liti(self.sft, merged, eta), f"{stage}, eta {eta:g}")
            records.append({"method": method, "iteration": iteration, "run": None,
                            "step": None, "eta": eta, **point})
        self.save_records(stage, records)
        return records

    @classmethod
    def start(cls, config, workdir: str | os.PathLike) -> Experiment:
        """Validates `config`, on a TPU compiles every program first if `plan_first`
        (`plan.check_fits`), validates the workdir (writable; made by this config if it holds
        a run: `workdir.record_config`), then prepares or restores what the experiment starts
        from."""
        validate_config(config)
        if config.plan_first and jax.default_backend() == "tpu":
            from warp_jax import plan

            plan.check_fits(config, jax.devices(), plan.chip_of(jax.devices()[0]))
        workdir = writable(workdir)
        record_config(config, workdir)
        return cls(config, workdir, prepare(config, workdir))

    def baselines(self, beta: float | None = None) -> list[dict]:
        """REINFORCE from the SFT policy with the SFT and the EMA anchor (as configured), for
        as many steps as WARP's runs take in all, `warp.baseline_runs` seeds of each (stacked;
        record `run` r is seed r), with `beta` in place of `rl.beta` if given; their
        evaluation records."""
        c, records = self.config, []
        runs = [("baseline", r) for r in range(c.warp.baseline_runs)]
        for name in c.warp.baselines:
            if name in ("reinforce_sft", "reinforce_ema"):
                self.train(f"baseline_{name}", self.sft, name.split("_")[1], runs,
                           c.warp.iterations * c.warp.steps, name, 0, beta=beta)
                records += self.load_records(f"baseline_{name}")
        return records

    def iteration_records(self, i: int, init, policies, merged) -> list[dict]:
        """Iteration i's records: its runs, the LITI front of its merge (and of LERP, the
        ablation, at i = 1), and its task-vector geometry (`records/iter{i}_geometry.json`)."""
        c, stage = self.config, f"iter{i}"
        records = self.load_records(stage) + self.front(f"{stage}_front", merged, "warp", i,
                                                        c.warp.eta_grid)
        if "lerp" in c.warp.baselines and i == 1:
            records += self.front(f"{stage}_lerp_front", self.lerp(init, policies), "lerp", i,
                                  c.warp.eta_grid)
        geometry = (evaluation.task_vector_stats(init, policies, merging.block_groups(init))
                    if len(policies) > 1 else {})
        if sharding.is_main_process():
            (self.workdir / "records" / f"{stage}_geometry.json").write_text(
                json.dumps(geometry, indent=1))
        return records

    def finish(self, records: list[dict], merged_final) -> None:
        """Closes checkpoints and logs, then writes the outputs (`report.write_outputs`)
        from the records, the final merge's LITI at `warp.export_eta` and samples."""
        self.ckpt.close()
        self.logger.close()
        c, setup = self.config, self.setup
        final = self.liti(self.sft, merged_final, c.warp.export_eta)
        samples = {name: self._samples(params) for name, params in (("SFT", self.sft),
                                                                     ("WARP", final))}
        write_outputs(self.workdir, c, records, sharding.to_host(final), setup.cfg,
                      setup.tokenizer, samples)

    def _samples(self, params, num: int = 4) -> list[tuple[str, str]]:
        """`num` held-out prompts and a completion of each by `params` (every process)."""
        c, setup = self.config, self.setup
        prompts = tuple(x[:num] for x in setup.eval_prompts)
        result = evaluation.evaluate_policy(
            params, self.sft, setup.cfg, prompts, streams.key(c.seed, "report_samples"), {},
            max_new_tokens=c.rl.max_new_tokens, temperature=c.rl.temperature, num_samples=1,
            eos_id=setup.end_ids, backend=c.rl.sampler_backend)
        texts = setup.tokenizer.decode_batch(*result["completions"])
        return list(zip(setup.eval_texts[:num], texts, strict=True))
