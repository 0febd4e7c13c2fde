"""What `GemmaConfig.scan_layers` changes in the TPU compile of the train step.

    python -m experiments.benchmarks.scan_compile [--variant gemma_7b_paper] \
        [--topology v5p-128] [--blocks both] [--json OUT]

Compiles the job's stacked train step (`experiments.plan`'s `train_step/*` programs) for the
slice's compile-only TPU devices twice in one run, with the blocks unrolled (one copy per
layer) and under a scan over stacked layers, and prints the compiler's figures side by side:
compile time on this machine, generated code and the per-chip peak, with their ratios.
Needs libtpu, as `experiments.plan` does; the unrolled 7B step takes about 6 minutes to
compile on 2 cores. `--blocks unrolled` or `scanned` compiles one of the two (a host whose
memory holds only one compile: the unrolled Gemma 4 E4B step needs more than 21 GiB).
"""

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU devices are compile-only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="gemma_7b_paper",
                        help="a variant of experiments/configs/gemma_warp.py")
    parser.add_argument("--topology", default="v5p-128", help="a Cloud TPU accelerator type")
    parser.add_argument("--blocks", choices=("both", "unrolled", "scanned"), default="both",
                        help="which layouts to compile")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", args.topology)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

    from experiments.benchmarks._machine import device_description, stamp
    from experiments.configs.gemma_warp import get_config
    from warp_jax import plan

    header = f"Compiled on {device_description()}; {stamp()}"
    try:
        topo = plan.topology(args.topology)
    except ValueError as e:
        parser.error(str(e))
    rows = []
    layouts = {"both": (False, True), "unrolled": (False,), "scanned": (True,)}[args.blocks]
    for scan in layouts:
        config = get_config(args.variant)
        config.model.scan_layers = scan
        programs, _ = plan.lowered_programs(config, topo.devices)
        for name, lowered in programs.items():
            if name.startswith("train_step/"):
                print(f"compiling {name}, scan_layers={scan} ...", file=sys.stderr)
                report = plan.compile_report(lowered, topo.chip)
                rows.append(dict(program=name, scan_layers=scan, **report))
    print(header)
    print(f"{args.variant} on {args.topology} ({len(topo.devices)} chips)\n")
    print("| program | blocks | compile s | vs unrolled | code MiB | vs unrolled | "
          "peak GiB/chip | vs unrolled |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    unrolled = {r["program"]: r for r in rows if not r["scan_layers"]}
    for r in rows:
        base = unrolled.get(r["program"])
        if "peak_gib_per_chip" not in r:
            print(f"| {r['program']} | {'scanned' if r['scan_layers'] else 'unrolled'} | "
                  f"{r['compile_s']:.0f} | | does not fit | | | |")
            continue
        if base is None or "peak_gib_per_chip" not in base:
            print(f"| {r['program']} | scanned | {r['compile_s']:.0f} | | "
                  f"{r['generated_code_mib']:.0f} | | {r['peak_gib_per_chip']:.1f} | |")
            continue
        print(f"| {r['program']} | {'scanned' if r['scan_layers'] else 'unrolled'} | "
              f"{r['compile_s']:.0f} | {r['compile_s'] / base['compile_s']:.2f}x | "
              f"{r['generated_code_mib']:.0f} | "
              f"{r['generated_code_mib'] / base['generated_code_mib']:.2f}x | "
              f"{r['peak_gib_per_chip']:.1f} | "
              f"{r['peak_gib_per_chip'] / base['peak_gib_per_chip']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
