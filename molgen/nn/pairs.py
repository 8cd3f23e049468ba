"""How a batch's node rows become rows of ordered pairs (receiver i, sender j), and sums over pair rows go back
to the nodes: gathers and segment sums for packed graphs (:class:`molgen.data.batching.Graph`), reshapes for
grouped ones (:class:`molgen.data.batching.GroupedGraph`). With ``sorted_grads`` (training) every sum over pair
rows, forward and in the gradient, is a scatter-add by sorted indices (:func:`sender_rows`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_sum(data, segment_ids, num_segments, sorted_ids=False):
    return jax.ops.segment_sum(data, segment_ids, num_segments=num_segments, indices_are_sorted=sorted_ids)


def gather_rows(a, index, sorted_ids=False):
    """``a[index]``; ``sorted_ids`` tells XLA that ``index`` is sorted, and so the scatter-add of its gradient."""
    return jnp.asarray(a).at[index].get(indices_are_sorted=sorted_ids, mode="promise_in_bounds")


@jax.custom_vjp
def sender_rows(b, senders, receivers):
    """``b[senders]``, with the gradient of a gather by receivers: the pair rows' gradient taken in the order of
    the reversed pairs (row of j <- i for row i <- j) and summed into the nodes by their sorted receivers. Same
    sums as the scatter-add of ``b[senders]``'s own gradient (by unsorted senders), which a GPU runs with an
    atomic add per element; a sum by sorted receivers adds each run of rows in registers first (XLA's
    scatter for sorted indices). Needs pair rows sorted by receiver, then by sender, in a symmetric list: as
    :func:`molgen.data.batching.pack` and :func:`molgen.data.device.assemble` make them (padding pairs are
    self pairs). Reverse mode only (a custom VJP): ``jax.jvp`` through it fails."""
    return b[senders]


def reverse_pairs(senders):
    """The row of pair (j <- i) for each row (i <- j) of a symmetric pair list sorted by receiver, then sender:
    a stable sort by sender orders the rows by (sender, receiver), which is the list itself with the ends
    exchanged."""
    return jnp.argsort(senders, stable=True).astype(jnp.int32)


def _sender_rows_fwd(b, senders, receivers):
    return b[senders], (reverse_pairs(senders), receivers, jnp.zeros((b.shape[0], 0)))  # (the node count)


def _sender_rows_bwd(res, g):
    reverse, receivers, like = res
    return segment_sum(gather_rows(g, reverse), receivers, like.shape[0], sorted_ids=True), None, None


sender_rows.defvjp(_sender_rows_fwd, _sender_rows_bwd)


def molecule_index(n_atoms):
    """(atoms, first node row, first pair row) of each molecule of a packed graph, int32 [G] each, from its atom
    counts (padding graphs: 0); a molecule's pairs are rows (i, j), j != i, by receiver i, then sender j."""
    n = jnp.asarray(n_atoms, jnp.int32)
    pairs = n * (n - 1)
    return n, jnp.cumsum(n) - n, jnp.cumsum(pairs) - pairs


class Pairs:
    """How a batch's node rows become rows of ordered pairs (receiver i, sender j), and back.

    A packed :class:`~molgen.data.batching.Graph` lists its pairs: node values are gathered into pair rows and
    messages summed into their receivers by a segment sum. A
    :class:`~molgen.data.batching.GroupedGraph` holds every molecule of group g on A rows with all A * A pairs,
    so a pair value is a broadcast of two node arrays reshaped to [M, A, 1, F] and [M, 1, A, F], and the sum
    over senders a reshape and a sum over one axis: no gather or scatter, which an accelerator runs at the
    speed of its memory. The same parameters give the same result either way (tests/test_egnn.py)."""

    def __init__(self, graph, sorted_grads=False, kernel=False):
        self.groups, self.sorted_grads = getattr(graph, "groups", ()), sorted_grads
        self.kernel = kernel and sorted_grads and not self.groups  # the pair MLPs' gradient kernels (pairgrad)
        self.senders, self.receivers = graph.senders, graph.receivers
        self.n_nodes, self.n_atoms = graph.node_mask.shape[0], graph.n_atoms
        # grouped: masked pair rows after the groups' pairs (a pair count that suits a GPU's matrix products)
        self.pad = graph.senders.shape[0] - sum(m * k * k for m, k in self.groups) if self.groups else 0

    def combine(self, a, b):
        """a_i + b_j for every pair: a at the receiver, b at the sender; [N, F] x 2 -> [E, F]."""
        if not self.groups:
            return self.receiver(a) + self.sender(b)
        out, row = [], 0
        for m, k in self.groups:
            ag, bg = a[row : row + m * k].reshape(m, k, 1, -1), b[row : row + m * k].reshape(m, 1, k, -1)
            out.append((ag + bg).reshape(m * k * k, -1))
            row += m * k
        if self.pad:
            out.append(jnp.zeros((self.pad, out[0].shape[-1]), out[0].dtype))
        return jnp.concatenate(out) if len(out) > 1 else out[0]

    def index(self):
        """(receivers, senders, :func:`molecule_index`) of a packed graph (:func:`molgen.nn.pairgrad.pair_layer`)."""
        return self.receivers, self.senders, molecule_index(self.n_atoms)

    def receiver(self, a):
        """a_i for every pair."""
        if not self.groups:
            return gather_rows(a, self.receivers, sorted_ids=True)
        return self.combine(a, jnp.zeros_like(a))

    def sender(self, b):
        """b_j for every pair."""
        if not self.groups:
            return sender_rows(b, self.senders, self.receivers) if self.sorted_grads else b[self.senders]
        return self.combine(jnp.zeros_like(b), b)

    def sum(self, m):
        """sum_j m_ij for every receiver i: [E, F] -> [N, F]."""
        if not self.groups:
            return segment_sum(m, self.receivers, self.n_nodes, sorted_ids=True)
        out, row = [], 0
        for g, k in self.groups:
            out.append(m[row : row + g * k * k].reshape(g, k, k, -1).sum(axis=2).reshape(g * k, -1))
            row += g * k * k
        return jnp.concatenate(out) if len(out) > 1 else out[0]
