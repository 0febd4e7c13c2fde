"""Host-side runtime settings for training on CPUs.

XLA:CPU allocates an executable's temporaries as one block per call (about 1 GB for the
policy-gradient step of a 100M-parameter Gemma at batch 8 x 128). glibc serves a block that
large with a fresh `mmap` and returns it to the OS on `free`, so every step page-faults it
back in: ~270k faults and 0.4-1.7 s of kernel time per step on a 2-core machine, more when
another library (PyTorch) has just churned memory. `retain_freed_memory` tells glibc to keep
freed memory in the process for reuse instead. It changes no result, only speed; resident
memory stays at its peak. On TPU and GPU the temporaries live in device memory, and there it
is not done: with it, the sampling benchmark on an H200 (JAX and PyTorch on CUDA, many host
threads sharing one arena) did not finish its first config in 120 s; with glibc's defaults
it ran both configs in about 45 s. Nothing else differed between the two runs but the number
of timed pairs (5 against 3), so the setting is the likely cause; it was not profiled.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util

import jax

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def retain_freed_memory() -> bool:
    """Makes glibc's malloc reuse freed memory rather than unmap it (returns True if done).

    One arena, no `mmap` for large blocks, no trimming: a block freed by one step is the
    next step's. Call it before JAX starts its threads (first thing in `main`): threads
    created earlier keep their own arenas. A no-op returning False where the C library is
    not glibc, and where JAX may run on an accelerator (`jax_may_use_an_accelerator`).
    """
    if jax_may_use_an_accelerator():
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def jax_may_use_an_accelerator() -> bool:
    """Whether JAX's default backend may be a GPU or TPU, told without starting JAX.

    `JAX_PLATFORMS` (or `jax.config.update("jax_platforms", ...)`) decides where set: its
    first platform. Otherwise JAX picks an accelerator when one is present, which needs its
    PJRT plugin installed (`jax_plugins` entry points: the CUDA and ROCm plugins) or libtpu.
    """
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    return (bool(importlib.metadata.entry_points(group="jax_plugins"))
            or importlib.util.find_spec("libtpu") is not None)
