"""Meshes over (data, fsdp, tensor), the one logical-axis rule table, and shardings derived from it.

The only module that calls JAX mesh APIs. Model code names logical axes (`embed`, `mlp`, ...) only;
`LOGICAL_RULES` maps each to mesh axes. A mesh axis that does not divide a dimension is dropped for
that dimension (e.g. 9 heads on a 4-way tensor axis stay replicated) rather than failing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aft_jax.errors import SettingError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", "fsdp"),  # an adapter's B (and A where its input axes are not on fsdp) is split over it
)

# Mesh shapes as (data, fsdp, tensor); -1 takes all remaining devices.
MESH_PRESETS: dict[str, tuple[int, int, int]] = {
    "single": (1, 1, 1),
    "data": (-1, 1, 1),
    "fsdp": (1, -1, 1),
    "tensor": (1, 1, -1),
    "fsdp_tensor2": (1, -1, 2),
    "fsdp_tensor4": (1, -1, 4),
}

_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar("aft_jax_mesh", default=None)


def initialize_distributed() -> None:
    """Joins a multi-process run, before any device is used: from `AFT_COORDINATOR` (host:port),
    `AFT_NUM_PROCESSES` and `AFT_PROCESS_ID`, or with `AFT_DISTRIBUTED=auto` as JAX detects it on Cloud TPU
    pods and SLURM. Does nothing when neither is set (one process)."""
    if os.environ.get("AFT_COORDINATOR"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need a transport
        jax.distributed.initialize(
            os.environ["AFT_COORDINATOR"], int(os.environ["AFT_NUM_PROCESSES"]), int(os.environ["AFT_PROCESS_ID"])
        )
    elif os.environ.get("AFT_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def is_main_process() -> bool:
    """Process 0 writes logs, metrics, reports and exported files."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process reaches this point (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def sum_over_processes(x: np.ndarray) -> np.ndarray:
    """The elementwise sum of a host array over all processes (`x` itself with one process)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0).astype(x.dtype)


def process_rows(mesh: Mesh, rows: int) -> slice:
    """The rows of a `[rows, ...]` batch split over (data, fsdp) that this process's devices hold: one
    contiguous block (devices are laid out process by process), all of them with one process."""
    index = batch_sharding(mesh, 1).addressable_devices_indices_map((rows,))
    held = sorted({r for (part,) in index.values() for r in range(*part.indices(rows))})
    if held != list(range(held[0], held[-1] + 1)):
        raise ValueError(f"this process holds rows {held} of the batch, not one block; reorder the mesh devices")
    return slice(held[0], held[-1] + 1)


def put_process_local(x, target: NamedSharding, global_rows: int) -> jax.Array:
    """A global array of `global_rows` rows from this process's own block of them (`process_rows`)."""
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(target, x, (global_rows, *x.shape[1:]))


def put_global(x, target: NamedSharding) -> jax.Array:
    """A global array from the same host value on every process: each fills only its own devices' shards."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def parse_mesh_shape(spec: Sequence[int] | str) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes from a preset name (`MESH_PRESETS`), "data,fsdp,tensor" sizes, or a shape;
    at most one size is -1 (all remaining devices). The run config checks `train.mesh` and `sample.mesh`
    with it at load, naming the key before the error's message."""
    if isinstance(spec, str) and "," not in spec:
        if spec not in MESH_PRESETS:
            raise SettingError(
                f"unknown mesh preset {spec!r}; expected one of {sorted(MESH_PRESETS)} or data,fsdp,tensor"
            )
        return MESH_PRESETS[spec]
    try:
        shape = tuple(int(x) for x in spec.split(",")) if isinstance(spec, str) else tuple(spec)
    except ValueError:
        raise SettingError(f"mesh {spec!r}: expected a preset name or three integers data,fsdp,tensor") from None
    if len(shape) != 3 or shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
        raise SettingError(f"mesh shape {list(shape)} must have 3 sizes (data, fsdp, tensor) >= 1, at most one -1")
    return shape


