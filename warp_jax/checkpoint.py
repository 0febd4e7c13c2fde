"""Orbax checkpoints: named, step-indexed, saved asynchronously with retention, and verified.

Every saved step carries a checksum of each array's bits; a restore recomputes it, so a
flipped bit, a truncated file or a step orbax cannot read is found before it is trusted.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pathlib
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from warp_jax import sharding

_ITEMS = ("state", "default")  # the tree's item directory in a step (default: older layout)


class DamagedCheckpoint(ValueError):
    """A saved step that cannot be read, or whose arrays differ from what was saved."""


def _uint_bits(x: jax.Array) -> jax.Array:
    """The bits of every element as uint32 (elements of 1, 2 or 4 bytes)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: a bijection of uint32 that spreads every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


@functools.partial(jax.jit, static_argnums=2)
def _shard_fingerprint(x: jax.Array, start: jax.Array, shape: tuple[int, ...]):
    """(sum of the element hashes, all finite) of one shard `x` of an array of `shape`
    whose first element sits at index `start`."""
    index = jnp.zeros(x.shape, jnp.uint32)
    for d in range(x.ndim):
        index = index * jnp.uint32(shape[d]) + jax.lax.broadcasted_iota(
            jnp.uint32, x.shape, d) + start[d]
    hashed = _mix(_uint_bits(x) ^ _mix(index + jnp.uint32(0x9E3779B9)))
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
    return jnp.sum(hashed, dtype=jnp.uint32), jnp.asarray(finite)


def fingerprint(tree: Any) -> tuple[Any, Any]:
    """Per array: the sum modulo 2**32 of a hash of each element's bits and position, and
    whether it is finite (host values, the same in every process).

    Integer sums do not depend on the order of reduction, so the checksum is the same on any
    mesh; the hash of an element is a bijection of its bits, so changing any one element (a
    single flipped bit, say) changes the sum. Each shard is summed on its own device and the
    shards' sums on the host: no collectives (XLA:CPU can deadlock on many small programs
    with collectives in flight).
    """
    leaves, treedef = jax.tree.flatten(tree)
    parts = []  # per leaf, the (sum, finite) of each shard this process holds a first copy of
    for x in leaves:
        x = x if isinstance(x, jax.Array) else jnp.asarray(x)
        parts.append([_shard_fingerprint(s.data, np.array([i.start or 0 for i in s.index],
                                                          np.uint32), x.shape)
                      for s in x.addressable_shards if s.replica_id == 0])
    parts = jax.device_get(parts)  # one transfer for all the shards' results
    sums = np.array([sum(int(p[0]) for p in leaf) % 2**32 for leaf in parts], np.uint32)
    finite = np.array([all(bool(p[1]) for p in leaf) for leaf in parts], bool)
    if jax.process_count() > 1:  # every process's shards
        sums = multihost_utils.process_allgather(sums).sum(0, dtype=np.uint32)
        finite = multihost_utils.process_allgather(finite).all(0)
    return (treedef.unflatten([int(v) for v in sums]),
            treedef.unflatten([bool(v) for v in finite]))


def _digest(tree: Any) -> tuple[dict[str, int], list[str]]:
    """(path -> checksum, the paths of non-finite arrays) of `tree`."""
    sums, finite = fingerprint(tree)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return (dict(zip(names, jax.tree.leaves(sums), strict=True)),
            [n for n, ok in zip(names, jax.tree.leaves(finite), strict=True) if not ok])


