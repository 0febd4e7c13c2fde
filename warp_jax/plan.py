"""Will the job fit on the slice I rent? Compile it for a TPU topology from this machine.

libtpu (`pip install "jax[tpu]==<our jax>"`) describes any Cloud TPU slice as compile-only
devices (`jax.experimental.topologies`), on which the job's mesh is built and every jitted
program of the WARP job is compiled by the real TPU compiler from abstract inputs: nothing is
allocated, and no weights, tokenizer or prompts are read. Each program's per-chip memory
comes from the compiler (`memory_analysis`), FLOPs and HBM bytes per call from its cost
analysis (which counts a loop's body once), the bytes its collectives move per chip from its
optimized HLO with every loop counted by its trips (`warp_jax.hlo`), and the step's time is
bounded below by a roofline of FLOPs and HBM bytes counted by hand and those collective bytes,
against the chip's published peaks.

`plan(config, topology(name))` is what `python -m experiments.plan` prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from warp_jax import (
    evaluation,
    hlo,
    merging,
    reinforce,
    rewards,
    sampling,
    settings,
    sharding,
)
from warp_jax.gemma import GemmaConfig, abstract_params


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's published figures, per chip."""
    hbm_gib: float
    bf16_tflops: float  # peak dense bfloat16 FLOP/s, in 1e12
    hbm_gbps: float  # HBM bandwidth, in 1e9 bytes/s
    cores: int  # TensorCores per chip: v4 and v5p names count cores, v5e and v6e names chips
    libtpu: str  # the generation's name in libtpu's topology names
    ici_gbps: float | None = None  # bidirectional inter-chip interconnect, 1e9 bytes/s


# Cloud TPU's published per-chip figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm;
# ICI: "Bidirectional inter-chip interconnect (ICI) bandwidth (per chip)" of the v5e, v5p and
# v6e pages, cloud.google.com/tpu/docs/v5e, /v5p, /v6e; the v4 page gives no per-chip figure).
CHIPS = {
    "v4": Chip(hbm_gib=32, bf16_tflops=275, hbm_gbps=1228, cores=2, libtpu="v4"),
    "v5e": Chip(hbm_gib=16, bf16_tflops=197, hbm_gbps=819, cores=1, libtpu="v5e", ici_gbps=400),
    "v5p": Chip(hbm_gib=95, bf16_tflops=459, hbm_gbps=2765, cores=2, libtpu="v5",
                ici_gbps=1200),
    "v6e": Chip(hbm_gib=32, bf16_tflops=918, hbm_gbps=1640, cores=1, libtpu="v6e", ici_gbps=800),
}
# Chips -> the slice's shape: v4/v5p chips form a 3-D torus, v5e/v6e chips a 2-D one.
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass
class Topology:
    name: str  # as Cloud TPU spells the accelerator type: v5p-128 (2xv5p-128: two slices)
    generation: str
    chip: Chip
    shape: tuple[int, ...]  # chips along each axis of one slice's torus
    devices: list  # compile-only devices, one per chip of every slice
    slices: int = 1


def topology(name: str) -> Topology:
    """The compile-only devices of a Cloud TPU slice: `v4-32`, `v5e-16` (`v5litepod-16`),
    `v5p-128`, `v6e-32`, or of several such slices joined over the data-center network
    (multi-slice: `2xv5p-128`). Raises `ValueError` for an unknown name, or without libtpu."""
    match = re.fullmatch(r"(?:([1-9]\d*)x)?(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if match is None:
        raise ValueError(f"--topology {name!r}: expected a Cloud TPU accelerator type, e.g. "
                         "v4-32, v5e-16 (or v5litepod-16), v5p-128, v6e-32, or N of them "
                         "(2xv5p-128)")
    slices = int(match[1] or 1)
    generation = {"v5litepod": "v5e"}.get(match[2], match[2])
    chip = CHIPS[generation]
    shapes = _SHAPES_3D if chip.cores == 2 else _SHAPES_2D
    chips, rest = divmod(int(match[3]), chip.cores)
    if rest or chips not in shapes:
        sizes = ", ".join(f"{generation}-{n * chip.cores}" for n in shapes)
        raise ValueError(f"--topology {name!r}: not a single-slice size; use one of {sizes}")
    shape = shapes[chips]
    if chip.cores == 2:  # a full cube of 4 or more chips a side wraps around in every axis
        wrap = (min(shape) >= 4,) * 3
    else:  # a 2-D slice wraps along an axis of 16 chips
        wrap = (*(d == 16 for d in shape), False)
    # Compile-only use claims no chip: several processes may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(
            topology_name=f"{chip.libtpu}:{'x'.join(map(str, shape))}", platform="tpu",
            chip_config_name="megacore" if chip.cores == 2 else "default",
            chips_per_host_bounds=(2, 2, 1), num_slices=slices, wrap=wrap)
    except (RuntimeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--topology {name}: libtpu could not describe it ({first[:160]}); "
                         f'install it with pip install "jax[tpu]=={jax.__version__}"') from None
    return Topology(name, generation, chip, shape, list(desc.devices), slices)


