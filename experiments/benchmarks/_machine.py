"""What a benchmark ran on, for its header: CPU figures differ by CPU model, not only by core
count (the sampling benchmark's tiny config is compute-bound on one 2-core machine and its
100M config memory-bound, by different margins on another)."""

import os
import platform
from pathlib import Path

import jax


def device_description() -> str:
    """The accelerator's kind (`NVIDIA H200`), or on a CPU its model, family and model numbers
    and core count (`AMD EPYC (family 25, model 17), 2 cores`)."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return device.device_kind
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine() or "CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{name}, {os.cpu_count()} cores"


def stamp() -> str:
    """`commit <sha>[+changes]`, `python -m <command line>`: what produced a table."""
    import subprocess
    import sys

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = "unknown", ""
    command = " ".join([f"python -m {sys.modules['__main__'].__spec__.name}", *sys.argv[1:]])
    return f"commit {sha}{'+changes' if dirty else ''}, `{command}`"
