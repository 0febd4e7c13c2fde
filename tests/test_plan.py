"""Planning the job for TPU slices with the real TPU compiler (libtpu's compile-only devices);
the suite itself still runs on the 8 emulated CPU devices."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from experiments.configs.gemma_warp import get_config
from warp_jax import gemma, hlo, plan, settings, sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"{ROOT}/experiments/configs/gemma_warp.py"


def _plan(*flags):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "experiments.plan", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_the_suite_runs_on_cpu_with_libtpu_installed():
    assert jax.default_backend() == "cpu" and len(jax.devices()) == 8


@pytest.mark.parametrize("name, chips, shape", [
    ("v4-16", 8, (2, 2, 2)), ("v4-512", 256, (4, 8, 8)), ("v5e-8", 8, (2, 4)),
    ("v5litepod-16", 16, (4, 4)), ("v5e-256", 256, (16, 16)), ("v5p-64", 32, (2, 4, 4)),
    ("v5p-128", 64, (4, 4, 4)), ("v6e-32", 32, (4, 8)), ("v6e-256", 256, (16, 16))])
def test_topologies_and_the_meshes_of_the_tpu_variants(name, chips, shape):
    topo = plan.topology(name)
    assert (len(topo.devices), topo.shape) == (chips, shape)
    assert all(d.platform == "tpu" for d in topo.devices)
    for variant in ("gemma_2b", "gemma_7b_paper", "gemma4_e4b", "gemma4_26b_a4b"):
        config = get_config(variant)
        config.rl.batch_size = max(config.rl.batch_size, chips // 2)
        mesh = sharding.make_mesh(**settings.mesh_shape(config, chips), devices=topo.devices)
        assert dict(mesh.shape) == {"run": 2, "data": 1, "fsdp": chips // 2, "model": 1}
        assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in topo.devices)


def test_multislice_meshes_give_every_run_slices_of_its_own():
    topo = plan.topology("2xv5p-128")
    assert (len(topo.devices), topo.slices) == (128, 2)
    mesh = sharding.make_mesh(**settings.mesh_shape(get_config("gemma_7b_paper"), 128),
                              devices=topo.devices)
    assert dict(mesh.shape) == {"run": 2, "data": 1, "fsdp": 64, "model": 1}
    assert [{d.slice_index for d in mesh.devices[m].flat} for m in range(2)] == [{0}, {1}]
    # One run over four slices: its fsdp axis spans them.
    topo = plan.topology("4xv5e-16")
    mesh = sharding.make_mesh(run=1, fsdp=64, devices=topo.devices)
    assert {d.slice_index for d in mesh.devices[0, 0, :16].flat} == {0}
    with pytest.raises(ValueError, match=r"over 4 slices: run, data or fsdp must be a multiple "
                                         r"of 4"):
        sharding.make_mesh(run=2, fsdp=2, model=16, devices=topo.devices)


def test_unknown_topologies_are_one_clear_error():
    with pytest.raises(ValueError, match=r"--topology 'v5p-127': not a single-slice size; use "
                                         r"one of v5p-8, v5p-16"):
        plan.topology("v5p-127")
    with pytest.raises(ValueError, match=r"--topology 'tpu7': expected a Cloud TPU accelerator "
                                         r"type"):
        plan.topology("tpu7")


@pytest.mark.parametrize("scan", [False, True])
def test_the_tiny_job_plans_on_a_tpu_slice_without_resharding(tmp_path, scan):
    out = tmp_path / "plan.json"
    code, stdout, stderr = _plan(f"--config={CONFIG}:test", "--topology=v5e-8", f"--out={out}",
                                 f"--config.model.scan_layers={scan}")
    assert code == 0, stderr[-3000:]
    assert "Involuntary full rematerialization" not in stderr
    result = json.loads(out.read_text())
    assert (result["topology"], result["chips"], result["hbm_gib_per_chip"]) == ("v5e-8", 8, 16)
    assert result["mesh"] == {"run": 2, "data": 4, "fsdp": 1, "model": 1} and result["fits"]
    assert set(result["programs"]) == {"train_step/step", "init", "baseline_step/step",
                                       "evaluate", "slerp", "liti"}
    for report in result["programs"].values():
        assert report["fits"] and 0 < report["peak_gib_per_chip"] < 16
        assert report["compile_s"] >= 0 and report["flops"] >= 0 and report["bytes"] > 0
    # data = 4: each run's gradient is summed over its data-parallel devices, and with the
    # weights replicated no program gathers any.
    assert result["programs"]["train_step/step"]["collectives"]["all-reduce"] > 0
    for report in result["programs"].values():
        assert report["collectives"]["all-gather"] == 0
    roofline = result["train_step_roofline"]
    assert roofline["step_time_lower_bound_s"] >= max(roofline["ici_bound_s"], 1e-9)
    assert roofline["collective_bytes_per_chip"] == sum(
        result["programs"]["train_step/step"]["collective_bytes"].values()) > 0
    assert "| train_step/step | yes |" in stdout
    assert result["row"].startswith("| `test --topology=v5e-8 --config.model.scan_layers=")
    assert result["row"] in stdout and result["compiled_on"] in stdout


def test_plan_counts_the_weights_each_sampled_token_gathers():
    """A tiny FSDP job (4 chips per run of a v5e-8) compiled by the TPU compiler: on the
    training layout the decode loop all-gathers each chip's missing 3/4 of every matrix for
    every token (at least 2 bytes a weight: the compiler moves float32 matmul operands as
    bfloat16); in the decode layout it gathers no weight, under 1% of the float32 model per
    token, the weights moving once per step instead."""
    config = get_config("test")
    config.mesh.data = 1
    config.model.overrides.update(embed_dim=256, mlp_dim=1024)  # the weights dominate
    topo = plan.topology("v5e-8")
    gathered = {}
    for layout in ("train", "auto"):
        config.rl.decode_layout = layout
        programs, sizes = plan.lowered_programs(config, topo.devices)
        report = plan.compile_report(programs["train_step/step"], topo.chip,
                                     sizes["decode_trips"])
        decode = [loop for loop in report["collective_loops"]
                  if loop["trips"] == config.rl.max_new_tokens]
        assert len(decode) == 1 and decode[0]["trips_from"] == "condition", decode
        gathered[layout] = decode[0]["bytes_per_trip"].get("all-gather", 0.0)
        assert set(report["collective_bytes"]) == set(hlo.KINDS)
        assert report["collective_bytes"]["all-gather"] >= (
            config.rl.max_new_tokens * gathered[layout])
    matrices = sum(math.prod(x.shape) for x in jax.tree.leaves(
        gemma.abstract_params(sizes["cfg"])) if x.ndim >= 2)
    assert gathered["train"] >= 3 / 4 * 2 * matrices, (gathered, matrices)
    assert gathered["auto"] < 0.01 * 4 * matrices, (gathered, matrices)
    assert sizes["decode_layout"] == {"tensor_parallel": 4, "data_parallel": 1}


def test_fsdp_gathers_each_weight_once_or_twice_per_gradient():
    """A tiny Gemma's loss gradient compiled by the TPU compiler for 8 v5e chips that split its
    weights (FSDP): every weight is gathered for the forward pass and at most once more for
    the backward, so the all-gathers move between 1 and 2 times 7/8 of the weights. The TPU
    compiler overlaps most gathers with matmuls, writing each as a chain of fusions that each
    hold a copy of it (`hlo`): counted per copy, this program gathered 7.5 times the
    weights."""
    cfg = gemma.GemmaConfig.from_preset("tiny", embed_dim=256, mlp_dim=1024, vocab_size=4096,
                                        dtype="bfloat16", param_dtype="bfloat16")
    mesh = sharding.make_mesh(fsdp=8, devices=plan.topology("v5e-8").devices)
    tokens = jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
    boxed = jax.eval_shape(lambda: gemma.Gemma(cfg).init(jax.random.key(0), jnp.zeros(
        tokens.shape, tokens.dtype)))["params"]
    shardings = sharding.param_shardings(boxed, mesh)
    params = jax.tree.map(lambda b, sh: jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=sh),
                          nn.unbox(boxed), shardings)

    def loss(p, t):
        return jnp.sum(gemma.Gemma(cfg).apply({"params": p}, t)[0].astype(jnp.float32))

    with sharding.activation_sharding(mesh):
        text = jax.jit(jax.grad(loss), out_shardings=shardings).lower(
            params, tokens).compile().as_text()
    gathered = hlo.traffic(text).bytes["all-gather"]
    weights = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
    assert weights * 7 / 8 <= gathered <= 2 * weights * 7 / 8, (gathered, weights)


@pytest.mark.parametrize("preset, layers", [("tiny_gemma4", 6), ("tiny_gemma4_moe", 2)])
def test_tiny_gemma4_jobs_plan_on_a_tpu_slice_without_resharding(tmp_path, preset, layers):
    """The TPU compiler takes every program of a Gemma 4 job: per-layer inputs, KV sharing and
    experts, with no resharding it cannot follow."""
    out = tmp_path / "plan.json"
    code, _, stderr = _plan(f"--config={CONFIG}:test", "--topology=v5e-8", f"--out={out}",
                            f"--config.model.preset={preset}",
                            f"--config.model.overrides.num_layers={layers}")
    assert code == 0, stderr[-3000:]
    assert "Involuntary full rematerialization" not in stderr
    result = json.loads(out.read_text())
    assert result["fits"] and all(r["fits"] for r in result["programs"].values())
    assert all(r["collectives"]["all-gather"] == 0 for r in result["programs"].values())


def test_a_job_that_does_not_fit_is_one_line_naming_what_overflows():
    # A 2-layer model with a 2M x 2048 embedding: 16 GiB of float32 weights, replicated over
    # `data`, four times over with the EMA anchor and Adam's moments: over a v5e's 16 GiB.
    code, stdout, stderr = _plan(f"--config={CONFIG}:test", "--topology=v5e-8",
                                 "--config.task.vocab_size=2000000",
                                 "--config.model.overrides.embed_dim=2048")
    assert code == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: train_step/step does not fit on v5e-8: short by "), last
    assert last.endswith("GiB of the 16 GiB per chip; the runs' state alone (weights, EMA "
                         "anchors, Adam moments) takes 61.1 GiB per chip; use more chips"), last
    assert "| train_step/step | **no**: needs " in stdout


def test_plan_first_stops_the_job_naming_the_program_that_does_not_fit():
    topo = plan.topology("v5e-8")
    small = dataclasses.replace(topo.chip, hbm_gib=0.001)  # 1 MiB of HBM
    with pytest.raises(ValueError, match=r"config.plan_first: train_step/step does not fit: "
                                         r"short by [\d.]+ GiB of the 0.0 GiB per chip; plan a "
                                         r"setting that fits with python -m experiments.plan"):
        plan.check_fits(get_config("test"), topo.devices, small)
    assert get_config("gemma_7b_paper").plan_first and not get_config("cpu_demo").plan_first


def test_bad_outputs_and_stub_configs_are_one_line_before_any_compile(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "config.json").write_text('{"model_type": "gemma"}')
    for flags, message in (
            ([f"--out={tmp_path}"], f"error: --out '{tmp_path}': a directory, not a file"),
            ([f"--out={a_file / 'plan.json'}"], f"error: --out '{a_file}': a file, not a "
                                                f"directory (the directory of "
                                                f"'{a_file / 'plan.json'}')"),
            (["--config.task.name=prompts", f"--config.model.hf_dir={stub}"],
             f"error: {stub / 'config.json'}: lacks vocab_size, hidden_size, "
             "intermediate_size, num_hidden_layers, num_attention_heads (a checkpoint's "
             "config.json gives the model's sizes)")):
        code, _, stderr = _plan(f"--config={CONFIG}:test", "--topology=v5e-8", *flags)
        assert code == 2 and stderr.strip().splitlines()[-1] == message, stderr[-2000:]
        assert "compiling" not in stderr
    code, _, stderr = _plan(f"--config={CONFIG}:test", "--topology=v5e-8",
                            f"--out={tmp_path / 'new' / 'plan.json'}",
                            "--config.rl.decode_layout=3")
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        "error: config.rl.decode_layout = '3': the tensor-parallel degree must be mesh.model "
        "(1) times a divisor of mesh.fsdp (1): one of [1]"), stderr[-2000:]
