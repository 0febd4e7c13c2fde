"""Orbax checkpoints: round trip, retention, shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warp_jax import sharding
from warp_jax.checkpoint import Checkpoints


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
