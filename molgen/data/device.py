"""Training data that lives on the accelerator, and batches assembled there by jitted gathers.

The host's only work per training step is to choose molecule indices (:class:`molgen.data.batching.BatchSampler`);
the packed graph of :func:`molgen.data.batching.pack` is then built on the device from those indices:

* :func:`dense_set` stores a set of molecules once, padded to the largest molecule ([M, A] rows: positions,
  types, and for distillation pairs their noise);
* :func:`assemble` turns a row of molecule indices into the packed graph (real atoms and real ordered atom pairs
  only) with fixed padded sizes, the same rows in the same order as :func:`~molgen.data.batching.pack`;
* :class:`ShapePlan` picks those padded sizes once per run from the batches the run will draw, so a jitted step
  compiles once (a batch that does not fit, which is rare, gets a larger shape and one more compilation);
* :func:`assemble_grouped` and :class:`GroupPlan` do the same for the grouped layout
  (:class:`molgen.data.batching.GroupedGraph`: molecules sorted by size, groups padded to a common size, all
  pairs), whose network needs no gathers or scatters.

A plan's ``arrange`` orders each shard's molecules as its layout wants them (sorted by size for the grouped
one), ``shape_for`` gives the static shape of a chunk's batches and ``assemble`` builds one shard's batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from molgen.data.batching import EDGE_GRANULE, NODE_GRANULE, Graph, GroupedGraph, padding_edge_rows

# of a training batch on the device: assemble / assemble_grouped; "packed-kernel" is packed, with the pair MLPs'
# gradients in GPU kernels (molgen.nn.pairgrad)
LAYOUTS = ("packed", "grouped", "packed-kernel")
N_GROUPS = 6  # size groups of a grouped batch


class DenseSet(NamedTuple):
    positions: jax.Array  # float32 [M, A, 3]
    types: jax.Array  # int32 [M, A]
    n_atoms: jax.Array  # int32 [M]
    noise_x: jax.Array | None = None  # float32 [M, A, 3] (distillation pairs)
    noise_h: jax.Array | None = None  # float32 [M, A, F]


def dense_set(ds, ids: np.ndarray | None = None) -> DenseSet:
    """Molecules ``ids`` of a data set (all by default) as padded numpy arrays; row k is molecule ids[k].

    ``ds`` is a :class:`molgen.data.qm9.QM9` or a distillation :class:`~molgen.consistency.distill.PairSet`:
    flat ``positions`` / ``types`` (and ``noise_x`` / ``noise_h``) with ``n_atoms`` and ``offsets``.
    """
    ids = np.arange(len(ds.n_atoms)) if ids is None else np.asarray(ids)
    n = np.asarray(ds.n_atoms)[ids].astype(np.int32)
    width = max(int(n.max()) if len(n) else 1, 1)
    col = np.arange(width)
    valid = col[None, :] < n[:, None]
    rows = np.asarray(ds.offsets)[ids][:, None] + np.where(valid, col[None, :], 0)
    rows = np.minimum(rows, max(len(ds.types) - 1, 0))

    def take(a, dtype):
        out = np.asarray(a)[rows].astype(dtype)
        return np.where(valid.reshape(valid.shape + (1,) * (out.ndim - 2)), out, 0).astype(dtype)

    noise = getattr(ds, "noise_x", None)
    return DenseSet(take(ds.positions, np.float32), take(ds.types, np.int32), n,
                    None if noise is None else take(ds.noise_x, np.float32),
                    None if noise is None else take(ds.noise_h, np.float32))


def put(dset: DenseSet, sharding=None) -> DenseSet:
    """The set on the device(s) (replicated with a replicated ``sharding``)."""
    return DenseSet(*[None if a is None else jax.device_put(a, sharding) for a in dset])


def assemble(dset: DenseSet, ids, n_nodes: int, n_edges: int):
    """The packed graph of molecules ``ids`` [b] (row indices of ``dset``), padded to ``n_nodes`` / ``n_edges``.

    Jittable with static sizes. Equal to ``pack`` of the same molecules with the same padding: node rows
    molecule after molecule, padding rows in an extra graph b; edges (receiver i <- sender j, i != j) row-major
    per molecule, padding edges spread over the padding rows (:func:`~molgen.data.batching.padding_edge_rows`). Returns the graph, or (graph, (noise_x, noise_h)) in
    the graph's node rows when the set carries noise. Batches larger than the sizes are cut (see
    :class:`ShapePlan`, which never lets that happen).
    """
    b = ids.shape[0]
    n = dset.n_atoms[ids]
    ends = jnp.cumsum(n)
    starts = ends - n
    rows = jnp.arange(n_nodes, dtype=jnp.int32)
    mol = jnp.searchsorted(ends, rows, side="right").astype(jnp.int32)  # b for padding rows
    real = mol < b
    mol_c = jnp.minimum(mol, b - 1)
    local = jnp.where(real, rows - starts[mol_c], 0)
    src = ids[mol_c]
    node_mask = real.astype(jnp.float32)
    positions = dset.positions[src, local] * node_mask[:, None]
    types = jnp.where(real, dset.types[src, local], 0)

    ne = n * (n - 1)
    e_ends = jnp.cumsum(ne)
    e_starts = e_ends - ne
    e = jnp.arange(n_edges, dtype=jnp.int32)
    emol = jnp.searchsorted(e_ends, e, side="right").astype(jnp.int32)
    ereal = emol < b
    emol_c = jnp.minimum(emol, b - 1)
    k = jnp.where(ereal, e - e_starts[emol_c], 0)
    m1 = jnp.maximum(n[emol_c] - 1, 1)
    i = k // m1
    jj = k - i * m1
    j = jj + (jj >= i)
    pad = padding_edge_rows(e - e_ends[-1], ends[-1], n_nodes, n_edges - e_ends[-1], jnp)
    receivers = jnp.where(ereal, starts[emol_c] + i, pad).astype(jnp.int32)
    senders = jnp.where(ereal, starts[emol_c] + j, pad).astype(jnp.int32)
    graph = Graph(positions, types.astype(jnp.int32), node_mask, mol, senders, receivers,
                  ereal.astype(jnp.float32), jnp.concatenate([n, jnp.zeros(1, n.dtype)]).astype(jnp.int32))
    if dset.noise_x is None:
        return graph
    nx = dset.noise_x[src, local] * node_mask[:, None]
    nh = dset.noise_h[src, local] * node_mask[:, None]
    return graph, (nx, nh)


def round_up(x: int, granule: int) -> int:
    return -(-int(x) // granule) * granule


def epoch_batches(sampler, start: int, horizon_epochs: int):
    """The batches [steps_per_epoch, batch] of each epoch from the one holding step ``start`` on, for
    ``horizon_epochs`` epochs: what a plan is made from, whatever the run's length (a stopped run plans alike)."""
    first = start // max(1, sampler.steps_per_epoch)
    for epoch in range(first, first + horizon_epochs):
        yield sampler.epoch_indices(epoch).reshape(sampler.steps_per_epoch, -1)


