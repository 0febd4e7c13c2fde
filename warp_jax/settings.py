"""The experiment config read: every field's check (the data it must make, the mesh, the
decode layout), the mesh shape, the model configs it names and the RL settings it gives.
Nothing here trains or loads weights: the plan tool and the job's first step both call it."""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np

from warp_jax import data, reinforce, rewards, sharding, streams
from warp_jax.gemma import GemmaConfig, abstract_params, hf
from warp_jax.workdir import flatten

BASELINES = ("reinforce_sft", "reinforce_ema", "lerp")


def _fail(field: str, value: Any, valid: str) -> None:
    raise ValueError(f"config.{field} = {value!r}: {valid}")


def mesh_shape(c, num_devices: int) -> dict[str, int]:
    """The experiment's mesh on `num_devices` devices (`sharding.mesh_shape` of `c.mesh`,
    `c.warp.runs` and `c.rl.batch_size`), errors naming the config fields."""
    names = {f: f"config.mesh.{f}" for f in ("data", "fsdp", "model")}
    return sharding.mesh_shape(num_devices, runs=c.warp.runs, data=c.mesh.data,
                               fsdp=c.mesh.fsdp, model=c.mesh.model,
                               batch_size=c.rl.batch_size,
                               names={**names, "mesh": "config.mesh",
                                      "batch_size": "config.rl.batch_size"})


