"""Data parallelism over devices and processes: the 1-D device mesh, host values as global arrays and back, and
the decisions every process must take alike. With one device and one process the same calls work unchanged."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from molgen.data.batching import Graph


def is_main() -> bool:
    """The process that writes the run's files (config, log); every process writes its part of checkpoints."""
    return jax.process_index() == 0


def global_put(tree, sharding):
    """Host values (the same on every process) as global arrays with ``sharding``: works alike with one
    process and with several."""

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(put, tree)


def local_value(tree):
    """Replicated (or this process's first) values of global arrays, on the host."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array)
                                  else np.asarray(a), tree)


def agree(flag: bool) -> bool:
    """Process 0's decision, on every process (one process alone: the flag itself)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices), ("data",))


def put_batch(graphs: Graph, mesh: Mesh) -> Graph:
    """A batch packed on the host (every process holds all of it), split over the devices on axis 0."""
    return global_put(graphs, NamedSharding(mesh, P("data")))
