"""The experiment around WARP's Algorithm 1 (`warp.run`): the stacked RL runs with their
checkpoints and metrics, the jitted merges, evaluation records, fronts, task-vector geometry,
the baselines and the outputs.

Every stage is checkpointed under `workdir/checkpoints/<stage>` (runs every `eval.every`
steps, merges once), and the evaluation records of each stage under
`workdir/records/<stage>.json`, so a run resumes after a kill at any moment and produces the
same `pareto_front.json` as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from warp_jax import evaluation, merging, reinforce, rewards, sharding, streams
from warp_jax.checkpoint import Checkpoints
from warp_jax.gemma import block_groups
from warp_jax.ingredients import Ingredients, mesh_shape, prepare, rl_config, validate_config
from warp_jax.report import write_outputs


class _Logger:
    """Training metrics to `metrics.jsonl` and TensorBoard (from process 0 only)."""

    def __init__(self, workdir: pathlib.Path):
        from tensorboardX import SummaryWriter

        self._on = sharding.is_main_process()
        if self._on:
            self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def log(self, stage: str, run: int, step: int, metrics: dict[str, float]) -> None:
        if not self._on:
            return
        self._jsonl.write(json.dumps({"stage": stage, "run": run, "step": step, **metrics})
                          + "\n")
        for name, value in metrics.items():
            self._tb.add_scalar(f"{stage}/run{run}/{name}", value, step)

    def close(self) -> None:
        if self._on:
            self._jsonl.close()
            self._tb.close()


class Experiment:
    """Everything around Algorithm 1: the ingredients, the mesh, checkpoints, metrics, the
    jitted merges, stacked RL runs, evaluation records, fronts and geometry, the outputs.

    Built by `Experiment.start(config, workdir)`, which validates the config and prepares
    (or restores) the tokenizer, SFT policy, rewards and prompts.
    """

    def __init__(self, config, workdir: pathlib.Path, setup: Ingredients):
        self.config, self.workdir, self.setup = config, workdir, setup
        self.ckpt = Checkpoints(workdir / "checkpoints", max_to_keep=1)
        self.logger = _Logger(workdir)
        (workdir / "records").mkdir(exist_ok=True)
        self.mesh = sharding.make_mesh(**mesh_shape(config, len(jax.devices())))
        self.param_sharding = sharding.param_shardings(setup.boxed_params, self.mesh)
        self.sft = jax.device_put(setup.sft_params, self.param_sharding)
        rm_cfg, rm_params = setup.reward_model
        rm_params = jax.device_put(rm_params, sharding.param_shardings(
            rewards.abstract_params(rm_cfg), self.mesh))
        self.rewards = {"proxy_reward": rewards.model_reward(rm_cfg, rm_params)}
        if setup.oracle is not None:
            self.rewards["oracle_reward"] = setup.oracle
        self.groups = (block_groups(setup.sft_params) if config.warp.granularity == "layer"
                       else None)
        # The merges and the unstacking of a run as one program each, with the params'
        # sharding out (op by op, every op on arrays spanning processes is its own program).
        out = dict(out_shardings=self.param_sharding)
        self.slerp = jax.jit(functools.partial(merging.slerp_tree, groups=self.groups), **out)
        self.lerp = jax.jit(merging.lerp_tree, **out)
        self.liti = jax.jit(merging.liti_tree, **out)
        self.unstack = jax.jit(lambda stacked, m: jax.tree.map(lambda x: x[m], stacked), **out)
        self._steps: dict[tuple[str, int], Any] = {}

    def step_fn(self, anchor: str, num_runs: int):
        key = (anchor, num_runs)
        if key not in self._steps:
            self._steps[key] = reinforce.make_train_step(
                self.setup.cfg, rl_config(self.config, anchor, self.setup.end_ids),
                self.rewards["proxy_reward"],
                mesh=self.mesh, num_runs=num_runs)
        return self._steps[key]

    def evaluate(self, params) -> dict[str, Any]:
        """Every point is evaluated with the same key (common random numbers), so differences
        between points are not sampling noise of the held-out completions' draws."""
        c = self.config
        result = evaluation.evaluate_policy(
            params, self.sft, self.setup.cfg, self.setup.eval_prompts, streams.key(c.seed, "eval"),
            self.rewards, max_new_tokens=c.rl.max_new_tokens,
            temperature=c.rl.temperature, num_samples=c.eval.samples,
            eos_id=self.setup.end_ids, backend=c.rl.sampler_backend)
        result.pop("completions")
        return {k: round(v, 6) for k, v in result.items()}

    def _records(self, stage: str) -> pathlib.Path:
        return self.workdir / "records" / f"{stage}.json"

    def load_records(self, stage: str, upto: int | None = None) -> list[dict]:
        path = self._records(stage)
        if not path.exists():
            return []
        records = json.loads(path.read_text())
        return [r for r in records if upto is None or r.get("step", 0) <= upto]

    def save_records(self, stage: str, records: list[dict]) -> None:
        """Every process writes the same records (its own temporary file, then an atomic
        rename), so each finds them on resume, on a shared directory or its own disk."""
        path = self._records(stage)
        tmp = path.with_suffix(f".{jax.process_index()}.tmp")
        tmp.write_text(json.dumps(records, indent=1))
        os.replace(tmp, path)

    def train(self, stage: str, init, anchor: str, runs: list[tuple],
              steps: int, method: str, iteration: int) -> list[Any]:
        """Trains len(runs) stacked runs from `init`, each with the random streams (prompt
        order and keys) named by its `(purpose, *indices)`; returns their final policies."""
        num_runs = len(runs)
        seed = self.config.seed
        orders = [streams.seed(seed, *run) for run in runs]
        run_keys = [streams.key(seed, *run) for run in runs]
        step_fn, init_fn = self.step_fn(anchor, num_runs)
        state = init_fn(init)  # every run starts from `init`
        start = self.ckpt.latest_step(stage) or 0
        records = []
        if start:
            state = self.ckpt.restore(stage, state)
            records = self.load_records(stage, upto=start)
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
                for m in range(num_runs):
                    point = self.evaluate(self.unstack(state.params, m))
                    records.append({"method": method, "iteration": iteration, "run": m,
                                    "step": t + 1, "eta": None, **point})
                self.save_records(stage, records)
                self.ckpt.save(stage, t + 1, state)
        self.ckpt.wait()
        return [self.unstack(state.params, m) for m in range(num_runs)]

    def front(self, stage: str, merged, method: str, iteration: int,
              etas) -> list[dict]:
        if self._records(stage).exists():  # evaluated before a resume
            return self.load_records(stage)
        records = []
        for eta in etas:
            point = self.evaluate(self.liti(self.sft, merged, eta))
            records.append({"method": method, "iteration": iteration, "run": None,
                            "step": None, "eta": eta, **point})
        self.save_records(stage, records)
        return records

    @classmethod
    def start(cls, config, workdir: str | os.PathLike) -> Experiment:
        """Validates `config`, then prepares or restores what the experiment starts from."""
        validate_config(config)
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        return cls(config, workdir, prepare(config, workdir))

    def baselines(self) -> list[dict]:
        """REINFORCE from the SFT policy with the SFT and the EMA anchor (as configured), for
        as many steps as WARP's runs take in all; their evaluation records."""
        c, records = self.config, []
        for name in c.warp.baselines:
            if name in ("reinforce_sft", "reinforce_ema"):
                self.train(f"baseline_{name}", self.sft, name.split("_")[1], [("baseline", 0)],
                           c.warp.iterations * c.warp.steps, name, 0)
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
        geometry = (evaluation.task_vector_stats(init, policies, block_groups(init))
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
