"""Shared test set-up: 8 emulated CPU devices, strict numpy semantics, session-scoped fixtures."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402

from warp_jax import cpu_kernels  # noqa: E402


@pytest.fixture(params=[False, True], ids=["xla_matmuls", "cpu_kernel"])
def cpu_kernel(request):
    """`sampling.sample`'s `cpu_kernel`: False, and True where the packed CPU matmul runs here
    (the tests' 8 emulated devices turn it off by default)."""
    reason = cpu_kernels.unavailable_reason() if request.param else None
    if reason is not None:
        pytest.skip(reason)
    return request.param
