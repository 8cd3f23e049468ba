"""Batches of molecules packed as one graph: real atoms and real atom pairs only, plus bucketed padding.

A batch of B molecules becomes N node rows and E directed edge rows (every ordered pair i != j inside each
molecule).  N and E are rounded up to a few bucket sizes so a jitted function compiles once per bucket; the
padding rows belong to an extra dummy graph (index B) and carry mask 0, so they never touch a real atom; padding
edges join padding rows to themselves, spread over them (:func:`padding_edge_rows`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import jax
import numpy as np



class Graph(NamedTuple):
    positions: np.ndarray  # float32 [N, 3]
    types: np.ndarray  # int32 [N] (0 for padding)
    node_mask: np.ndarray  # float32 [N]
    segment: np.ndarray  # int32 [N]: molecule of each row; padding rows -> n_graphs
    senders: np.ndarray  # int32 [E]
    receivers: np.ndarray  # int32 [E]
    edge_mask: np.ndarray  # float32 [E]
    n_atoms: np.ndarray  # int32 [B + 1]: real atoms per molecule (0 for the dummy graph)

    @property
    def n_graphs(self) -> int:
        return int(self.n_atoms.shape[0]) - 1


@dataclass(frozen=True)
class GroupedGraph:
    """A batch laid out for the accelerator: molecules sorted by size and cut into groups; group g holds
    ``groups[g] = (M, A)``: M molecules, each on A node rows (its atoms, then masked padding rows) and all
    A * A ordered pairs (row-major: receiver, then sender; self pairs and padding masked). The EGNN forms pair
    arrays by broadcasting and sums over neighbours by reshaping, no gathers or scatters
    (:class:`molgen.nn.egnn.Pairs`). Same fields and meaning as :class:`Graph` (a padding row's segment is its
    own molecule, so segments stay sorted; ``n_atoms`` ends with an empty molecule), plus the static
    ``groups``. Built on the device by :func:`molgen.data.device.assemble_grouped`."""

    positions: Any
    types: Any
    node_mask: Any
    segment: Any
    senders: Any
    receivers: Any
    edge_mask: Any
    n_atoms: Any
    groups: tuple[tuple[int, int], ...] = ()

    @property
    def n_graphs(self) -> int:
        return int(self.n_atoms.shape[-1]) - 1

    def _replace(self, **kw) -> "GroupedGraph":
        return dataclasses.replace(self, **kw)


jax.tree_util.register_dataclass(GroupedGraph, data_fields=[f for f in Graph._fields], meta_fields=["groups"])


def bucket(x: int, fraction_bits: int = 3, granule: int = 8) -> int:
    """Round ``x`` up to a multiple of max(granule, 2**(floor(log2 x) - fraction_bits)): at most ~1/8
    padding for large sizes, and few distinct sizes (few compilations) for small ones."""
    x = max(int(x), 1)
    q = max(1 << max(int(np.floor(np.log2(x))) - fraction_bits, 0), granule)
    return -(-x // q) * q


NODE_GRANULE, EDGE_GRANULE = 64, 1024


def padding_edge_rows(q, n_real, n_nodes, n_pad_edges, xp=np):
    """The node row of padding edge ``q`` (0, 1, ... after the real edges; both ends: self pairs on padding rows,
    masked): consecutive runs of ceil(n_pad_edges / padding rows) edges on each padding row, in order, so that
    receivers stay sorted. Spread, not all on one row: a GPU sums messages into their rows with atomic adds, and
    thousands of adds into one row run one after another. ``xp``: numpy on the host, jax.numpy in a traced
    :func:`molgen.data.device.assemble`."""
    rows = xp.maximum(n_nodes - n_real, 1)
    per = xp.maximum((n_pad_edges + rows - 1) // rows, 1)
    return xp.clip(n_real + q // per, 0, n_nodes - 1).astype(xp.int32)


@lru_cache(maxsize=64)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.nonzero(~np.eye(n, dtype=bool))
    return i.astype(np.int32), j.astype(np.int32)


def padded_sizes(n_atoms) -> tuple[int, int]:
    """The bucketed (node rows, edge rows) of a batch of molecules of ``n_atoms`` atoms: its atoms and at least
    one padding row, its ordered atom pairs."""
    n = np.asarray(n_atoms, np.int64)
    return bucket(int(n.sum()) + 1, granule=NODE_GRANULE), bucket(int((n * (n - 1)).sum()), granule=EDGE_GRANULE)


def pack(
    positions: list[np.ndarray] | None,
    types: list[np.ndarray],
    pad_nodes: int | None = None,
    pad_edges: int | None = None,
    pad_graphs: int | None = None,
) -> Graph:
    """Pack molecules (lists of [n_i, 3] positions and [n_i] types) into one padded graph.

    Pass ``positions=None`` to get zero positions (e.g. to fill with noise when sampling).  Without explicit
    ``pad_nodes``/``pad_edges`` the sizes are bucketed (there is always at least one padding node).
    ``pad_graphs``: the length of ``n_atoms`` (default: molecules + 1); the molecules after the real ones are
    empty, so batches of different molecule counts can share a shape (and a compiled program).
    """
    n = np.array([len(t) for t in types], dtype=np.int32)
    b = len(n)
    n_real = int(n.sum())
    e_real = int((n * (n - 1)).sum())
    own_nodes, own_edges = padded_sizes(n)
    n_pad = pad_nodes if pad_nodes is not None else own_nodes
    e_pad = pad_edges if pad_edges is not None else own_edges
    if n_pad <= n_real or e_pad < e_real:
        raise ValueError(f"padding too small: {n_pad} nodes for {n_real}, {e_pad} edges for {e_real}")
    offsets = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int32)

    pos = np.zeros((n_pad, 3), np.float32)
    if positions is not None and n_real:
        pos[:n_real] = np.concatenate(positions)
    typ = np.zeros(n_pad, np.int32)
    if n_real:
        typ[:n_real] = np.concatenate(types)
    node_mask = np.zeros(n_pad, np.float32)
    node_mask[:n_real] = 1.0
    segment = np.full(n_pad, b, np.int32)
    segment[:n_real] = np.repeat(np.arange(b, dtype=np.int32), n)

    senders = np.empty(e_pad, np.int32)
    receivers = np.empty(e_pad, np.int32)
    senders[e_real:] = receivers[e_real:] = padding_edge_rows(np.arange(e_pad - e_real), n_real, n_pad, e_pad - e_real)
    edge_mask = np.zeros(e_pad, np.float32)
    if e_real:
        s_list, r_list = [], []
        for k in range(b):
            i, j = _pairs(int(n[k]))
            r_list.append(i + offsets[k])  # receiver i aggregates messages from sender j
            s_list.append(j + offsets[k])
        receivers[:e_real] = np.concatenate(r_list)
        senders[:e_real] = np.concatenate(s_list)
        edge_mask[:e_real] = 1.0
    n_segments = pad_graphs if pad_graphs is not None else b + 1
    if n_segments <= b:
        raise ValueError(f"padding too small: {n_segments} graphs for {b} molecules and the padding")
    n_atoms = np.zeros(n_segments, np.int32)
    n_atoms[:b] = n
    return Graph(pos, typ, node_mask, segment, senders, receivers, edge_mask, n_atoms)


# A sampling batch may take a compiled shape of this many more node rows than its own (~110 QM9 molecules: on two
# CPU cores about a second a call of the default, against ~7 s to trace and compile its program anew).
SHARED_EXTRA_NODES = 2048


def sampling_graph(sizes, shapes: list | None = None) -> Graph:
    """The padded graph of a batch to sample (zero positions) of molecules of ``sizes`` atoms, its molecule count
    bucketed like its atoms so that small batches share compiled programs. ``shapes``: the padded shapes
    (graphs, nodes, edges) of programs compiled before: the smallest that holds the batch with at most twice its
    own padded nodes, or at most :data:`SHARED_EXTRA_NODES` more, is taken (padding costs less than compiling
    anew), else the batch's own shape is added to them. A molecule's rows do not depend on the padding (its noise
    is a prefix of the padded draw), only the compilations do."""
    own = (bucket(len(sizes) + 1, granule=8), *padded_sizes(sizes))
    room = max(2 * own[1], own[1] + SHARED_EXTRA_NODES)
    fits = [s for s in shapes or () if all(a >= b for a, b in zip(s, own)) and s[1] <= room]
    if not fits and shapes is not None:
        shapes.append(own)
    n_graphs, n_nodes, n_edges = min(fits) if fits else own
    types = [np.zeros(int(k), np.int32) for k in sizes]
    return pack(None, types, pad_nodes=n_nodes, pad_edges=n_edges, pad_graphs=n_graphs)


class BatchSampler:
    """Deterministic, resumable mini-batches over a set of molecules: the batch at step ``s`` depends only on
    (seed, s), so a resumed run sees exactly the data order of an uninterrupted one."""

    def __init__(self, ids: np.ndarray, batch_size: int, seed: int = 0):
        if len(ids) < batch_size:
            raise ValueError(f"batch size {batch_size} is larger than the data ({len(ids)} molecules)")
        self.ids, self.batch_size, self.seed = np.asarray(ids), batch_size, seed
        self.steps_per_epoch = len(ids) // batch_size
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
            self._epoch = epoch
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.ids[self._permutation(epoch)[k * self.batch_size : (k + 1) * self.batch_size]]

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The molecules of every step of an epoch, in order: [steps_per_epoch * batch_size]."""
        return self.ids[self._permutation(epoch)[: self.steps_per_epoch * self.batch_size]]


