"""Orbax checkpoints: round trip, retention, shardings, checksums, damaged steps, failed
writes."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warp_jax import sharding
from warp_jax.checkpoint import Checkpoints, DamagedCheckpoint, fingerprint


def test_round_trip_retention_and_sharded_restore(tmp_path):
    mesh = sharding.make_mesh(fsdp=2, model=4)
    spec = sharding.logical_sharding(("embed", "mlp"), (8, 16), mesh)
    tree = {"w": jax.device_put(jnp.arange(128.0).reshape(8, 16), spec),
            "step": jnp.int32(3), "host": np.ones((2,), np.float32)}
    ckpt = Checkpoints(tmp_path, max_to_keep=2)
    assert ckpt.latest_step("run_0") is None
    for step in range(4):
        ckpt.save("run_0", step, jax.tree.map(lambda x, s=step: x + s, tree))
    ckpt.wait()
    assert ckpt.latest_step("run_0") == 3
    assert sorted(int(p.name) for p in (tmp_path / "run_0").iterdir() if p.name.isdigit()) \
        == [2, 3]
    restored = Checkpoints(tmp_path).restore("run_0", tree)
    np.testing.assert_array_equal(restored["w"], np.asarray(tree["w"]) + 3)
    assert restored["w"].sharding.is_equivalent_to(spec, 2)
    assert int(restored["step"]) == 6
    with pytest.raises(ValueError, match="no checkpoint named 'merge'"):
        ckpt.restore("merge", tree)
    ckpt.close()


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
       dtype=st.sampled_from(["float32", "bfloat16", "int32", "bool"]), data=st.data())
def test_any_flipped_bit_changes_the_checksum(shape, dtype, data):
    x = np.random.default_rng(0).normal(size=shape).astype(jnp.dtype(dtype))
    raw = bytearray(x.tobytes())
    bit = data.draw(st.integers(0, 8 * len(raw) - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    y = np.frombuffer(bytes(raw), dtype=x.dtype).reshape(x.shape)
    sums, _ = fingerprint({"x": x})
    flipped, _ = fingerprint({"x": y})
    assert int(sums["x"]) != int(flipped["x"])


def test_checksum_is_the_same_on_any_sharding():
    x = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16) / 7
    mesh = sharding.make_mesh(fsdp=2, model=4)
    spec = sharding.logical_sharding(("embed", "mlp"), (8, 16), mesh)
    assert int(fingerprint(jax.device_put(x, spec))[0]) == int(fingerprint(x)[0])


def _data_files(step_dir):
    return sorted((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["flip", "truncate", "checksums"])
def test_a_damaged_step_falls_back_to_the_one_before(tmp_path, damage, capsys):
    tree = {"w": jnp.arange(4096.0).reshape(64, 64), "step": jnp.int32(0)}
    ckpt = Checkpoints(tmp_path)
    for step in (1, 2):
        ckpt.save("run", step, jax.tree.map(lambda x, s=step: x + s, tree))
    ckpt.close()
    if damage == "checksums":
        path = tmp_path / "run" / "2" / "checksums" / "metadata"
        sums = json.loads(path.read_text())
        path.write_text(json.dumps({k: v + 1 for k, v in sums.items()}))
    else:
        data = _data_files(tmp_path / "run" / "2")[-1]
        raw = bytearray(data.read_bytes())
        if damage == "flip":
            raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(b ^ 0x5A for b in
                                                          raw[len(raw) // 2:len(raw) // 2 + 64])
        data.write_bytes(bytes(raw if damage == "flip" else raw[:len(raw) // 2]))
    ckpt = Checkpoints(tmp_path)
    step, restored = ckpt.restore_latest("run", tree)
    assert step == 1 and int(restored["step"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {tmp_path / 'run' / '2'}: ")
    assert (tmp_path / "damaged" / "run-2").is_dir()
    ckpt.save("run", 2, jax.tree.map(lambda x: x + 2, tree))  # the stage goes on from step 1
    ckpt.wait()
    assert int(ckpt.restore("run", tree)["step"]) == 2
    ckpt.close()


def test_no_good_step_is_one_line_and_a_diverged_tree_is_never_saved(tmp_path):
    tree = {"w": jnp.ones((8, 8))}
    ckpt = Checkpoints(tmp_path)
    ckpt.save("sft", 0, tree)
    ckpt.wait()
    path = tmp_path / "sft" / "0" / "checksums" / "metadata"
    path.write_text(json.dumps({"['w']": 0}))
    with pytest.raises(DamagedCheckpoint, match=r"sft: no good step left .* delete .*sft to "
                                                r"redo this stage"):
        Checkpoints(tmp_path).restore_latest("sft", tree)
    with pytest.raises(ValueError, match=r"iter1, step 4: non-finite values in \['w'\] \(the "
                                         r"run diverged"):
        ckpt.save("iter1", 4, {"w": jnp.full((2,), jnp.nan)})
    assert not (tmp_path / "iter1").exists() or not list((tmp_path / "iter1").iterdir())
    ckpt.close()


_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
import numpy as np
from warp_jax.checkpoint import Checkpoints
ckpt = Checkpoints(sys.argv[1])
try:
    ckpt.save("run", 1, {"w": np.random.default_rng(0).normal(size=(256, 256)).astype("f4")})
    ckpt.wait()
except (OSError, ValueError) as e:
    print(e)
"""


def test_a_write_that_fails_is_one_line_naming_the_file(tmp_path):
    """Orbax logs each failure of its background writes with a traceback (hundreds of lines)
    before raising it; only the raised error, naming the file, reaches the user."""
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path / "ckpt")],
                          cwd=pathlib.Path(__file__).resolve().parents[1],
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.stderr == "", proc.stderr[-3000:]
    out = proc.stdout.strip().splitlines()
    assert len(out) == 1 and str(tmp_path / "ckpt" / "run") in out[0] and \
        "File too large" in out[0], out
