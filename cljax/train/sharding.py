"""Device meshes and shardings for data-parallel (and parameter-sharded) runs.

The mesh has two axes: ``data`` splits every batch; ``model`` shards parameters,
optimizer state and param-shaped method state (EWC Fisher and anchors, SI paths)
along their largest dimension that it divides (ZeRO-3 / FSDP style), for the large
and xl sizes. Everything else (step, RNG, counters, replay buffers) is replicated.
The jitted steps take these through ``in_shardings`` / ``out_shardings``; XLA's
GSPMD inserts the collectives. Same code on one CPU, 8 GPUs or a TPU pod slice.

Multi-host: call :func:`initialize_distributed` first (``--distributed``); every
host builds the same global batch order from the same seed and contributes its own
slice of each global batch (:func:`shard_batch`). ``--batch_size`` is the global
batch: it is split over all devices of all hosts, so it must be divisible by the
``data`` axis size.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Leaves smaller than this stay replicated even on a model axis (biases, LayerNorm).
MIN_SHARDED_SIZE = 2 ** 14


def initialize_distributed() -> None:
  """Starts JAX's multi-host runtime. TPU pods, SLURM, Open MPI and Kubernetes are
  detected; elsewhere (several processes on CPUs or GPUs) set JAX_COORDINATOR_ADDRESS
  (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process. On
  CPUs the collectives go through gloo. Once per process: later calls (a sweep's later
  runs) do nothing."""
  if jax.distributed.is_initialized():
    return
  count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
  if (count is None) != (index is None):
    raise ValueError("Set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (or neither, on a "
                     f"cluster JAX detects); found {count=} {index=}.")
  if jax.config.jax_platforms == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(num_processes=None if count is None else int(count),
                             process_id=None if index is None else int(index))
  logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
  """A ``(data, model)`` mesh over ``devices`` (default all); ``data=-1`` takes what
  ``model`` leaves."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if model < 1 or n % model:
    raise ValueError(f"--mesh_model={model} must divide the {n} devices.")
  if data == -1:
    data = n // model
  if data * model != n:
    raise ValueError(f"Mesh {data} x {model} does not cover the {n} devices; use "
                     "--mesh_data=-1 to take the rest.")
  # Auto axes: GSPMD propagates shardings through the model and inserts collectives.
  return jax.make_mesh((data, model), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def _leaf_spec(shape: tuple[int, ...], model_size: int) -> P:
  if model_size == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % model_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "model"
      return P(*spec)
  return P()


def param_shardings(mesh: Mesh, tree: Any) -> Any:
  """Shardings for a params-like pytree (params, Adam moments, Fisher, anchors)."""
  model_size = mesh.shape["model"]
  return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(tuple(x.shape), model_size)),
                      tree)


def state_shardings(mesh: Mesh, state: Any, params: Any) -> Any:
  """Shardings for a TrainState: any subtree shaped like the params (the params
  themselves, optimizer moments, param-shaped method state) is sharded like them;
  everything else is replicated."""
  param_def = jax.tree.structure(params)
  rep = replicated(mesh)

  def visit(node):
    if jax.tree.structure(node) == param_def and param_def.num_leaves > 1:
      return param_shardings(mesh, node)
    if isinstance(node, (tuple, list)) and not hasattr(node, "shape"):
      children = [visit(c) for c in node]
      return type(node)(*children) if hasattr(node, "_fields") else type(node)(children)
    if isinstance(node, dict):
      return {k: visit(v) for k, v in node.items()}
    return jax.tree.map(lambda _: rep, node)

  return visit(state)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Puts a global batch (the same numpy arrays on every host) on the mesh, each
  host contributing the rows of its own devices."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  n = next(iter(batch.values())).shape[0]
  per = n // jax.process_count()
  lo = jax.process_index() * per
  return {k: jax.make_array_from_process_local_data(sharding, v[lo:lo + per], v.shape)
          for k, v in batch.items()}


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "--batch_size") -> None:
  if batch_size % mesh.shape["data"]:
    raise ValueError(f"{what}={batch_size} is the global batch; it must be divisible by "
                     f"the mesh's data axis ({mesh.shape['data']} devices).")


def runs_mesh(mesh: Mesh, runs: int) -> Mesh:
  """A ``(runs, data)`` mesh over ``mesh``'s devices, in their order, for ``runs``
  runs trained side by side: the run axis takes the most devices that divide both the
  runs and the devices (one run's slice per device group), ``data`` splits each run's
  batch over the rest. Runs side by side need ``--mesh_model=1``."""
  devices = np.asarray(mesh.devices).reshape(-1)
  r = math.gcd(runs, devices.size)
  return Mesh(devices.reshape(r, devices.size // r), ("runs", "data"),
              axis_types=(jax.sharding.AxisType.Auto,) * 2)


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array that every process holds whole, put on ``sharding`` (each process
  places the parts its own devices hold)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class RunAxis(NamedTuple):
  """Where the stacked runs live: the state's run axis on ``runs`` (``P("runs")``),
  each step's ``[runs, batch, ...]`` batch on ``batches`` (``P("runs", "data")``),
  metrics and flags replicated."""
  mesh: Mesh
  runs: NamedSharding
  batches: NamedSharding
  replicated: NamedSharding

  @classmethod
  def over(cls, mesh: Mesh, n_runs: int) -> RunAxis:
    rmesh = runs_mesh(mesh, n_runs)
    return cls(rmesh, NamedSharding(rmesh, P("runs")), NamedSharding(rmesh, P("runs", "data")),
               NamedSharding(rmesh, P()))

  def put_batch(self, batch: dict) -> dict:
    return {k: put_global(v, self.batches) for k, v in batch.items()}

  def batch_shapes(self, batch: dict) -> dict:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batches)
            for k, v in batch.items()}