def chip_of(device) -> Chip:
    """The `Chip` of a real TPU device, its HBM as the runtime reports it where it does."""
    kind = device.device_kind.lower()
    generation = ("v5e" if "lite" in kind or "v5e" in kind else "v5p" if "v5" in kind
                  else "v6e" if "v6" in kind else "v4" if "v4" in kind else None)
    if generation is None:
        raise ValueError(f"no published figures for TPU kind {device.device_kind!r}")
    limit = (device.memory_stats() or {}).get("bytes_limit")
    chip = CHIPS[generation]
    return dataclasses.replace(chip, hbm_gib=limit / 2**30) if limit else chip


def check_fits(c, devices: list, chip: Chip) -> dict[str, Any]:
    """Compiles every program of config `c`'s job for `devices` (the job's own, before it
    starts: `--config.plan_first`); raises `ValueError` naming the first program that does
    not fit in `chip`'s HBM and by how much. Returns the reports."""
    programs, sizes = lowered_programs(c, devices)
    check_decode_copy(sizes, chip)
    reports = {}
    for name, lowered in programs.items():
        reports[name] = report = compile_report(lowered, chip, sizes["decode_trips"])
        if not report["fits"]:
            short = report.get("shortfall_gib",
                               round(report.get("peak_gib_per_chip", 0) - chip.hbm_gib, 2))
            raise ValueError(f"config.plan_first: {name} does not fit: short by {short} GiB of "
                             f"the {chip.hbm_gib:.1f} GiB per chip; plan a setting that fits "
                             "with python -m experiments.plan (docs/tpu.md)")
    return reports


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _params(boxed, mesh) -> Any:
    """Abstract params with the shardings `sharding.param_shardings` gives them."""
    import flax.linen as nn

    return _abstract(nn.unbox(boxed), sharding.param_shardings(boxed, mesh))


