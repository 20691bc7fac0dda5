"""Where the frozen backbone lives: its storage dtype and its sharding over the devices.

The backbone is read-only during prompt tuning, so two memory savings are free of any
optimizer bookkeeping:

* `store_frozen(frozen, 'bfloat16')` keeps the frozen matmul kernels in bfloat16 on the device
  (half their memory). With `model.dtype='bfloat16'` this changes no result: the layers cast
  their kernels to the compute dtype anyway. LayerNorms, biases, embeddings and everything that
  trains stay float32.
* `frozen_shardings(frozen, mesh)` shards every frozen leaf over the data axis of the mesh
  (FSDP-like). The batch stays data-parallel; from the sharding annotations XLA inserts the
  all-gather of a layer's weights where the layer needs them, so a device holds ~1/n of the
  backbone plus what one layer gathers.

Both are options of `config.model` (`frozen_dtype`, `frozen_sharding`) read by the trainer.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Tree = Dict[str, Any]

FROZEN_DTYPES = ("float32", "bfloat16")
FROZEN_SHARDINGS = ("replicated", "sharded")


def check(frozen_dtype: str, frozen_sharding: str) -> None:
  if frozen_dtype not in FROZEN_DTYPES:
    raise ValueError(f"config model.frozen_dtype={frozen_dtype!r}: one of {FROZEN_DTYPES}")
  if frozen_sharding not in FROZEN_SHARDINGS:
    raise ValueError(f"config model.frozen_sharding={frozen_sharding!r}: one of "
                     f"{FROZEN_SHARDINGS}")


def store_frozen(frozen: Tree, dtype: str) -> Tree:
  """The frozen tree with its 'kernel' leaves of the 'params' collection in `dtype`."""
  check(dtype, "replicated")
  if dtype == "float32" or "params" not in frozen:
    return frozen

  def cast(path, x):
    if getattr(path[-1], "key", None) != "kernel" or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):  # abstract trees (compile-only benchmarks)
      return jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding)
    return x.astype(jnp.bfloat16)
  return {**frozen, "params": jax.tree_util.tree_map_with_path(cast, frozen["params"])}


def leaf_spec(shape: Sequence[int], n: int, axis_name: str = "data") -> jax.sharding.PartitionSpec:
  """Shards the largest axis that `n` divides; a leaf with none (or n == 1) is replicated."""
  fits = [(size, i) for i, size in enumerate(shape) if n > 1 and size % n == 0]
  if not fits:
    return jax.sharding.PartitionSpec()
  _, axis = max(fits)
  return jax.sharding.PartitionSpec(*([None] * axis + [axis_name]))


def frozen_shardings(frozen: Tree, mesh: jax.sharding.Mesh, kind: str = "sharded",
                     axis_name: str = "data") -> Tree:
  """A NamedSharding per frozen leaf: `kind` 'sharded' (over `axis_name`) or 'replicated'."""
  check("float32", kind)
  n = mesh.shape[axis_name]
  if kind == "replicated":
    n = 1
  return jax.tree.map(
      lambda x: jax.sharding.NamedSharding(mesh, leaf_spec(np.shape(x), n, axis_name)), frozen)


def gathered(step: Any, frozen_sharding: Tree, replicated: Any) -> Any:
  """`step(state, frozen, batch)` that all-gathers each sharded frozen leaf where it is used.

  The constraint makes every layer compute with the whole weight, as in the replicated run (left
  free, XLA may instead split a matmul over the sharded axis and sum partial products in another
  order); the weights rest sharded between steps.
  """
  sharded = any(s.spec != jax.sharding.PartitionSpec()
                for s in jax.tree.leaves(frozen_sharding))
  if not sharded:
    return step

  def run(state, frozen, batch):
    frozen = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, replicated), frozen)
    return step(state, frozen, batch)
  return run


def device_bytes(tree: Tree, device: Any = None) -> int:
  """Bytes of `tree`'s arrays that live on `device` (default: the first local device)."""
  device = device or jax.local_devices()[0]
  return int(sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
                 if s.device == device))
