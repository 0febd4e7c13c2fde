"""Orbax checkpoints: named, step-indexed, saved asynchronously with retention."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpoints:
    """One orbax `CheckpointManager` per name (a run, a merge, an init) under `directory`.

    Saves are asynchronous: `save` returns once the arrays are copied off the devices, and
    the next `save`, `wait` or `close` waits for the write. A save is atomic (orbax writes to
    a temporary directory and renames it), so a kill at any moment leaves the last complete
    checkpoint of every name readable.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 2,
                 async_save: bool = True):
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
        """Saves `tree` (arrays only) as step `step` of `name`."""
        self._manager(name).save(step, args=ocp.args.StandardSave(tree))

    def latest_step(self, name: str) -> int | None:
        """The last complete step saved under `name`, or None."""
        if not (self.directory / name).exists():
            return None
        return self._manager(name).latest_step()

    def restore(self, name: str, like: Any, step: int | None = None) -> Any:
        """Restores step `step` (default: the latest) of `name` with the structure, shapes,
        dtypes and shardings of `like` (arrays or `jax.ShapeDtypeStruct`s)."""
        step = self.latest_step(name) if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint named {name!r} in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self._manager(name).restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()
        self._managers.clear()


def read_tree(path: str | os.PathLike) -> Any:
    """Every array of one saved orbax tree, as numpy, without knowing its structure.

    `path` is a name directory of `Checkpoints` (its latest step is read), one step of it, or
    the item directory of a step.
    """
    path = pathlib.Path(path)
    if (path / "default" / "_METADATA").exists():
        path = path / "default"
    elif not (path / "_METADATA").exists():
        steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) \
            if path.is_dir() else []
        if not steps:
            raise ValueError(f"{path}: not an orbax checkpoint (no _METADATA, no steps)")
        path = path / str(steps[-1]) / "default"
    return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path))
