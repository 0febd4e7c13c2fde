"""Opt-in, platform-specific pieces behind the sampler's one seam (`sampling.Backend`).

`warp_jax.backends.cpu` is imported only when a call or a config selects it
(`sampling.sample(..., backend="cpu" | "auto")`, `--config.rl.sampler_backend`).
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util

import jax


def jax_may_use_an_accelerator() -> bool:
    """Whether JAX's default backend may be a GPU or TPU, told without starting JAX.

    `JAX_PLATFORMS` (or `jax.config.update("jax_platforms", ...)`) decides where set: its
    first platform. Otherwise JAX picks an accelerator when one is present, which needs its
    PJRT plugin installed (`jax_plugins` entry points: the CUDA and ROCm plugins), or libtpu
    and a TPU's device files (libtpu alone also serves to compile for TPUs elsewhere).
    """
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    tpu_chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    return (bool(importlib.metadata.entry_points(group="jax_plugins"))
            or (importlib.util.find_spec("libtpu") is not None and bool(tpu_chips)))


def configure_process(backend: str) -> None:
    """Applies the process-wide settings of sampler backend `backend` ("auto", "xla" or
    "cpu"; "auto" is the CPU backend where JAX will not use an accelerator): for the CPU
    backend, glibc keeps freed memory (`cpu.retain_freed_memory`). Call it first thing in a
    job's `main`, before JAX starts its threads; with "xla" it does nothing.

    Where JAX would find no accelerator, it is told to start on the CPU straight away (with
    libtpu installed but no TPU it would otherwise probe for one, with warnings)."""
    if not jax.config.jax_platforms and not jax_may_use_an_accelerator():
        jax.config.update("jax_platforms", "cpu")
    if backend == "cpu" or (backend == "auto" and not jax_may_use_an_accelerator()):
        from warp_jax.backends import cpu

        cpu.retain_freed_memory()
