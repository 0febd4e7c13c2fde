"""The device mesh (axes run, data, fsdp, model), the one table of logical-axis rules, the
training and the decode layouts, and multi-process (multi-host) start-up and data movement."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from warp_jax.gemma import layers as gemma_layers

MESH_AXES = ("run", "data", "fsdp", "model")

# Logical name -> mesh axes it may be split over (in order). A mesh axis that does not divide
# the dimension, or that an earlier dimension of the same array took, is dropped.
RULES: dict[str, tuple[str, ...]] = {
    "run": ("run",),
    "batch": ("data", "fsdp"),
    "vocab": ("model",),
    "embed": ("fsdp",),
    "heads": ("model",),
    "kv_heads": ("model",),
    "head_dim": (),
    "mlp": ("model",),
    # Gemma 4: each expert's width splits over `model` as `mlp` (gemma/moe.py says why), the
    # expert axis stays whole; per-layer inputs as the embedding.
    "expert": (),
    "per_layer_embed": ("fsdp",),
}


# Activations: the batch over the data-parallel axes, positions and features whole on each
# device; the embedding table at the lookup keeps whole rows (its vocabulary axis as it is);
# keys and values split by rows only (with K heads that `model` does not divide, XLA's
# propagation would split K over part of it and must then replicate).
ACTIVATION_RULES = (("activation_batch", ("data", "fsdp")), ("activation_length", None),
                    ("activation_embed", None), ("activation_vocab", PartitionSpec.UNCONSTRAINED),
                    ("activation_kv_heads", None))


def _using(mesh: Mesh):
    """The model's `shard_map` parts on `mesh`, laid out by `spec_for`."""
    return gemma_layers.shard_map_mesh(mesh, lambda names, shape: spec_for(names, shape, mesh))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
    """Within it, the model's residual stream and its embedding table at the lookup are
    constrained to `ACTIVATION_RULES` on `mesh` (trace under it the jitted functions that run
    the model on sharded params; without it the model sets no constraint)."""
    with jax.set_mesh(mesh), _using(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
        yield


# Logical names that the decode layout's tensor parallelism must split evenly; `kv_heads` is
# split where it divides and replicated where it does not (one KV head: multi-query attention).
_TENSOR_PARALLEL = ("heads", "mlp", "vocab")
DECODE_SETTINGS = "'auto', 'train' or a tensor-parallel degree (e.g. '8')"


def is_decode_setting(setting: Any) -> bool:
    """Whether `setting` is one of `DECODE_SETTINGS` (a degree as an int or its string)."""
    if setting in ("auto", "train"):
        return True
    try:
        return int(setting) >= 1
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """Where the policy's weights and the sampler's activations live while decoding.

    Decoding reads every weight for every token, so under FSDP it would all-gather the whole
    model token after token. The decode layout splits each run's `data x fsdp x model` devices
    into `tensor_parallel` devices that split the heads, MLPs (experts too), vocabulary (no
    `fsdp` on any weight) and `data_parallel` groups that split the prompts; the KV cache is
    split the same way (its KV heads where they divide). The policy moves to it once per
    rollout (`put`: an all-gather within the data-parallel groups and an all-to-all within the
    tensor-parallel ones, in the compute dtype), its rows too (`rows`); the sampler runs
    under `activations()`. Every run keeps its own devices: the layouts differ only in how a
    run's devices are arranged.

    `mesh` is the decode mesh `(run, data, fsdp, model)` = `(runs, data_parallel, 1,
    tensor_parallel)` over the training mesh's devices in their order; `bridge` names the
    training mesh's `fsdp` axis as `dp x tpf` (the devices it gives to data and to tensor
    parallelism), through which a weight's sharding moves without gathering it whole.
    """

    train: Mesh
    mesh: Mesh
    bridge: Mesh
    kv_heads_split: bool

    @property
    def tensor_parallel(self) -> int:
        return self.mesh.shape["model"]

    @property
    def data_parallel(self) -> int:
        return self.mesh.shape["data"]

    @contextlib.contextmanager
    def activations(self):
        """Within it (inside a traced function), the model's activations are constrained to
        the decode layout: rows over the data-parallel groups, features whole, keys and
        values split over the tensor-parallel devices where their heads divide."""
        rules = (*ACTIVATION_RULES[:-1],
                 ("activation_kv_heads", "model" if self.kv_heads_split else None))
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), _using(self.mesh), \
                nn.logical_axis_rules(rules):
            yield

    def put(self, params: Any, boxed: Any) -> Any:
        """`params` (one run's, traced; `boxed` their abstract `nn.Partitioned` boxes) moved
        from the training layout to the decode layout. Cast them to the compute dtype first:
        the collectives then move half the bytes of float32 weights."""
        def one(x, box):
            names, shape = box.names, box.value.shape
            train, decode = spec_for(names, shape, self.train), spec_for(names, shape, self.mesh)
            steps = [_respec(train, {"fsdp": ("dp", "tpf")}),
                     _respec(train, {"fsdp": ("tpf",)}),
                     _respec(decode, {"model": ("tpf", "model"), "data": ("data", "dp")})]
            for spec in steps:
                x = jax.lax.with_sharding_constraint(x, NamedSharding(self.bridge, spec))
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, decode))

        return jax.tree.map(one, params, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))

    def rows(self, x: jax.Array) -> jax.Array:
        """`x` `[B, ...]` (traced) split over the data-parallel groups by rows, where they
        divide B (else left as it is)."""
        if x.shape[0] % self.data_parallel:
            return x
        spec = PartitionSpec("data", *(None,) * (x.ndim - 1))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def _respec(spec: PartitionSpec, rename: dict[str, tuple[str, ...]]) -> PartitionSpec:
    """`spec` with each mesh axis replaced by the axes of `rename` (kept where absent)."""
    out = []
    for entry in spec:
        axes = tuple(a for axis in gemma_layers.spec_axes(entry) for a in rename.get(axis, (axis,)))
        out.append(axes if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*out)