class ShapePlan:
    """Padded sizes (nodes, edges per shard) for a run's batches: one shape that fits every batch the run will
    draw in its first ``horizon`` steps (an epoch-by-epoch scan of the data order, done with numpy), grown only
    when a later batch does not fit."""

    def __init__(self, n_atoms: np.ndarray, sampler, n_shards: int, start: int = 0, horizon_epochs: int = 50):
        self.n_atoms = np.asarray(n_atoms).astype(np.int64)  # by molecule index of the data set
        self.n_shards = n_shards
        need = (1, 1)
        for ids in epoch_batches(sampler, start, horizon_epochs):
            need = max_pair(need, self.counts(ids))
        self.shape = self._fit(need)

    def counts(self, ids: np.ndarray) -> tuple[int, int]:
        """Largest (nodes, edges) of any shard of the batches ``ids`` [steps, batch]."""
        n = self.n_atoms[ids]
        n = n.reshape(n.shape[0], -1, self.n_shards)  # shard d takes ids[d::n_shards]
        return int(n.sum(1).max()), int((n * (n - 1)).sum(1).max())

    def arrange(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Rows [steps, shards, b] as they are: a packed batch keeps the sampler's order."""
        return rows

    def state(self) -> dict:
        return {"packed": list(self.shape)}

    def restore(self, state: dict) -> None:
        """The plan as saved by :meth:`state`, in place of the fresh one (a plan of another layout is ignored)."""
        shape = state.get("packed")
        if shape is not None:
            self.shape = (int(shape[0]), int(shape[1]))

    @staticmethod
    def assemble(dset: DenseSet, ids, shape):
        return assemble(dset, ids, *shape)

    @staticmethod
    def _fit(need: tuple[int, int]) -> tuple[int, int]:
        return round_up(need[0] + 1, NODE_GRANULE), round_up(max(need[1], 1), EDGE_GRANULE)

    def shape_for(self, ids: np.ndarray) -> tuple[int, int]:
        """The run's shape, or a larger one when these batches [steps, batch] do not fit it (kept from then on)."""
        nodes, edges = self.counts(ids)
        if nodes + 1 > self.shape[0] or edges > self.shape[1]:
            self.shape = max_pair(self.shape, self._fit((nodes, edges)))
        return self.shape


def max_pair(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return max(a[0], b[0]), max(a[1], b[1])


def assemble_grouped(dset: DenseSet, ids, groups: tuple[tuple[int, int], ...]):
    """The :class:`~molgen.data.batching.GroupedGraph` of molecules ``ids`` [b] (sorted by size, ascending):
    group g takes the next M molecules, each on A rows (its atoms first), with all A * A ordered pairs,
    ``groups[g] = (M, A)``, then masked pair rows up to a multiple of EDGE_GRANULE. Jittable; atoms beyond A
    would be cut (:class:`GroupPlan` never lets that happen).
    Returns the graph, or (graph, (noise_x, noise_h)) when the set carries noise."""
    if sum(m for m, _ in groups) != ids.shape[0]:
        raise ValueError(f"groups {groups} hold {sum(m for m, _ in groups)} molecules, not {ids.shape[0]}")
    n = dset.n_atoms[ids]
    pos, typ, mask, seg, snd, rcv, emask, nx, nh = ([] for _ in range(9))
    mol, row = 0, 0
    for m, a in groups:
        gi = ids[mol : mol + m]
        real = jnp.arange(a)[None, :] < n[mol : mol + m, None]  # [m, a]
        fm = real.astype(jnp.float32)
        pos.append((dset.positions[gi, :a] * fm[..., None]).reshape(m * a, 3))
        typ.append(jnp.where(real, dset.types[gi, :a], 0).reshape(m * a))
        mask.append(fm.reshape(m * a))
        seg.append(jnp.repeat(jnp.arange(mol, mol + m, dtype=jnp.int32), a))
        base = row + a * jnp.arange(m, dtype=jnp.int32)[:, None, None]
        i = jnp.arange(a, dtype=jnp.int32)[None, :, None]
        j = jnp.arange(a, dtype=jnp.int32)[None, None, :]
        rcv.append(jnp.broadcast_to(base + i, (m, a, a)).reshape(-1))
        snd.append(jnp.broadcast_to(base + j, (m, a, a)).reshape(-1))
        emask.append((fm[:, :, None] * fm[:, None, :] * (i != j)).reshape(-1))
        if dset.noise_x is not None:
            nx.append((dset.noise_x[gi, :a] * fm[..., None]).reshape(m * a, 3))
            nh.append((dset.noise_h[gi, :a] * fm[..., None]).reshape(m * a, -1))
        mol, row = mol + m, row + m * a
    # Masked pair rows after the groups, up to a multiple of EDGE_GRANULE (as packed batches have): on a GPU XLA
    # copied every [pairs, features] array of another length into a padded one for the weights' gradients
    pad = -sum(m * a * a for m, a in groups) % EDGE_GRANULE
    rcv.append(jnp.zeros(pad, jnp.int32))
    snd.append(jnp.zeros(pad, jnp.int32))
    emask.append(jnp.zeros(pad, jnp.float32))
    cat = jnp.concatenate
    graph = GroupedGraph(cat(pos), cat(typ).astype(jnp.int32), cat(mask), cat(seg), cat(snd), cat(rcv), cat(emask),
                         cat([n, jnp.zeros(1, n.dtype)]).astype(jnp.int32), tuple(groups))
    if dset.noise_x is None:
        return graph
    return graph, (cat(nx), cat(nh))


def plan_groups(widths: np.ndarray, n_groups: int) -> tuple[tuple[int, int], ...]:
    """Cut positions 0..b-1 of a size-sorted shard into at most ``n_groups`` groups so that the padded pairs,
    sum over groups of M * A**2 with A the largest ``widths`` in the group, are fewest (exact dynamic programme).
    ``widths`` [b] is non-decreasing: the largest molecule seen at each sorted position."""
    w = np.maximum(np.asarray(widths, np.int64), 1)
    b = len(w)
    sq = w.astype(np.float64) ** 2
    cost = np.full(b + 1, np.inf)
    cost[0] = 0.0
    back = []
    for _ in range(max(1, n_groups)):
        new, arg = np.full(b + 1, np.inf), np.zeros(b + 1, np.int64)
        new[0] = 0.0
        for e in range(1, b + 1):
            c = cost[:e] + (e - np.arange(e)) * sq[e - 1]
            k = int(np.argmin(c))
            new[e], arg[e] = c[k], k
        back.append(arg)
        cost = new
    ends, e = [], b
    for arg in reversed(back):
        if e == 0:
            break
        ends.append(e)
        e = int(arg[e])
    ends = sorted(ends)
    starts = [0] + ends[:-1]
    return tuple((int(hi - lo), int(w[hi - 1])) for lo, hi in zip(starts, ends) if hi > lo)


class GroupPlan:
    """The groups of a run's grouped batches: from the largest molecule at each size-sorted position of a shard
    over the batches of the first ``horizon`` epochs, the cut with the fewest padded pairs
    (:func:`plan_groups`); recomputed, larger, only when a later batch does not fit."""

    def __init__(self, n_atoms: np.ndarray, sampler, n_shards: int, start: int = 0, horizon_epochs: int = 50,
                 n_groups: int = N_GROUPS):
        self.n_atoms = np.asarray(n_atoms).astype(np.int64)
        self.n_shards, self.n_groups = n_shards, n_groups
        self.widths = np.ones(sampler.batch_size // n_shards, np.int64)
        for ids in epoch_batches(sampler, start, horizon_epochs):
            self.widths = np.maximum(self.widths, self._widths(ids))
        self.shape = plan_groups(self.widths, n_groups)

    def _widths(self, ids: np.ndarray) -> np.ndarray:
        n = self.n_atoms[ids].reshape(ids.shape[0], -1, self.n_shards)  # shard d takes ids[d::n_shards]
        return np.sort(n, axis=1).max(axis=(0, 2))

    def arrange(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Rows [steps, shards, b] of molecules ``ids`` (same shape) sorted by size within each shard."""
        order = np.argsort(self.n_atoms[ids], axis=-1, kind="stable")
        return np.take_along_axis(rows, order, axis=-1)

    def state(self) -> dict:
        return {"grouped": [int(w) for w in self.widths]}

    def restore(self, state: dict) -> None:
        """The plan as saved by :meth:`state` (same layout, batch size and shards), in place of the fresh one."""
        widths = state.get("grouped")
        if widths is not None and len(widths) == len(self.widths):
            self.widths = np.asarray(widths, np.int64)
            self.shape = plan_groups(self.widths, self.n_groups)

    def fits(self, widths: np.ndarray) -> bool:
        end = 0
        for m, a in self.shape:
            end += m
            if widths[end - 1] > a:
                return False
        return True

    def shape_for(self, ids: np.ndarray):
        """The run's groups, or larger ones when these batches [steps, batch] do not fit (kept from then on)."""
        widths = self._widths(ids)
        if not self.fits(widths):
            self.widths = np.maximum(self.widths, widths)
            self.shape = plan_groups(self.widths, self.n_groups)
        return self.shape

    @staticmethod
    def assemble(dset: DenseSet, ids, shape):
        return assemble_grouped(dset, ids, shape)


def make_plan(layout: str, n_atoms: np.ndarray, sampler, n_shards: int, start: int = 0, state=None):
    """The shape plan of a layout (:data:`LAYOUTS`), planned afresh or restored from a saved ``state``."""
    plan = (GroupPlan if layout == "grouped" else ShapePlan)(n_atoms, sampler, n_shards, start)
    if state is not None:
        plan.restore(state)
    return plan