def make_mesh(
    shape: Sequence[int] | str = "fsdp", devices: Sequence[jax.Device] | None = None, name: str = "mesh"
) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: every device of every
    process), shaped as `parse_mesh_shape` reads `shape`; `name` is the setting's key (`train.mesh`, ...),
    for the error's message."""
    devices = list(devices if devices is not None else jax.devices())
    try:
        sizes = list(parse_mesh_shape(shape))
    except SettingError as err:
        raise SettingError(f"{name}={shape!r}: {err}") from None
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise SettingError(
                f"{name}={shape!r}: mesh shape {sizes} (-1: the rest) does not divide the {len(devices)} devices"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) > len(devices):
        raise SettingError(
            f"{name}={shape!r}: mesh shape {sizes} needs {math.prod(sizes)} devices, only {len(devices)} available"
        )
    devices = devices[: math.prod(sizes)]
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def single_device_mesh() -> Mesh:
    return make_mesh((1, 1, 1), jax.devices()[:1])


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=None) -> PartitionSpec:
    """Resolves logical axis names to a PartitionSpec; each mesh axis is used at most once, only where
    its size (times those already on that dimension) divides the dimension, and never when of size 1."""
    table = dict(rules or LOGICAL_RULES)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        wanted = table.get(name) if name is not None else None
        wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted or ())
        chosen, size = [], 1
        for mesh_axis in wanted:
            n = mesh.shape[mesh_axis]
            if n > 1 and mesh_axis not in used and dim % (size * n) == 0:
                chosen.append(mesh_axis)
                size *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules=None):
    """The NamedSharding of every parameter in `state`, from its `axes` metadata."""

    def one(variable):
        axes = variable.get_metadata().get("axes")
        value = variable.get_value()
        if axes is None:
            return variable.replace(NamedSharding(mesh, PartitionSpec()))
        return variable.replace(NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def put_logical(x, axes: Sequence[str | None], mesh: Mesh) -> jax.Array:
    """Puts `x` on `mesh`, sharded by logical axis names (as far as the mesh divides each dimension)."""
    return jax.device_put(x, NamedSharding(mesh, logical_to_spec(axes, np.shape(x), mesh)))


def shard_rows(x, mesh: Mesh) -> jax.Array:
    """Puts `x` on `mesh` with its leading (batch) axis split over data x fsdp as far as it divides."""
    return put_logical(x, ("batch",) + (None,) * (np.ndim(x) - 1), mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def mesh_of(tree) -> Mesh:
    """The mesh the (first) array of `tree` lives on; a one-device mesh for unsharded arrays."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return leaf.sharding.mesh
    return single_device_mesh()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=None) -> Iterator[Mesh]:
    """Makes `constrain` active: activations named with logical axes get sharding constraints on `mesh`."""
    token = _ACTIVE.set((mesh, tuple(rules or LOGICAL_RULES)))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axis names inside `use_mesh`; the identity outside it and on a
    one-device mesh."""
    active = _ACTIVE.get()
    if active is None or active[0].size == 1:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))


def active_spec(axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
    """`logical_to_spec` on the mesh of `use_mesh` (nothing split outside it)."""
    active = _ACTIVE.get()
    return PartitionSpec() if active is None else logical_to_spec(axes, shape, active[0], active[1])


def per_shard(fn, args: tuple, in_axes: tuple, out_axes: Sequence[str | None]):
    """`fn(*args)` inside `use_mesh` on a mesh of several devices: by `jax.shard_map`, each device on its own
    shard of the arguments (each leaf of `args[i]` split by the logical axes `in_axes[i]`, one name per
    dimension, trailing dimensions unnamed) and the output joined by `out_axes`. For calls XLA cannot
    partition (a Pallas kernel); `fn(*args)` itself elsewhere."""
    active = _ACTIVE.get()
    if active is None or active[0].size == 1:
        return fn(*args)
    mesh, rules = active

    def spec(x, axes):
        return logical_to_spec(tuple(axes) + (None,) * (x.ndim - len(axes)), x.shape, mesh, rules)

    in_specs = tuple(jax.tree.map(lambda x, a=axes: spec(x, a), arg) for arg, axes in zip(args, in_axes))
    out_spec = logical_to_spec(out_axes, jax.eval_shape(fn, *args).shape, mesh, rules)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({np.size(mesh.devices)} devices)"
