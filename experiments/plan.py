"""Will the WARP job fit on a TPU slice? Compile it for the slice, here, before renting it.

    python -m experiments.plan --config=experiments/configs/gemma_warp.py:gemma_7b_paper \
        --topology=v5p-128 [--out=plan.json] [--config.rl.microbatches=2 ...]

Needs libtpu (`pip install "jax[tpu]==<our jax>"`; `make test` installs it). Builds the job's
mesh on the slice's compile-only devices (several slices: `--topology=2xv5p-128`) and compiles
every jitted program of the job (the stacked train step, its init, the baselines' step, the
evaluation, the SLERP of the runs, LITI) with the TPU compiler from abstract inputs: no
weights, tokenizer or prompts are read (with `--config.model.hf_dir` set, only its
config.json). Prints per program the per-chip memory against the chip's HBM, compile time,
FLOPs and HBM bytes per call, its collectives and the bytes they move per chip per call (read
from the compiled program, loops counted by their trips), the train step's roofline (FLOPs,
HBM and interconnect bounds), and the plan as one table row (docs/tpu.md); `--out` writes the
same as JSON. `--config.rl.decode_layout=train` plans sampling on the training layout.

Exit code 0 if every program fits; 1 with one line naming the program, the shortfall and a
setting that fits (it tries more microbatches, remat and tensor parallelism); 2 for bad input.
"""

import json
import os
import pathlib
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU devices are compile-only

from absl import app, flags, logging

from experiments.gemma_warp import USER_ERRORS, define_config_flag, fail, load_config, parse_flags
from warp_jax.workdir import writable_file


