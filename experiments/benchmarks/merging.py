"""Merge throughput against the machine's memory bandwidth (a numpy copy) and mergekit.

    python -m experiments.benchmarks.merging [--repeats 3] [--no-mergekit]

Each merge runs jitted on ~1 GB of float32 Gemma-2B-like tensors per tree. Its GB/s counts
the memory traffic the merge cannot avoid (SLERP with M = 2: three trees read twice, one
written; LERP: three read, one written; LITI and EMA: two read, one written), so a merge at
100% of the copy's GB/s runs at the machine's bandwidth limit. mergekit (`nuslerp`, task
vectors, per tensor) runs in its own venv (`--mergekit-venv`, created on first use).
The bandwidth reference is a numpy copy into new arrays, as every merge writes a new tree;
a copy into preallocated arrays, which skips the first-touch page faults, is shown beside it.
On an accelerator the reference is a jitted copy of the tree in device memory instead.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from experiments.benchmarks._machine import device_description, stamp
from experiments.benchmarks._trees import make_trees
from warp_jax import merging

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _median_seconds(fn, repeats):
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _numpy_copy_seconds(tree, repeats, preallocated):
    if preallocated:
        out = {k: np.empty_like(v) for k, v in tree.items()}
        return _median_seconds(lambda: [np.copyto(out[k], v) for k, v in tree.items()], repeats)
    return _median_seconds(lambda: {k: v.copy() for k, v in tree.items()}, repeats)


def _device_copy_seconds(tree, repeats):
    copy = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t))
    return _median_seconds(lambda: copy(tree), repeats)


def ensure_mergekit(venv: pathlib.Path) -> tuple[pathlib.Path | None, str]:
    """The Python of a venv with mergekit (created on first use), or None and why not."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with mergekit (not a project dependency) ...", flush=True)
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "mergekit"]]
        for cmd in steps:
            if subprocess.run(cmd, check=False).returncode != 0:
                return None, "mergekit did not install"
    return python, ""


def _mergekit_seconds(venv: pathlib.Path, repeats: int) -> tuple[float | None, str]:
    python, note = ensure_mergekit(venv)
    if python is None:
        return None, note
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(python), "-m", "experiments.benchmarks.mergekit_slerp",
                           str(repeats)], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return None, f"mergekit run failed: {proc.stderr.strip().splitlines()[-1:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["seconds"], f"mergekit nuslerp, torch {result['torch']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-mergekit", action="store_true", help="skip the mergekit column")
    parser.add_argument("--mergekit-venv", type=pathlib.Path, default=ROOT / ".venv-mergekit")
    args = parser.parse_args()

    init_np, p0_np, p1_np = make_trees()
    tree_bytes = sum(v.nbytes for v in init_np.values())
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu:
        copy_s = _numpy_copy_seconds(init_np, args.repeats, preallocated=False)
        warm_s = _numpy_copy_seconds(init_np, args.repeats, preallocated=True)
    init, p0, p1 = (jax.device_put(t) for t in (init_np, p0_np, p1_np))
    del init_np, p0_np, p1_np
    if not on_cpu:
        copy_s = _device_copy_seconds(init, args.repeats)
    copy_gbs = 2 * tree_bytes / copy_s / 1e9

    cases = {
        "slerp_tree (M=2)": (jax.jit(lambda i, a, b: merging.slerp_tree(i, [a, b])), 7),
        "lerp_tree (M=2)": (jax.jit(lambda i, a, b: merging.lerp_tree(i, [a, b])), 4),
        "liti_tree": (jax.jit(lambda i, a, b: merging.liti_tree(i, a, 0.3)), 3),
        "ema_update": (jax.jit(lambda i, a, b: merging.ema_update(i, a, 0.01)), 3),
    }
    print(f"JAX {jax.__version__} on {device_description()}; "
          f"{tree_bytes / 1e9:.2f} GB per tree; median of {args.repeats}; {stamp()}")
    if on_cpu:
        rows = [("numpy copy (bandwidth)", copy_s, copy_gbs, 1.0, "into new arrays, like a merge"),
                ("numpy copy, preallocated", warm_s, 2 * tree_bytes / warm_s / 1e9,
                 copy_s / warm_s, "output pages already mapped")]
    else:
        rows = [("jitted copy (bandwidth)", copy_s, copy_gbs, 1.0, "in device memory")]
    slerp_s = None
    for name, (fn, trees_moved) in cases.items():
        seconds = _median_seconds(lambda fn=fn: fn(init, p0, p1), args.repeats)
        gbs = trees_moved * tree_bytes / seconds / 1e9
        rows.append((name, seconds, gbs, gbs / copy_gbs, ""))
        if name.startswith("slerp"):
            slerp_s = seconds
    if not args.no_mergekit:
        del init, p0, p1
        mk_s, note = _mergekit_seconds(args.mergekit_venv, args.repeats)
        if mk_s is None:
            print(f"mergekit column skipped: {note}")
        else:
            gbs = 7 * tree_bytes / mk_s / 1e9
            rows.append((note, mk_s, gbs, gbs / copy_gbs, f"slerp_tree is {mk_s / slerp_s:.2f}x"))
    print(f"\n| {'merge':<32} | {'seconds':>8} | {'GB/s':>7} | {'vs copy':>7} | note")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 9}|{'-' * 9}|------")
    for name, seconds, gbs, ratio, note in rows:
        print(f"| {name:<32} | {seconds:8.4f} | {gbs:7.2f} | {ratio:7.0%} | {note}")


if __name__ == "__main__":
    main()
