"""Synchronous data parallelism (section 3.3): one per-device step, mapped over devices.

The train and eval steps are written for one device and average across devices with
`jax.lax.pmean` / `psum` over the axis named `AXIS`. This module is the only place that
knows how they are mapped. Two mappings give the same result:

- "pmap": `jax.pmap`, as the paper's multi-GPU design reads;
- "shard_map": `jax.jit(jax.shard_map(...))`, JAX's current primitive (pmap is now
  implemented on top of it and is in maintenance mode).

Both see the same data layout: every array carries a leading axis of one entry per
device, sharded over a one-dimensional mesh. Replicated values (parameters, optimiser
state) are stacked copies; batches are [devices, per-device batch, ...]. On several
hosts the mesh spans all devices and each host supplies its local entries.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "batch"
MAPPINGS = ("pmap", "shard_map")


def check_mapping(mapping: str) -> None:
  if mapping not in MAPPINGS:
    raise ValueError(f"Unknown device mapping {mapping!r}; choose one of {MAPPINGS}.")


def check_batch_size(global_batch: int, *, what: str = "config.batch_size") -> int:
  """Returns the per-device batch; raises if the devices do not divide the batch."""
  devices = jax.device_count()
  if global_batch < 1:
    raise ValueError(f"{what} must be a positive multiple of the {devices} devices, got "
                     f"{global_batch}.")
  if global_batch % devices:
    # The CPU's device count is the package's choice (xla_flags.py), so say how to set it.
    on_cpu = (" or set the number of CPU devices, e.g. "
              "XLA_FLAGS=--xla_force_host_platform_device_count=1"
              if jax.default_backend() == "cpu" else "")
    raise ValueError(
        f"{what}={global_batch} is not divisible by the {devices} devices "
        f"({jax.process_count()} process(es) x {jax.local_device_count()} local): pick a "
        f"multiple of {devices}, e.g. {max(devices, global_batch - global_batch % devices)}"
        f"{on_cpu}.")
  return global_batch // devices


class DeviceMapping:
  """Places data on the local devices and maps per-device functions over them."""

  def __init__(self, mapping: str = "pmap", devices: list | None = None):
    """`devices`: a subset of the devices (single host) to map over; default all."""
    check_mapping(mapping)
    self.kind = mapping
    if devices is None:
      # All devices of all processes, for both mappings: a pmap over only the local
      # devices would all-reduce within each process and leave the hosts' parameters
      # to drift apart (tests/test_train.py runs two processes against one).
      devices = jax.devices()
    self.devices = list(devices)
    self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
    self.sharding = NamedSharding(self.mesh, P(AXIS))

  @property
  def local_device_count(self) -> int:
    return sum(d.process_index == jax.process_index() for d in self.devices)

  def shard(self, tree: Any) -> Any:
    """Puts host arrays shaped [local devices, ...] onto the devices, one entry each."""
    def put(x):
      if isinstance(x, jax.Array) and x.sharding == self.sharding:
        return x
      return jax.make_array_from_process_local_data(self.sharding, np.asarray(x))
    return jax.tree_util.tree_map(put, tree)

  def prefetch(self, batches: Iterable[Any], size: int = 2) -> Iterator[Any]:
    """BATCHES put on the devices SIZE ahead of the one handed out (0: none ahead).

    The copies are dispatched asynchronously, so the next batches travel to the devices
    while the step computes; the batches and their order are unchanged.
    """
    queue = collections.deque()
    for batch in batches:
      queue.append(self.shard(batch))
      if len(queue) > size:
        yield queue.popleft()
    while queue:
      yield queue.popleft()

  def resident(self, make_batches: Callable[[], Iterable[Any]], *, max_bytes: int
               ) -> Callable[[], Iterator[Any]]:
    """A function yielding the passes of MAKE_BATCHES (a finite split, read again on
    each call) put on the devices, which keeps them there after the first whole pass
    when they take at most MAX_BYTES of this process's device memory: later passes then
    read nothing from the host. Same batches, same order."""
    kept = None

    def batches() -> Iterator[Any]:
      nonlocal kept
      if kept is not None:
        yield from kept
        return
      first, size = [], 0
      for batch in make_batches():
        size += sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(batch))
        batch = self.shard(batch)
        if first is not None and size <= max_bytes:
          first.append(batch)
        else:
          first = None
        yield batch
      kept = first

    return batches

  def replicate(self, tree: Any) -> Any:
    """One copy of every leaf per device (stacked on a new leading axis)."""
    n = self.local_device_count
    return self.shard(jax.tree_util.tree_map(
        lambda x: np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x)), tree))

  def unreplicate(self, tree: Any) -> Any:
    """The first local device's copy of every leaf, as a host numpy array."""
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)

  def map(self, fn: Callable, *, donate_argnums: tuple[int, ...] = ()) -> Callable:
    """Maps `fn(*args)`, written for one device, over the leading device axis."""
    if self.kind == "pmap":
      return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate_argnums,
                      devices=self.devices)

    @functools.wraps(fn)
    def per_device(*args):
      squeezed = jax.tree_util.tree_map(lambda x: x[0], args)
      return jax.tree_util.tree_map(lambda y: y[None], fn(*squeezed))

    @functools.cache
    def compiled(num_args: int):
      mapped = jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(AXIS),) * num_args,
                             out_specs=P(AXIS))
      return jax.jit(mapped, donate_argnums=donate_argnums)

    return lambda *args: compiled(len(args))(*args)