def _logical_dims(boxed: Any) -> dict[str, set[int]]:
    """The sizes that each logical axis name takes in the boxed params."""
    dims: dict[str, set[int]] = {}
    for box in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        if isinstance(box, nn.Partitioned):
            for name, size in zip(box.names, box.value.shape, strict=True):
                dims.setdefault(name, set()).add(size)
    return dims


def decode_tensor_parallel(boxed: Any, mesh_shape: dict[str, int],
                           setting: str | int = "auto", name: str = "decode_layout") -> int:
    """The decode layout's tensor-parallel degree on a mesh of `mesh_shape`: `model` times a
    divisor of `fsdp` that divides every head, MLP (the experts' too) and vocabulary
    dimension of the boxed params; "auto" takes the largest. An int (or its string) asks for
    that degree. Raises `ValueError` naming `name` for a degree the model or the mesh cannot
    take."""
    model, fsdp = mesh_shape["model"], mesh_shape["fsdp"]
    dims = _logical_dims(boxed)
    sizes = sorted({size for n in _TENSOR_PARALLEL for size in dims.get(n, ())})

    def fits(t):
        return all(size % t == 0 for size in sizes)

    candidates = [model * f for f in range(fsdp, 0, -1) if fsdp % f == 0]
    if setting == "auto":
        return next(t for t in candidates if fits(t) or t == model)
    if not is_decode_setting(setting) or setting == "train":
        raise ValueError(f"{name} = {setting!r}: use {DECODE_SETTINGS}")
    t = int(setting)
    if t not in candidates:
        raise ValueError(f"{name} = {setting!r}: the tensor-parallel degree must be mesh.model "
                         f"({model}) times a divisor of mesh.fsdp ({fsdp}): one of "
                         f"{sorted(candidates)}")
    if not fits(t):
        bad = [s for s in sizes if s % t]
        raise ValueError(f"{name} = {setting!r}: {t} does not divide the model's heads, MLP "
                         f"or vocabulary dimension(s) {bad}; 'auto' picks "
                         f"{decode_tensor_parallel(boxed, mesh_shape)}")
    return t