def validate_config(c, files: bool = True, num_devices: int | None = None) -> None:
    """Raises `ValueError` naming the first bad field, before anything is written.

    `files=False` skips the check that the local files exist (planning a job elsewhere);
    the mesh is checked on `num_devices` devices (default: this process's JAX devices).
    """
    for field, value in flatten(c.to_dict()).items():
        if isinstance(value, float) and not math.isfinite(value):
            _fail(field, value, "must be a finite number")
    for field in ("sft.learning_rate", "reward.learning_rate"):
        section, key = field.split(".")
        if not c[section][key] > 0:
            _fail(field, c[section][key], "must be positive")
    built_in = c.task.name in ("reviews", "rotten_tomatoes")
    if not built_in and c.task.name != "prompts":
        _fail("task.name", c.task.name, "use 'reviews' or 'rotten_tomatoes' (built-in), or "
              "'prompts'")
    if c.task.chat and built_in:
        _fail("task.chat", c.task.chat, "applies to task 'prompts' (an instruction-tuned "
              "checkpoint); the built-in tasks have no chat turns")
    for field in ("task.prompts", "model.hf_dir", "model.tokenizer", "reward.hf_dir"):
        section, key = field.split(".")
        path = c[section][key]
        if files and c.task.name == "prompts" and (not path or not os.path.exists(path)):
            _fail(field, path, "this variant needs an existing local path")
        if built_in and path:  # would be ignored: the run would not be theirs
            _fail(field, path, "is read by task 'prompts' only (add --config.task.name=prompts, "
                  f"or start from variant gemma_2b); the built-in task {c.task.name!r} trains "
                  "its own tokenizer, policy and reward model")
    positive = {"warp.iterations": c.warp.iterations, "warp.runs": c.warp.runs,
                "warp.baseline_runs": c.warp.baseline_runs,
                "warp.steps": c.warp.steps, "eval.every": c.eval.every,
                "eval.samples": c.eval.samples, "rl.batch_size": c.rl.batch_size,
                "task.eval_prompts": c.task.eval_prompts, "task.prompt_len": c.task.prompt_len,
                "task.prompt_words": c.task.prompt_words, "sft.max_len": c.sft.max_len,
                "reward.norm_samples": c.reward.norm_samples}
    for field, value in positive.items():
        if not isinstance(value, int) or value < 1:
            _fail(field, value, "must be a positive int")
    if c.eval.samples < 2:
        _fail("eval.samples", c.eval.samples, "needs >= 2 for standard errors")
    if not 0 <= c.warp.eta <= 1:
        _fail("warp.eta", c.warp.eta, "must be in [0, 1]")
    if not c.warp.eta_grid or any(not 0 <= e <= 1 for e in c.warp.eta_grid):
        _fail("warp.eta_grid", c.warp.eta_grid, "needs values in [0, 1]")
    if not 0 <= c.warp.export_eta <= 1:
        _fail("warp.export_eta", c.warp.export_eta, "must be in [0, 1]")
    if c.warp.granularity not in ("layer", "tensor"):
        _fail("warp.granularity", c.warp.granularity, "use 'layer' or 'tensor'")
    unknown = [b for b in c.warp.baselines if b not in BASELINES]
    if unknown:
        _fail("warp.baselines", tuple(c.warp.baselines), f"unknown {unknown}; use {BASELINES}")
    if c.reward.oracle not in ("vader", "gold", ""):
        _fail("reward.oracle", c.reward.oracle, "use 'vader', 'gold' (task 'rotten_tomatoes') "
              "or ''")
    if c.reward.oracle == "gold" and c.task.name != "rotten_tomatoes":
        _fail("reward.oracle", c.reward.oracle, "the gold classifier is fitted on real labelled "
              "reviews: use it with task 'rotten_tomatoes'")
    if c.reward.pooling not in rewards.POOLINGS:
        _fail("reward.pooling", c.reward.pooling, f"use {' or '.join(map(repr, rewards.POOLINGS))}")
    if c.reward.pooling != "last" and c.reward.hf_dir:
        _fail("reward.pooling", c.reward.pooling, "a reward model read from reward.hf_dir "
              "scores its last token: use 'last'")
    if c.reward.labels not in ("hard", "soft"):
        _fail("reward.labels", c.reward.labels, "use 'hard' or 'soft'")
    if c.reward.labels == "soft" and c.reward.oracle != "gold":
        _fail("reward.labels", c.reward.labels, "soft labels come from the gold classifier's "
              "probabilities: use them with reward.oracle = 'gold'")
    if not 0 < c.reward.pair_temperature < float("inf"):
        _fail("reward.pair_temperature", c.reward.pair_temperature, "must be > 0")
    for field in ("reward.warmup_steps", "reward.eval_every", "reward.patience"):
        section, key = field.split(".")
        value = c[section][key]
        if not isinstance(value, int) or value < 0:
            _fail(field, value, "must be an int >= 0")
    if c.reward.warmup_steps >= c.reward.steps > 0:
        _fail("reward.warmup_steps", c.reward.warmup_steps, f"must be below reward.steps "
              f"({c.reward.steps})")
    if c.reward.patience and not c.reward.eval_every:
        _fail("reward.patience", c.reward.patience, "early stopping needs held-out "
              "evaluations: set reward.eval_every")
    split = tuple(c.task.movie_split)
    if len(split) != 4 or any(not 0 < f <= 1 for f in split) or sum(split) > 1 + 1e-9:
        _fail("task.movie_split", split, "needs 4 shares in (0, 1] (SFT, gold, RL, evaluation "
              "movies) summing to at most 1")
    if not all(isinstance(p, str) and p for p in c.rl.stop_pieces):
        _fail("rl.stop_pieces", c.rl.stop_pieces, "needs a tuple of vocabulary pieces, "
              "e.g. ('<end_of_turn>',)")
    if not c.rl.grad_clip >= 0:
        _fail("rl.grad_clip", c.rl.grad_clip, "must be >= 0 (0: no clipping)")
    try:  # the RL fields: RLConfig owns their checks
        rl_config(c, anchor="ema", eos_id=None)
    except ValueError as e:
        raise ValueError(str(e).replace("RLConfig.", "config.rl.")) from None
    if c.rl.batch_size % c.rl.microbatches:
        _fail("rl.microbatches", c.rl.microbatches, f"must divide rl.batch_size "
              f"({c.rl.batch_size} prompts)")
    if c.task.long_prompts not in ("truncate", "refuse"):
        _fail("task.long_prompts", c.task.long_prompts, "use 'truncate' or 'refuse'")
    if not (isinstance(c.task.prompt_column, str) and c.task.prompt_column):
        _fail("task.prompt_column", c.task.prompt_column, "needs a column name")
    if c.model.dtype not in ("float32", "bfloat16"):
        _fail("model.dtype", c.model.dtype, "use 'float32' or 'bfloat16'")
    if built_in and c.rl.batch_size > c.task.num_prompts:
        _fail("rl.batch_size", c.rl.batch_size, f"exceeds task.num_prompts "
                                                 f"({c.task.num_prompts})")
    if c.task.name == "rotten_tomatoes":
        _validate_split(c)
    shape = mesh_shape(c, len(jax.devices()) if num_devices is None else num_devices)
    if c.rl.decode_layout != "train" and (not c.model.hf_dir
                                          or os.path.exists(f"{c.model.hf_dir}/config.json")):
        sharding.decode_tensor_parallel(abstract_params(model_configs(c)[0]), shape,
                                        c.rl.decode_layout, "config.rl.decode_layout")