class Checkpoints:
    """One orbax `CheckpointManager` per name (a run, a merge, an init) under `directory`.

    Saves are asynchronous: `save` returns once the arrays are copied off the devices, and
    the next `save`, `wait` or `close` waits for the write. A save is atomic (orbax writes to
    a temporary directory and renames it), so a kill at any moment leaves the last complete
    checkpoint of every name readable. A tree with a non-finite array is never saved.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 2,
                 async_save: bool = True):
        _quiet_orbax_errors()
        self.directory = pathlib.Path(directory).resolve()
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
        self._managers: dict[str, ocp.CheckpointManager] = {}

    def _manager(self, name: str) -> ocp.CheckpointManager:
        if name not in self._managers:
            self._managers[name] = ocp.CheckpointManager(self.directory / name,
                                                         options=self._options)
        return self._managers[name]

    def save(self, name: str, step: int, tree: Any) -> None:
        """Saves `tree` (arrays only) as step `step` of `name`, with its checksums.

        Raises `ValueError` naming the arrays if any is not finite (a diverged run), before
        anything is written."""
        sums, bad = _digest(tree)
        if bad:
            raise ValueError(f"{name}, step {step}: non-finite values in {', '.join(bad[:3])}"
                             f"{' ...' if len(bad) > 3 else ''} (the run diverged; try a lower "
                             "learning rate or a gradient clip); not saved")
        with _naming(self.directory / name):
            self._manager(name).save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), checksums=ocp.args.JsonSave(sums)))

    def latest_step(self, name: str) -> int | None:
        """The last complete step saved under `name`, or None."""
        if not (self.directory / name).exists():
            return None
        return self._manager(name).latest_step()

    def restore(self, name: str, like: Any, step: int | None = None) -> Any:
        """Restores and verifies step `step` (default: the latest) of `name` with the
        structure, shapes, dtypes and shardings of `like` (arrays or `ShapeDtypeStruct`s).

        Raises `DamagedCheckpoint` if the step cannot be read or its checksums differ.
        """
        step = self.latest_step(name) if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint named {name!r} in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        where = f"{self.directory / name / str(step)}"
        try:
            restored = self._manager(name).restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), checksums=ocp.args.JsonRestore()))
        except Exception as e:  # orbax and tensorstore raise many kinds
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DamagedCheckpoint(f"{where}: unreadable ({first[:200]})") from e
        sums, bad = _digest(restored.state)
        changed = [n for n, s in sums.items() if restored.checksums.get(n) != s]
        if changed or bad:
            raise DamagedCheckpoint(f"{where}: {'checksum mismatch' if changed else 'non-finite'}"
                                    f" in {', '.join((changed or bad)[:3])}")
        return restored.state

    def restore_latest(self, name: str, like: Any) -> tuple[int, Any] | None:
        """(step, tree) of the latest good step of `name`, or None if it has none saved.

        A damaged step is moved to `directory/damaged/` with one warning line and the one
        before it is tried; raises `DamagedCheckpoint` if no step is good.
        """
        if self.latest_step(name) is None:
            return None
        for step in sorted(self._manager(name).all_steps(), reverse=True):
            try:
                return step, self.restore(name, like, step)
            except DamagedCheckpoint as e:
                self._set_aside(name, step)
                print(f"warning: {e}; moved to {self.directory / 'damaged'}, trying the step "
                      "before", file=sys.stderr)
        raise DamagedCheckpoint(f"{self.directory / name}: no good step left (the damaged ones "
                                f"are in {self.directory / 'damaged'}); delete "
                                f"{self.directory / name} to redo this stage")

    def remove(self, name: str) -> None:
        """Deletes every step of `name` (a stage that is redone from its start)."""
        if name in self._managers:
            self._managers.pop(name).close()
        if sharding.is_main_process():
            shutil.rmtree(self.directory / name, ignore_errors=True)
        sharding.barrier(f"checkpoint {name} removed")

    def _set_aside(self, name: str, step: int) -> None:
        self._managers.pop(name).close()
        if sharding.is_main_process():
            target = self.directory / "damaged" / f"{name}-{step}"
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.directory / name / str(step), target)
        sharding.barrier(f"checkpoint {name} {step} set aside")

    def wait(self) -> None:
        for name, manager in self._managers.items():
            with _naming(self.directory / name):
                manager.wait_until_finished()

    def close(self) -> None:
        for name, manager in self._managers.items():
            with _naming(self.directory / name):
                manager.close()
        self._managers.clear()


@contextlib.contextmanager
def _naming(path: pathlib.Path):
    """An OS error of orbax's writes (a full disk, often in a background thread, which loses
    the file's name) re-raised naming the checkpoint directory."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


class _RaisedLater(logging.Filter):
    """Drops orbax's error logs: each failure of its background threads is logged with a
    traceback and then raised to the caller (`_naming`), which reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR
                    and f"{os.sep}orbax{os.sep}" in record.pathname)


@functools.cache
def _quiet_orbax_errors() -> None:
    logging.getLogger("absl").addFilter(_RaisedLater())


def read_tree(path: str | os.PathLike) -> Any:
    """Every array of one saved orbax tree, as numpy, without knowing its structure.

    `path` is a name directory of `Checkpoints` (its latest step is read), one step of it, or
    the item directory of a step.
    """
    path = pathlib.Path(path)
    item = next((path / i for i in _ITEMS if (path / i / "_METADATA").exists()), None)
    if item is None and not (path / "_METADATA").exists():
        steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) \
            if path.is_dir() else []
        if not steps:
            raise ValueError(f"{path}: not an orbax checkpoint (no _METADATA, no steps)")
        return read_tree(path / str(steps[-1]))
    return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(item or path))

