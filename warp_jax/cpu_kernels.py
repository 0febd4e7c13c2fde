"""Hand-written CPU kernels for the sampler's decode loop, called from XLA through the FFI: a
matmul on packed weights, Gemma's GeGLU on them, a decode step's attention with its cache
update, and the token draw.

A decode step multiplies a few rows (the batch) by every weight matrix. XLA:CPU runs such
matmuls far below what the machine allows: on the 2-core CI machine, 8 rows by a [768, 3072]
matrix stream the weights at 12.6 GB/s, and 32 rows by [256, 1024] reach about 130 GFLOP/s.
`csrc/packed_matmul.cc` (AVX-512, the weights packed once per sampler call into contiguous
panels of 32 columns, both cores through XLA's intra-op thread pool) streams them at 25 GB/s
and reaches about 290 GFLOP/s on the same shapes. PyTorch's matmul (oneDNN) reaches 14 GB/s.

The kernel is compiled on first use with the system's C++ compiler (`-O3 -march=native`) and
cached under `$WARP_JAX_CACHE` (default `~/.cache/warp_jax`), keyed by the source, the
jaxlib version, the compiler and the CPU. It needs an x86-64 CPU with AVX-512F and a C++
compiler (`$CXX`, else `g++`/`c++`); `unavailable_reason()` says why it cannot run where it
cannot, and the sampler then uses XLA's matmuls.

    packed = cpu_kernels.pack(w_KN)          # once: [ceil(N / 32), K, 32] panels
    y_MN = cpu_kernels.matmul(x_MK, packed)  # float32, CPU only; under vmap, one call per item
    q, k, v = cpu_kernels.matmuls(x_MD, [packed_q, packed_k, packed_v])  # one call
    hidden = cpu_kernels.geglu(x_MD, packed_gate, packed_up)  # gelu(x @ gate) * (x @ up)
    out, k_cache, v_cache = cpu_kernels.decode_attention(q_BNH, k_BKH, v_BKH, k_cache, v_cache,
                                                         mask_BS, slot)  # caches in place
    logits = cpu_kernels.matmul(x_MD, cpu_kernels.pack(embedding_VD, transposed=True))
    token, logp = cpu_kernels.draw(uniforms_B, logits, 1 / temperature)  # sampling._draw's draw
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

PANEL = 32  # output columns per packed panel (csrc/packed_matmul.cc's kPanel)
_SOURCE = Path(__file__).with_name("csrc") / "packed_matmul.cc"
_MATMUL, _GEGLU = "warp_jax_packed_matmul", "warp_jax_packed_geglu"
_PACK, _DRAW, _ATTEND = "warp_jax_pack", "warp_jax_draw", "warp_jax_decode_attention"


@flax.struct.dataclass
class PackedMatrix:
    """A float32 `[K, N]` matrix as `[ceil(N / PANEL), K, PANEL]` panels (zero-padded)."""

    panels: jax.Array
    columns: int = flax.struct.field(pytree_node=False)  # N


def pack(w: jax.Array, transposed: bool = False) -> PackedMatrix:
    """A `[K, N]` matrix `w` (`[N, K]` if `transposed`: `matmul` then multiplies by `w.T`)
    packed for `matmul`, in float32: one copy of the matrix, made by the kernel's own
    two-thread packer (XLA:CPU's transpose into this layout took about three times as long)."""
    _check_available()
    if w.ndim != 2:
        raise ValueError(f"pack expects a matrix, got shape {w.shape}")
    k, n = w.shape[::-1] if transposed else w.shape
    out = jax.ShapeDtypeStruct((-(-n // PANEL), k, PANEL), jnp.float32)
    panels = jax.ffi.ffi_call(_PACK, out, vmap_method="sequential")(w.astype(jnp.float32),
                                                                    transposed=transposed)
    return PackedMatrix(panels, n)


def matmul(x_MK: jax.Array, w: PackedMatrix) -> jax.Array:
    """`x_MK @ w` in float32 `[M, N]`, on the CPU."""
    return matmuls(x_MK, [w])[0]


def matmuls(x_MK: jax.Array, ws: Sequence[PackedMatrix]) -> list[jax.Array]:
    """`[x_MK @ w for w in ws]` in one call (a layer's q, k and v: x is read once and the
    threads split the panels of all of them)."""
    _check_available()
    for w in ws:
        if x_MK.ndim != 2 or x_MK.shape[1] != w.panels.shape[1]:
            raise ValueError(f"matmul expects x [M, {w.panels.shape[1]}], got {x_MK.shape}")
    outs = [jax.ShapeDtypeStruct((x_MK.shape[0], w.columns), jnp.float32) for w in ws]
    call = jax.ffi.ffi_call(_MATMUL, outs, vmap_method="sequential")
    return list(call(x_MK.astype(jnp.float32), *(w.panels for w in ws)))


def geglu(x_MK: jax.Array, gate: PackedMatrix, up: PackedMatrix) -> jax.Array:
    """Gemma's GeGLU `gelu(x_MK @ gate, approximate=True) * (x_MK @ up)` in float32 `[M, F]`,
    in one call: each panel's two products are combined in registers, so neither is written
    out and no separate elementwise pass runs (XLA:CPU's tanh GELU took about 55 µs per
    [32, 1024] in the tiny config's decode step)."""
    _check_available()
    if (gate.panels.shape != up.panels.shape or gate.columns != up.columns or x_MK.ndim != 2
            or x_MK.shape[1] != gate.panels.shape[1]):
        raise ValueError(f"geglu expects x [M, K] and gate and up of one shape [K, F], got x "
                         f"{x_MK.shape}, gate panels {gate.panels.shape} and up panels "
                         f"{up.panels.shape}")
    out = jax.ShapeDtypeStruct((x_MK.shape[0], gate.columns), jnp.float32)
    call = jax.ffi.ffi_call(_GEGLU, out, vmap_method="sequential")
    return call(x_MK.astype(jnp.float32), gate.panels, up.panels)


def decode_attention(q_BNH: jax.Array, k_BKH: jax.Array, v_BKH: jax.Array, k_cache: jax.Array,
                     v_cache: jax.Array, mask_BS: jax.Array, slot: jax.Array,
                     softcap: float | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention, in one call: writes the new keys and values at `slot` of
    the caches, then each query head attends to the slots `mask_BS` allows (at most `slot`:
    causal), with Gemma 2's soft-cap of the scores if given. Returns `(out_BNH, k_cache,
    v_cache)`, the caches updated in place (their buffers are the call's outputs, so XLA
    copies nothing when the caller passes them on, as a decode loop does).

    q `[B, N, H]` (scaled and rotated), new keys and values `[B, K, H]` (K divides N: query
    head n attends with KV head n // (N / K)), key cache `[B, K, H, S]` (slots last), value
    cache `[B, K, S, H]` (both without the K axis when K = 1, as `gemma.init_cache` lays them
    out), mask bool `[B, S]`, slot an int scalar. A row with no allowed slot gets a uniform
    softmax over all S slots, as XLA's masked softmax gives. Only the slots up to `slot` are
    read: XLA's attention reads all S."""
    _check_available()
    b, n, h = q_BNH.shape if q_BNH.ndim == 3 else (0, 0, 0)
    k, s = (k_BKH.shape[1] if k_BKH.ndim == 3 else 0), k_cache.shape[-1]
    lead = (b,) if k == 1 else (b, k)  # the caches of one KV head have no K axis
    if (k == 0 or n % k or k_BKH.shape != (b, k, h) or v_BKH.shape != (b, k, h)
            or (k_cache.shape, v_cache.shape) != ((*lead, h, s), (*lead, s, h))
            or mask_BS.shape != (b, s)):
        raise ValueError(
            f"decode_attention expects q [B, N, H], new keys and values [B, K, H], caches "
            f"[B, K, H, S] and [B, K, S, H] (no K axis when K = 1) and mask [B, S], got q "
            f"{q_BNH.shape}, keys {k_BKH.shape}, values {v_BKH.shape}, caches {k_cache.shape} "
            f"and {v_cache.shape}, mask {mask_BS.shape}")
    if k_cache.dtype != jnp.float32 or v_cache.dtype != jnp.float32:
        raise ValueError(f"decode_attention needs float32 caches, got {k_cache.dtype}")
    f32 = jnp.float32
    outs = (jax.ShapeDtypeStruct((b, n, h), f32), jax.ShapeDtypeStruct(k_cache.shape, f32),
            jax.ShapeDtypeStruct(v_cache.shape, f32))
    call = jax.ffi.ffi_call(_ATTEND, outs, vmap_method="sequential",
                            input_output_aliases={3: 1, 4: 2})
    return call(q_BNH.astype(f32), k_BKH.astype(f32), v_BKH.astype(f32), k_cache, v_cache,
                mask_BS.astype(bool), jnp.asarray(slot, jnp.int32),
                softcap=np.float32(softcap or 0.0))


def draw(uniforms_B: jax.Array, logits_BV: jax.Array,
         scale: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
    """One token per row from `softmax(logits * scale)` given one U[0, 1) draw per row, and its
    log-probability: `sampling._draw`'s two-level inverse CDF (blocks of 128 tokens, then the
    token; -inf logits are never drawn) in one pass over the logits per row. `scale` (1 /
    temperature) may be traced."""
    _check_available()
    rows = logits_BV.shape[0]
    if logits_BV.ndim != 2 or uniforms_B.shape != (rows,):
        raise ValueError(f"draw expects logits [B, V] and uniforms [B], got {logits_BV.shape} "
                         f"and {uniforms_B.shape}")
    outs = (jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.float32))
    call = jax.ffi.ffi_call(_DRAW, outs, vmap_method="sequential")
    token, logp = call(logits_BV.astype(jnp.float32), uniforms_B.astype(jnp.float32),
                       jnp.asarray(scale, jnp.float32))
    return token, logp


def _check_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the packed CPU matmul is unavailable: {reason}")


def available() -> bool:
    """Whether `matmul` can run here (and the sampler may use it)."""
    return unavailable_reason() is None


@functools.cache
def unavailable_reason() -> str | None:
    """None where the kernel is compiled and registered; otherwise why it cannot be."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"it is written for x86-64 CPUs, this one is {platform.machine()}"
    if "avx512f" not in _cpu_flags().split():
        return "this CPU has no AVX-512F"
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return "no C++ compiler found (set CXX, or install g++)"
    try:
        library = ctypes.cdll.LoadLibrary(str(_compiled(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or e
        return f"compiling {_SOURCE.name} with {compiler} failed: {str(detail).strip()[-2000:]}"
    for target, handler in ((_MATMUL, library.WarpJaxPackedMatmul),
                            (_GEGLU, library.WarpJaxPackedGeglu), (_PACK, library.WarpJaxPack),
                            (_DRAW, library.WarpJaxDraw),
                            (_ATTEND, library.WarpJaxDecodeAttention)):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return None


def _cpu_flags() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1] for line in cpuinfo.splitlines()
                 if line.startswith("flags")), "")


def _compiled(compiler: str) -> Path:
    """The shared library, compiled once per source, jaxlib, compiler and CPU."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=True).stdout
    key = hashlib.sha256("\0".join(
        [_SOURCE.read_text(), jaxlib.__version__, version, _cpu_flags()]).encode()).hexdigest()
    cache = Path(os.environ.get("WARP_JAX_CACHE", Path.home() / ".cache" / "warp_jax"))
    library = cache / f"packed_matmul_{key[:16]}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / library.name
        subprocess.run([compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
                        "-isystem", jax.ffi.include_dir(), str(_SOURCE), "-o", str(built)],
                       capture_output=True, text=True, check=True)
        os.replace(built, library)  # atomic: concurrent first uses each build, one wins
    return library
