"""Shared test set-up: 8 emulated CPU devices, strict numpy semantics, session-scoped fixtures."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402


@pytest.fixture(params=["xla", "cpu"])
def sampler_backend(request):
    """`sampling.sample`'s backend: the default XLA one and the opt-in CPU one."""
    return request.param
