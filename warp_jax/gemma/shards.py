"""Checkpoint tensors on disk as safetensors: read lazily, one tensor at a time, and written
as the shards and index transformers reads (`model-0000i-of-0000n.safetensors`,
`model.safetensors.index.json`)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default shard size


def write(directory: str | os.PathLike, state: Mapping[str, np.ndarray]) -> None:
    """Writes `state` (name -> array) into `directory`, in shards of at most 5 GiB."""
    groups: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in state.items():
        if groups[-1] and size + value.nbytes > MAX_SHARD_BYTES:
            groups.append({})
            size = 0
        groups[-1][name] = value
        size += value.nbytes
    writer = ShardWriter(directory, len(groups))
    for group in groups:
        writer.write(group)
    writer.close()


class ShardWriter:
    """Writes a checkpoint's tensors as `num_files` safetensors files, one `write` each, in
    the layout transformers reads: `model.safetensors` alone, or
    `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json` (on `close`)."""

    def __init__(self, directory: str | os.PathLike, num_files: int):
        self.directory, self.num_files = pathlib.Path(directory), num_files
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self._written = 0

    def write(self, tensors: Mapping[str, np.ndarray]) -> None:
        if self._written == self.num_files:
            raise ValueError(f"all {self.num_files} safetensors files are written")
        self._written += 1
        file = ("model.safetensors" if self.num_files == 1 else
                f"model-{self._written:05d}-of-{self.num_files:05d}.safetensors")
        save_file({n: np.ascontiguousarray(v) for n, v in tensors.items()},
                  self.directory / file, metadata={"format": "pt"})
        self.weight_map |= dict.fromkeys(tensors, file)
        self.total += sum(int(np.asarray(v).nbytes) for v in tensors.values())

    def close(self) -> None:
        if self._written != self.num_files:
            raise ValueError(f"{self._written} of {self.num_files} safetensors files written")
        if self.num_files > 1:
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": self.weight_map},
                indent=1))


class File:
    """One safetensors file, read lazily: its tensors' shapes up front, tensors on demand.

    A damaged file (truncated, not safetensors) is a `ValueError` naming it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        with self._open() as f:
            self.shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}

    @contextlib.contextmanager
    def _open(self):
        try:
            with safe_open(str(self.path), framework="numpy") as f:
                yield f
        except SafetensorError as e:
            raise ValueError(f"{self.path}: not a readable safetensors file ({e})") from None

    def load(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        with self._open() as f:
            return {name: f.get_tensor(name) for name in names}


def tensors(source) -> Iterator[tuple[str, Any]]:
    """(name, loader) pairs from a mapping or, lazily, from a safetensors directory/file."""
    if isinstance(source, Mapping):
        for name, value in source.items():
            yield name, lambda value=value: _to_numpy(value)
        return
    path = pathlib.Path(source)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise ValueError(f"no safetensors files at {str(path)!r}")
    for file in map(File, files):
        for name in file.shapes:
            yield name, lambda file=file, name=name: file.load([name])[name]


def _to_numpy(value) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        import ml_dtypes
        import torch

        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)