def _table(result: dict) -> str:
    chip = result["chip"]
    ici = f", ICI {chip['ici_gbps']} GB/s" if chip["ici_gbps"] else ""
    layout = result["decode_layout"]
    decode = (f"sampling on tensor {layout['tensor_parallel']} x data "
              f"{layout['data_parallel']} per run" if layout else "sampling on the training layout")
    lines = [f"{result['topology']}: {result['chips']} chips of {result['hbm_gib_per_chip']} GiB "
             f"HBM, {chip['bf16_tflops']} bf16 TFLOP/s, {chip['hbm_gbps']} GB/s{ici}; mesh "
             f"{result['mesh']}, {decode}; the runs' state "
             f"{result['state_gib_per_chip']:.3g} GiB/chip",
             "", "| program | fits | peak GiB/chip | arguments | outputs | temporaries | code MiB "
             "| compile s | GFLOP/call | GB/call | collectives | collective GiB/chip/call |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, r in result["programs"].items():
        if "peak_gib_per_chip" not in r:
            lines.append(f"| {name} | **no**: needs {r['used_gib']} of {r['hbm_gib']} GiB "
                         f"| | | | | | {r['compile_s']:.3g} | | | | |")
            continue
        moved = ", ".join(f"{b / 2**30:.3g} {k}" for k, b in r["collective_bytes"].items() if b)
        lines.append(
            f"| {name} | {'yes' if r['fits'] else '**no**'} | {r['peak_gib_per_chip']:.3g} | "
            f"{r['arguments_gib']:.3g} | {r['outputs_gib']:.3g} | {r['temporaries_gib']:.3g} | "
            f"{r['generated_code_mib']:.3g} | {r['compile_s']:.3g} | {r['flops'] / 1e9:.3g} | "
            f"{r['bytes'] / 1e9:.3g} | "
            f"{', '.join(f'{n} {k}' for k, n in r['collectives'].items() if n) or 'none'} | "
            f"{moved or 'none'} |")
    roof = result["train_step_roofline"]
    if roof:
        lines.append("")
        ici_s = roof["ici_bound_s"]
        lines.append(f"train step, counted by hand: {roof['analytic_flops'] / 1e12:.3g} TFLOP "
                     f"of matmuls, >= {roof['analytic_hbm_bytes_per_chip'] / 1e9:.3g} GB of "
                     f"HBM traffic per chip; read from the compiled step: "
                     f"{roof['collective_bytes_per_chip'] / 2**30:.3g} GiB of collectives per "
                     f"chip; roofline >= {roof['step_time_lower_bound_s']:.3g} s/step (compute "
                     f"{roof['compute_bound_s']:.3g} s, HBM {roof['hbm_bound_s']:.3g} s, ICI "
                     f"{'n/a' if ici_s is None else f'{ici_s:.3g} s'}), MFU <= "
                     f"{roof['mfu_upper_bound']:.0%}")
    lines.append("(GFLOP and GB per call are XLA's cost analysis, which counts a loop's body "
                 "once: the sampler's tokens and scanned layers are missing from them; "
                 "collective GiB count every loop by its trips)")
    return "\n".join(lines)


def _row(result: dict, config, command: str) -> str:
    """The plan in one markdown row (docs/tpu.md's table): the model, runs, slice and mesh,
    the decode layout, whether it fits, the train step's per-chip peak and compile time, the
    largest program, the step's FLOPs, collective GiB per chip, ICI bound, roofline bound and
    MFU bound."""
    mesh = result["mesh"]
    programs = result["programs"]
    step = [r for n, r in programs.items() if n.startswith("train_step/")]
    fitting = {n: r for n, r in programs.items() if "peak_gib_per_chip" in r}
    largest = max(fitting, key=lambda n: fitting[n]["peak_gib_per_chip"], default=None)
    roof = result["train_step_roofline"]
    cells = [
        f"`{command}`", config.model.hf_dir or config.model.preset, str(config.warp.runs),
        f"{result['topology']} ({result['chips']} chips)",
        "x".join(str(mesh[a]) for a in ("run", "data", "fsdp", "model")),
        (f"{result['decode_layout']['tensor_parallel']}x{result['decode_layout']['data_parallel']}"
         if result["decode_layout"] else "train"),
        "yes" if result["fits"] else "**no**",
        " + ".join(f"{r['peak_gib_per_chip']:.1f}" if "peak_gib_per_chip" in r
                   else f"needs {r['used_gib']:.1f}" for r in step),
        f"{fitting[largest]['peak_gib_per_chip']:.1f} ({largest})" if largest else "",
        " + ".join(f"{r['compile_s']:.0f}" for r in step),
        " + ".join(f"{r['generated_code_mib']:.0f}" for r in step if "generated_code_mib" in r),
        f"{roof['analytic_flops'] / 1e12:.3g}" if roof else "",
        f"{roof['collective_bytes_per_chip'] / 2**30:.3g}" if roof else "",
        f"{roof['ici_bound_s']:.3g}" if roof and roof["ici_bound_s"] is not None else "",
        f"{roof['step_time_lower_bound_s']:.3g}" if roof else "",
        f"{roof['mfu_upper_bound']:.0%}" if roof else "",
    ]
    return "| " + " | ".join(cells) + " |"


ROW_HEADER = ("| command | model | M | slice | mesh run x data x fsdp x model | decode tensor x "
              "data | fits | step peak GiB/chip | largest peak GiB/chip | step compile s | step "
              "code MiB | TFLOP/step | collective GiB/chip/step | ICI bound s | roofline s/step "
              "| MFU bound |\n|---|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
              "---:|---:|")


def _remedies(config):
    """Settings to try, one change each, in the order they cost the least throughput."""
    rl = config.rl
    prompts = rl.batch_size
    for micro in (rl.microbatches * 2, rl.microbatches * 4):
        if prompts % micro == 0:
            yield f"--config.rl.microbatches={micro}", ("rl", "microbatches", micro)
    if not rl.remat:
        yield "--config.rl.remat=True", ("rl", "remat", True)
    yield f"--config.mesh.model={config.mesh.model * 2}", ("mesh", "model",
                                                           config.mesh.model * 2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    config = load_config()
    from experiments.benchmarks._machine import device_description, stamp
    from warp_jax import plan

    header = f"Compiled on {device_description()}; {stamp()}"  # the code this run started with
    command = " ".join(a for a in sys.argv[1:] if not a.startswith("--out"))
    command = re.sub(r"--config=\S*gemma_warp\.py:", "", command)  # the variant stays
    # Without them libtpu probes for a TPU VM's metadata and warns that it found none.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", flags.FLAGS.topology)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        if flags.FLAGS.out:  # before the compiles, not after their minutes
            writable_file(flags.FLAGS.out, "--out")
        topo = plan.topology(flags.FLAGS.topology)
        result = plan.plan(config, topo, progress=lambda m: print(m, file=sys.stderr))
    except USER_ERRORS as e:
        fail(e)
    result["compiled_on"] = header
    result["row"] = _row(result, config, command)
    print(header)
    print(_table(result))
    print(f"\n{ROW_HEADER}\n{result['row']}")
    if flags.FLAGS.out:
        try:
            pathlib.Path(flags.FLAGS.out).write_text(json.dumps(result, indent=1) + "\n")
        except OSError as e:
            fail(e)
    if result["fits"]:
        return
    name, worst = next((n, r) for n, r in result["programs"].items() if not r["fits"])
    short = worst.get("shortfall_gib") or round(worst["peak_gib_per_chip"] - topo.chip.hbm_gib,
                                                 2)
    fix = "none of more microbatches, remat or more tensor parallelism; use more chips"
    state = result["state_gib_per_chip"]
    if state > topo.chip.hbm_gib:  # what the remedies cut is not what overflows
        fix = (f"the runs' state alone (weights, EMA anchors, Adam moments) takes {state:.1f} "
               "GiB per chip; use more chips")
    for flag, (section, key, value) in _remedies(config) if state <= topo.chip.hbm_gib else ():
        tried = config.copy_and_resolve_references()
        tried[section][key] = value
        print(f"trying {flag} ...", file=sys.stderr)
        try:
            programs, _ = plan.lowered_programs(tried, topo.devices)
        except ValueError:  # e.g. a tensor-parallel degree the mesh cannot take
            continue
        if plan.compile_report(programs[name], topo.chip)["fits"]:
            fix = f"{flag} fits"
            break
    print(f"error: {name} does not fit on {topo.name}: short by {short} GiB of the "
          f"{topo.chip.hbm_gib} GiB per chip; {fix}", file=sys.stderr)
    sys.exit(1)


def cli() -> None:
    define_config_flag()
    flags.DEFINE_string("topology", None, "a Cloud TPU accelerator type: v4-32, v5e-16 "
                        "(v5litepod-16), v5p-128, v6e-32; 2xv5p-128 for two slices",
                        required=True)
    flags.DEFINE_string("out", None, "write the plan as JSON here")
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