def shard_batch(mols: list[tuple[np.ndarray, np.ndarray]], n_shards: int,
                noise: list[tuple[np.ndarray, np.ndarray]] | None = None):
    """Split molecules into n_shards packed graphs with common padded sizes, stacked on axis 0 (packing on the
    host: validation batches and tests; training batches are assembled on the device, molgen.data.device). With per-molecule ``noise`` (distillation pairs) returns
    (graphs, (noise_x, noise_h)) in the same rows."""
    parts = [mols[i::n_shards] for i in range(n_shards)]
    n_nodes = max(sum(len(t) for _, t in p) for p in parts)
    n_edges = max(sum(len(t) * (len(t) - 1) for _, t in p) for p in parts)
    pn, pe = bucket(n_nodes + 1, granule=NODE_GRANULE), bucket(n_edges, granule=EDGE_GRANULE)
    graphs = [pack([x for x, _ in p], [t.astype(np.int32) for _, t in p], pn, pe) for p in parts]
    # A batch that does not split evenly leaves some shards one molecule short: give them an empty graph more.
    n_seg = max(len(g.n_atoms) for g in graphs)
    graphs = [g._replace(n_atoms=np.pad(g.n_atoms, (0, n_seg - len(g.n_atoms)))) for g in graphs]
    stacked = Graph(*[np.stack(f) for f in zip(*graphs)])
    if noise is None:
        return stacked

    def rows(arrs, width):
        out = np.zeros((pn, width), np.float32)
        if arrs:
            cat = np.concatenate(arrs)
            out[: len(cat)] = cat
        return out

    nparts = [noise[i::n_shards] for i in range(n_shards)]
    nx = np.stack([rows([a for a, _ in p], 3) for p in nparts])
    nh = np.stack([rows([b for _, b in p], noise[0][1].shape[1]) for p in nparts])
    return stacked, (nx, nh)


def make_batch(ds, ids, n_shards: int):
    """The sharded batch of these molecules (with their noise when ``ds`` holds distillation pairs)."""
    mols = [ds.molecule(int(i)) for i in ids]
    noise = [ds.noise(int(i)) for i in ids] if hasattr(ds, "noise") else None
    return shard_batch(mols, n_shards, noise)