def lowered_programs(c, devices: list) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every jitted program of the WARP job of config `c` on `devices`, lowered from abstract
    inputs: the stacked train step (one program with a model reward), its init, the
    baselines' step (`warp.baseline_runs` stacked runs), the evaluation's sampler and KL, the
    SLERP of the runs and LITI. Also returns the mesh shape and sizes the report needs. The
    sampler backend "auto" is planned as "xla", what it picks on a TPU."""
    settings.validate_config(c, files=False, num_devices=len(devices))
    c = c.copy_and_resolve_references()
    if c.rl.sampler_backend == "auto":  # what "auto" picks on the slice, not on this host
        c.rl.sampler_backend = "xla"
    cfg, rm_cfg = settings.model_configs(c)
    shape = settings.mesh_shape(c, len(devices))
    mesh = sharding.make_mesh(**shape, devices=devices)
    runs = c.warp.runs
    params = _params(abstract_params(cfg), mesh)
    reward = rewards.model_reward(rm_cfg, _params(rewards.abstract_params(rm_cfg), mesh),
                                  c.reward.pooling)
    train_step, init = reinforce.make_train_step(
        cfg, settings.rl_config(c, "ema", eos_id=1), reward, mesh=mesh, num_runs=runs)
    shards, layout = train_step.shardings, train_step.layout
    state = _abstract(jax.eval_shape(init, params), shards.state)
    rows = (runs, c.rl.batch_size, c.task.prompt_len)
    prompts = (jax.ShapeDtypeStruct(rows, jnp.int32, sharding=shards.prompts[0]),
               jax.ShapeDtypeStruct(rows, jnp.bool_, sharding=shards.prompts[1]))
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), runs))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=shards.keys)
    programs = {f"train_step/{k}": v for k, v in train_step.lower(state, prompts, keys).items()}
    programs["init"] = init.lower(params)
    if {"reinforce_sft", "reinforce_ema"} & set(c.warp.baselines):  # their seeds stacked
        n = c.warp.baseline_runs
        step_b, init_b = reinforce.make_train_step(
            cfg, settings.rl_config(c, "ema", eos_id=1), reward, mesh=mesh, num_runs=n)
        state_b = _abstract(jax.eval_shape(init_b, params), step_b.shardings.state)
        inputs_b = [jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype, sharding=sh)
                    for x, sh in zip((*prompts, keys), (*step_b.shardings.prompts,
                                                        step_b.shardings.keys), strict=True)]
        programs |= {f"baseline_step/{k}": v
                     for k, v in step_b.lower(state_b, tuple(inputs_b[:2]),
                                              inputs_b[2]).items()}
    rows = evaluation.prompt_sharding(mesh, c.task.eval_prompts)  # as evaluate_policy
    eval_prompts = [jax.ShapeDtypeStruct((c.task.eval_prompts, c.task.prompt_len), dtype,
                                         sharding=rows or sharding.replicated(mesh))
                    for dtype in (jnp.int32, jnp.bool_)]
    with contextlib.nullcontext() if rows is None else sharding.activation_sharding(mesh):
        programs["evaluate"] = evaluation.sample_and_kl.lower(
            params, params, *eval_prompts, jax.eval_shape(lambda: jax.random.key(0)),
            cfg=cfg, max_new_tokens=c.rl.max_new_tokens, temperature=c.rl.temperature,
            num_samples=c.eval.samples, eos_id=(1,),
            backend=sampling.get_backend(c.rl.sampler_backend), layout=layout)
    groups = merging.block_groups(params) if c.warp.granularity == "layer" else None
    out = dict(out_shardings=jax.tree.map(lambda x: x.sharding, params))
    policies = [params] * runs
    programs["slerp"] = jax.jit(functools.partial(merging.slerp_tree, groups=groups),
                                **out).lower(params, policies)
    programs["liti"] = jax.jit(merging.liti_tree, **out).lower(params, params, c.warp.eta)
    decode = None if layout is None else {"tensor_parallel": layout.tensor_parallel,
                                          "data_parallel": layout.data_parallel}
    sizes = dict(mesh=shape, cfg=cfg, rm_cfg=rm_cfg, state_gib_per_chip=gib_per_chip(state),
                 decode_layout=decode, decode_trips=c.rl.max_new_tokens,
                 dtype_bytes=jnp.dtype(c.model.dtype).itemsize)
    return programs, sizes


def check_decode_copy(sizes: dict[str, Any], chip: Chip) -> None:
    """Raises `ValueError` (before any compile) where the policy's copy in the decode layout
    alone, in the compute dtype, exceeds the chip's HBM."""
    layout = sizes["decode_layout"]
    if layout is None:
        return
    copy = matmul_params(sizes["cfg"]) * sizes["dtype_bytes"] / layout["tensor_parallel"] / 2**30
    if copy > chip.hbm_gib:
        raise ValueError(f"config.rl.decode_layout: the policy's copy for sampling takes "
                         f"{copy:.1f} GiB per chip at tensor parallelism "
                         f"{layout['tensor_parallel']}, more than the chip's {chip.hbm_gib:.1f} "
                         "GiB; raise mesh.model, or sample on the training layout "
                         "(--config.rl.decode_layout=train)")