MOVIE_PARTS = ("sft", "gold", "rl", "eval")  # task.movie_split's parts, in order


def _validate_split(c) -> None:
    """Refuses a Rotten Tomatoes split that cannot make the task's data: a part without a
    movie, RL prompts fewer than a batch, or prompts as long as the snippets they open."""
    split, snippets = tuple(c.task.movie_split), data.rotten_tomatoes()
    parts = data.split_by_movie(snippets, dict(zip(MOVIE_PARTS, split, strict=True)),
                                streams.seed(c.seed, "movie_split"))
    movies = len({s.movie for s in snippets})
    empty = [name for name, part in parts.items() if not part]
    if empty:
        _fail("task.movie_split", split, f"gives the {' and '.join(empty)} part(s) none of the "
              f"{movies} movies: each share needs at least {1 / movies:.2g}")
    words = int(np.median([len(s.text.split()) for s in parts["rl"]]))
    if c.task.prompt_words >= words:
        _fail("task.prompt_words", c.task.prompt_words, f"half the RL snippets have at most "
              f"{words} words: the prompts would be whole snippets with nothing to complete; "
              f"use fewer than {words}")
    prompts = len({data.opening(s.text, c.task.prompt_words) for s in parts["rl"]})
    if prompts < c.rl.batch_size:
        _fail("task.movie_split", split, f"gives the RL part {prompts} distinct prompts, "
              f"fewer than a batch (rl.batch_size = {c.rl.batch_size})")


def model_configs(c) -> tuple[GemmaConfig, GemmaConfig]:
    """The policy's and the reward model's `GemmaConfig` for config `c`, without weights:
    from `model.hf_dir`'s / `reward.hf_dir`'s config.json if set, else the variant's preset
    (the built-in task's vocabulary for it; the reward model then shares the architecture)."""
    if c.model.hf_dir:
        cfg = hf.read_config(c.model.hf_dir)
    else:
        overrides = dict(c.model.overrides)
        if c.task.name in ("reviews", "rotten_tomatoes"):
            overrides["vocab_size"] = c.task.vocab_size
        cfg = GemmaConfig.from_preset(c.model.preset, **overrides)
    cfg = cfg.replace(dtype=c.model.dtype, param_dtype="float32",
                      scan_layers=c.model.scan_layers)
    rm_cfg = hf.read_config(c.reward.hf_dir) if c.reward.hf_dir else cfg
    return cfg, rm_cfg.replace(dtype=c.model.dtype, param_dtype=c.model.dtype,
                               scan_layers=c.model.scan_layers)


def rl_config(c, anchor: str, eos_id) -> reinforce.RLConfig:
    """The `RLConfig` of config `c`'s runs with `anchor` ("ema", "sft" or "none") and the
    tokens that end a completion."""
    r = c.rl
    return reinforce.RLConfig(
        beta=r.beta, mu=r.mu, anchor=anchor, num_samples=r.num_samples, baseline=r.baseline,
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, eos_id=eos_id,
        learning_rate=r.learning_rate, warmup_steps=r.warmup_steps,
        grad_clip=r.grad_clip or None, adam_eps=r.adam_eps, microbatches=r.microbatches,
        remat=r.remat, sampler_backend=r.sampler_backend, decode_layout=r.decode_layout)