def decode_layout(boxed: Any, mesh: Mesh | None,
                  setting: str | int = "auto") -> DecodeLayout | None:
    """The `DecodeLayout` of the model whose boxed params are `boxed` on the training `mesh`
    (None without a mesh, or with `setting` "train": decode on the training layout)."""
    if mesh is None or setting == "train":
        return None
    tp = decode_tensor_parallel(boxed, dict(mesh.shape), setting)
    run, data, fsdp, model = (mesh.shape[a] for a in MESH_AXES)
    tpf = tp // model
    devices = mesh.devices
    kv = _logical_dims(boxed).get("kv_heads", set())
    auto = (AxisType.Auto,)
    return DecodeLayout(
        train=mesh,
        mesh=Mesh(devices.reshape(run, data * fsdp // tpf, 1, tp), MESH_AXES,
                  axis_types=auto * 4),
        bridge=Mesh(devices.reshape(run, data, fsdp // tpf, tpf, model),
                    ("run", "data", "dp", "tpf", "model"), axis_types=auto * 5),
        kv_heads_split=all(k % tp == 0 for k in kv))


def make_mesh(run: int = 1, data: int = 1, fsdp: int = 1, model: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes `("run", "data", "fsdp", "model")` over `run*data*fsdp*model` devices.

    On a TPU slice the devices are laid out along its torus (`create_device_mesh`), each
    run's devices a contiguous block; where no mesh axis fits whole onto physical axes (run
    2 x fsdp 32 on a v5p-128's 4x4x4 chips, say) physical axes are split between mesh axes.
    Across several slices (multi-slice, over the data-center network) the first of `run`,
    `data` and `fsdp` that the number of slices divides is split between them
    (`create_hybrid_device_mesh`): with `run` that, every run trains on slices of its own
    and only the merges cross the network.
    """
    shape = (run, data, fsdp, model)
    devices = list(jax.devices() if devices is None else devices)
    size = int(np.prod(shape))
    if any(s < 1 for s in shape) or size > len(devices):
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} needs "
                         f"{size} devices; {len(devices)} available")
    devices = devices[:size]
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        across = next((i for i in range(3) if shape[i] % slices == 0), None)
        if across is None:
            raise ValueError(f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} over "
                             f"{slices} slices: run, data or fsdp must be a multiple of "
                             f"{slices}")
        dcn = tuple(slices if i == across else 1 for i in range(4))
        per_slice = tuple(n // d for n, d in zip(shape, dcn, strict=True))
        grid = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices,
                                                    allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, NotImplementedError, ValueError):
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def mesh_shape(num_devices: int, *, runs: int = 1, data: int = 0, fsdp: int = 0,
               model: int = 1, batch_size: int | None = None,
               names: dict[str, str] | None = None) -> dict[str, int]:
    """The mesh shape `{run, data, fsdp, model}` on `num_devices` devices.

    `run` is `runs` where it divides the devices (else 1: the runs then take turns on the
    whole mesh). Of each run's devices, `model` split the weights tensor-parallel and the rest
    are `data` x `fsdp`: as given, with one of them 0 what the other leaves, with both 0 all
    `data` (weights replicated). Both split each step's `batch_size` rows, so it must be a
    multiple of their product; `fsdp` also splits the weights and optimizer state.

    Raises `ValueError` naming the bad setting by `names` (e.g. `{"model":
    "config.mesh.model"}`; default: the argument's name, and "mesh" for the three together).
    """
    names = {"data": "data", "fsdp": "fsdp", "model": "model", "batch_size": "batch_size",
             "mesh": "mesh (data, fsdp, model)", **(names or {})}

    def fail(field, value, valid):
        raise ValueError(f"{names[field]} = {value!r}: {valid}")

    for field, value in (("data", data), ("fsdp", fsdp), ("model", model)):
        if not isinstance(value, int) or value < (1 if field == "model" else 0):
            fail(field, value, "must be a positive int" + (
                "" if field == "model" else " (or 0: what the other axes leave)"))
    runs = runs if num_devices % runs == 0 else 1
    per_run = num_devices // runs
    where = f"({num_devices} device(s), {runs} run(s) at a time)"
    if per_run % model:
        fail("model", model, f"must divide the {per_run} device(s) of each run {where}")
    rest = per_run // model
    if (data or fsdp) and not (data and fsdp):
        given = data or fsdp
        if rest % given:
            fail("data" if data else "fsdp", given, f"must divide the {rest} device(s) of each "
                 f"run left by {names['model']} = {model}")
        data, fsdp = (given, rest // given) if data else (rest // given, given)
    elif not data:
        data, fsdp = rest, 1
    if data * fsdp * model != per_run:
        fail("mesh", (data, fsdp, model), f"data x fsdp x model must be the {per_run} "
             f"device(s) of each run {where}")
    if batch_size is not None and batch_size % (data * fsdp):
        fail("batch_size", batch_size, f"must be a multiple of mesh data x fsdp = {data} x "
             f"{fsdp}, the devices that split each run's rows ({per_run} per run; "
             f"{names['model']} takes devices that do not)")
    return {"run": runs, "data": data, "fsdp": fsdp, "model": model}


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """The mesh `PartitionSpec` of an array with these logical axis names and shape."""
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape, strict=True):
        axes = []
        size = 1
        for axis in RULES.get(name, ()) if name else ():
            n = mesh.shape[axis]
            if axis in used or n == 1 or dim % (size * n):
                continue
            axes.append(axis)
            size *= n
        used.update(axes)
        out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*out)


def logical_sharding(logical: Sequence[str | None], shape: Sequence[int],
                     mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical, shape, mesh))


def param_shardings(boxed_tree: Any, mesh: Mesh,
                    prefix: Sequence[tuple[str, int]] = ()) -> Any:
    """Shardings for a tree whose leaves are `nn.Partitioned` boxes (e.g. `jax.eval_shape` of
    `init`, or of a train state built on boxed params), in the structure of the unboxed tree.

    `prefix` gives `(logical name, size)` of leading axes stacked in front of every leaf
    (`[("run", M)]` for the M stacked runs of `reinforce`); unboxed leaves are split only
    along those.
    """
    names = tuple(name for name, _ in prefix)
    sizes = tuple(size for _, size in prefix)

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            shape = (*sizes, *leaf.value.shape)
            return logical_sharding((*names, *leaf.names), shape, mesh)
        shape = (*sizes, *getattr(leaf, "shape", ()))
        return logical_sharding(names + (None,) * (len(shape) - len(names)), shape, mesh)

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def run_axis(mesh: Mesh, num_runs: int | None) -> tuple[str | None, ...]:
    """The spec entry of a leading axis of `num_runs` stacked runs: `("run",)` when the mesh's
    run axis splits it, `(None,)` when it does not, `()` without stacked runs."""
    if not num_runs:
        return ()
    size = mesh.shape["run"]
    return ("run",) if size > 1 and num_runs % size == 0 else (None,)


def batch_sharding(mesh: Mesh, ndim: int, num_runs: int | None = None) -> NamedSharding:
    """Arrays `[B, ...]` (or `[M, B, ...]` for `num_runs` stacked runs) split over `data` and
    `fsdp` (and `run`); B must be a multiple of the product of those mesh axes."""
    axes = tuple(a for a in RULES["batch"] if mesh.shape[a] > 1)
    batch = axes if len(axes) > 1 else (axes[0] if axes else None)
    return NamedSharding(mesh, PartitionSpec(*run_axis(mesh, num_runs), batch,
                                             *(None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins this process to a multi-process JAX job (one process per host of a TPU pod slice).

    Call it first, before anything touches a device. On Cloud TPU, Slurm and the other
    clusters that `jax.distributed.initialize` detects, every argument may be None; elsewhere
    (e.g. several CPU processes on one machine) pass all three. CPU processes exchange data
    through gloo and run one program at a time: with several in flight, their collectives
    could wait on each other across processes.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_main_process() -> bool:
    """Whether this process writes the job's shared outputs (process 0)."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """`tree` as NumPy arrays holding every element, in every process: arrays that span other
    processes' devices are gathered (every process must call this together)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def to_mesh(tree: Any, shardings: Any) -> Any:
    """Host data (the same in every process) or local arrays as global arrays with
    `shardings`; arrays already spanning other processes are left as they are. Unchanged in a
    one-process job, where `jax.jit` places its inputs itself."""
    if jax.process_count() == 1:
        return tree

    def one(x, sh):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jax.device_put(
                np.asarray(jax.random.key_data(x)), sh), impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), sh)

    return jax.tree.map(one, tree, shardings)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (returns at once in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def host_local_to_global(tree: Any) -> Any:
    """Arrays that every process computed alike on its own devices, as global arrays
    replicated over all devices (what checkpoints and computations over the whole job take);
    unchanged in a one-process job."""
    if jax.process_count() == 1:
        return tree
    everywhere = NamedSharding(Mesh(np.array(jax.devices()), ("devices",)), PartitionSpec())
    return jax.tree.map(lambda x: jax.device_put(to_host(x), everywhere), tree)
