"""The opt-in CPU backend's process setting: a freed large block is reused, not page-faulted
back in; and `import warp_jax.*` loads no backend."""

import os
import subprocess
import sys

import pytest

_PROBE = """
import ctypes, resource, sys
from warp_jax.backends import cpu
ok = cpu.retain_freed_memory() if sys.argv[1] == "retain" else True
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def faults_of_a_fresh_256mb_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(256 * 2**20)
    ctypes.memset(block, 1, 256 * 2**20)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_256mb_block()
print(ok, faults_of_a_fresh_256mb_block())
"""


def _faults(mode, platforms="cpu"):
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, env={**os.environ, "JAX_PLATFORMS": platforms}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_block_is_reused_instead_of_faulted_back():
    ok, retained = _faults("retain")
    _, default = _faults("default")
    assert ok
    pages = 256 * 2**20 // 4096
    assert default > pages // 2  # glibc unmapped the block: every page faults again
    assert retained < pages // 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_memory_is_returned_as_usual_where_jax_runs_on_an_accelerator():
    ok, faults = _faults("retain", platforms="cuda,cpu")
    assert not ok
    assert faults > 256 * 2**20 // 4096 // 2


def test_no_backend_is_imported_unless_selected():
    probe = ("import sys, warp_jax.warp, warp_jax.sampling, warp_jax.merge; "
             "print([m for m in sys.modules if m.startswith('warp_jax') "
             "and ('kernel' in m or 'cpu' in m)])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
    assert out.strip() == "[]"