def gib_per_chip(tree) -> float:
    """GiB that the largest shard of each array of `tree` (`ShapeDtypeStruct`s with
    shardings) takes on one chip, summed."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree)) / 2**30


def matmul_params(cfg: GemmaConfig, per_token: bool = False) -> int:
    """Weights that take part in a model's matmuls: every block's projections and MLP, and
    the tied embedding as the output layer (the lookup itself is no matmul). Gemma 4: each
    layer's own head shapes, no key/value projections on KV-shared layers, one on k = v
    layers, the per-layer input projections, the router and every expert, or (`per_token`,
    for FLOPs) the k experts a token is routed to."""
    d, p = cfg.embed_dim, cfg.per_layer_input_dim
    total = cfg.vocab_size * d + d * cfg.num_layers * p
    for i, (kind, source) in enumerate(zip(cfg.attention_types, cfg.kv_sources, strict=True)):
        h = cfg.head_dim_of(kind)
        kv = 0 if source is not None else (1 if cfg.values_are_keys(kind) else 2)
        total += d * h * (2 * cfg.num_heads + kv * cfg.kv_heads_of(kind))
        total += 3 * d * cfg.mlp_dim_of(i) + 2 * d * p
        experts = cfg.experts_per_token if per_token else cfg.num_experts
        total += experts * 3 * d * cfg.expert_mlp_dim + cfg.num_experts * d
    return total


def step_flops(c, cfg: GemmaConfig, rm_cfg: GemmaConfig) -> float:
    """Matmul FLOPs of one train step of all runs, counted by hand (attention scores left
    out): per token of the M x B x K sequences of P + T tokens, 2 N to sample, 2 N for the
    anchor's log-probs, 6 N for the policy's forward and backward (8 N with remat), and
    2 N_rm for the reward model; N counts the weights one token's matmuls use (a mixture of
    experts: the k experts it is routed to).
    """
    tokens = c.warp.runs * c.rl.batch_size * c.rl.num_samples * (
        c.task.prompt_len + c.rl.max_new_tokens)
    policy = (2 + 2 + (8 if c.rl.remat else 6)) * matmul_params(cfg, per_token=True)
    return float(tokens * (policy + 2 * matmul_params(rm_cfg, per_token=True)))


def step_hbm_bytes(c, cfg: GemmaConfig, rm_cfg: GemmaConfig, mesh: dict[str, int],
                   state_gib_per_chip: float, decode_tp: int | None = None) -> float:
    """A lower bound on the HBM bytes one chip moves in one train step, counted by hand:
    every pass over its run's model reads the weights the chip computes with once, in the
    compute dtype: split over the decode layout's `decode_tp` devices while sampling (or, on
    the training layout, gathered over `fsdp` and split over `model`), gathered over `fsdp`
    and split over `model` in the other passes; and the update reads and writes the chip's
    share of the runs' state once. Passes: a prefill and one per new token to sample, the
    anchor's log-probs, the policy's forward and backward (one more forward with remat), per
    microbatch, and the reward model's forward. Activations, the KV cache and the collectives
    are left out, so the bound stays a bound. (XLA's cost analysis counts a loop's body once,
    so its bytes miss the sampler's tokens and scanned layers.)"""
    dtype = jnp.dtype(c.model.dtype).itemsize
    sampling_passes = 1 + c.rl.max_new_tokens
    passes = c.rl.microbatches * (1 + 2 + bool(c.rl.remat))
    weights = (sampling_passes * matmul_params(cfg) / (decode_tp or mesh["model"])
               + (passes * matmul_params(cfg) + matmul_params(rm_cfg)) / mesh["model"])
    return float(weights * dtype + 2 * state_gib_per_chip * 2**30)


# The TPU compiler's two ways of saying a program does not fit (sizes in GiB, "773.00M").
_OOM = (re.compile(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm"),
        re.compile(r"memory required for .*?\(([\d.]+[KMGT]?)\) exceeds available HBM "
                   r"\(([\d.]+[KMGT]?)\)"))


def _gib(size: str) -> float:
    scale = {"K": 2.0**-20, "M": 2.0**-10, "G": 1.0, "T": 2.0**10}.get(size[-1], 2.0**-30)
    return float(size.rstrip("KMGT")) * scale


def compile_report(lowered, chip: Chip, decode_trips: int = 1) -> dict[str, Any]:
    """Compiles `lowered` and reports its per-chip memory, cost, collectives and compile time;
    a program the compiler finds too large for HBM reports `fits: False` with the shortfall.

    `collective_bytes` are the bytes each kind of collective moves per chip per call
    (`hlo.traffic`: loops by their trips, the sampler's decode loop by its bound,
    `max_new_tokens`; `decode_trips` for a loop whose trips nothing tells); `collective_loops`
    the loops that hold collectives."""
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        oom = next((m for m in (p.search(str(e)) for p in _OOM) if m), None)
        if "RESOURCE_EXHAUSTED" not in str(e) or oom is None:
            raise
        used, hbm = _gib(oom[1]), _gib(oom[2])
        return {"fits": False, "compile_s": round(time.perf_counter() - start, 1),
                "used_gib": round(used, 2), "hbm_gib": round(hbm, 2),
                "shortfall_gib": round(used - hbm, 2)}
    seconds = time.perf_counter() - start
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis() or {}
    text = compiled.as_text()
    traffic = hlo.traffic(text, decode_trips)
    gib = 2.0 ** -30
    peak = memory.peak_memory_in_bytes or (memory.argument_size_in_bytes
                                           + memory.output_size_in_bytes
                                           + memory.temp_size_in_bytes
                                           - memory.alias_size_in_bytes)
    return {
        "fits": peak * gib <= chip.hbm_gib,
        "peak_gib_per_chip": round(peak * gib, 3),
        "arguments_gib": round(memory.argument_size_in_bytes * gib, 3),
        "outputs_gib": round(memory.output_size_in_bytes * gib, 3),
        "temporaries_gib": round(memory.temp_size_in_bytes * gib, 3),
        "generated_code_mib": round(memory.generated_code_size_in_bytes / 2**20, 1),
        "compile_s": round(seconds, 1),
        "flops": max(float(cost.get("flops", 0.0)), 0.0),
        "bytes": float(cost.get("bytes accessed", 0.0)),
        "collectives": collectives(text),
        "collective_bytes": traffic.bytes,
        "collective_loops": traffic.loops,
    }


def collectives(hlo_text: str) -> dict[str, int]:
    """How many collective instructions of each kind the compiled HLO holds (an asynchronous
    pair once; a fused all-reduce-scatter as a reduce-scatter, as `hlo.traffic` counts it)."""
    counts = dict.fromkeys(hlo.KINDS, 0)
    for kind in hlo.instructions(hlo_text):
        counts[kind] += 1
    return counts


def plan(c, topo: Topology, progress=print) -> dict[str, Any]:
    """The plan of config `c` on `topo`: per program, its report (`compile_report`), and for
    the train step a roofline lower bound on its time and upper bound on MFU: the largest of
    its matmul FLOPs over the chips' peak, its HBM bytes per chip (both counted by hand) over
    the chip's bandwidth, and its collective bytes per chip (read from the compiled program)
    over the chip's ICI bandwidth (`ici_bound_s`; None where no figure is published)."""
    programs, sizes = lowered_programs(c, topo.devices)
    chips, chip = len(topo.devices), topo.chip
    check_decode_copy(sizes, chip)
    reports = {}
    state = sizes["state_gib_per_chip"]
    if state > chip.hbm_gib:  # known without a compile: the step's arguments alone overflow
        progress(f"the runs' state alone takes {state:.1f} GiB per chip: not compiling")
        reports = {"train_step/step": {"fits": False, "compile_s": 0.0,
                                       "used_gib": round(state, 2), "hbm_gib": chip.hbm_gib,
                                       "shortfall_gib": round(state - chip.hbm_gib, 2)}}
        programs = {}
    for name, lowered in programs.items():
        progress(f"compiling {name} for {topo.name} ...")
        reports[name] = compile_report(lowered, chip, sizes["decode_trips"])
    flops = step_flops(c, sizes["cfg"], sizes["rm_cfg"])
    step = [r for n, r in reports.items() if n.startswith("train_step/") and r["fits"]]
    roofline = None
    if step and len(step) == sum(n.startswith("train_step/") for n in reports):
        layout = sizes["decode_layout"]
        hbm_bytes = step_hbm_bytes(c, sizes["cfg"], sizes["rm_cfg"], sizes["mesh"],
                                   sizes["state_gib_per_chip"],
                                   layout and layout["tensor_parallel"])
        ici_bytes = sum(sum(r["collective_bytes"].values()) for r in step)
        compute_s = flops / chips / (chip.bf16_tflops * 1e12)
        memory_s = hbm_bytes / (chip.hbm_gbps * 1e9)
        ici_s = ici_bytes / (chip.ici_gbps * 1e9) if chip.ici_gbps else None
        bound = max(compute_s, memory_s, ici_s or 0.0)
        roofline = {"analytic_flops": flops, "analytic_hbm_bytes_per_chip": hbm_bytes,
                    "collective_bytes_per_chip": ici_bytes, "compute_bound_s": compute_s,
                    "hbm_bound_s": memory_s, "ici_bound_s": ici_s,
                    "step_time_lower_bound_s": bound, "mfu_upper_bound": compute_s / bound}
    return {"topology": topo.name, "chips": chips, "hbm_gib_per_chip": chip.hbm_gib,
            "chip": dataclasses.asdict(chip), "mesh": sizes["mesh"],
            "decode_layout": sizes["decode_layout"],
            "state_gib_per_chip": round(sizes["state_gib_per_chip"], 3),
            "fits": all(r["fits"] for r in reports.values()), "programs": reports,
            "train_step_roofline": roofline}
