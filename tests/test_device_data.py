"""Batches assembled on the device equal the host's packed batches; the run's shape plan fits its batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molgen.data.batching import BatchSampler, pack
from molgen.data.device import ShapePlan, assemble, dense_set
from molgen.nn.pairs import reverse_pairs


def _packed(ds, ids, n_nodes, n_edges):
    mols = [ds.molecule(int(i)) for i in ids]
    return pack([x for x, _ in mols], [t.astype(np.int32) for _, t in mols], n_nodes, n_edges)


@pytest.mark.parametrize("ids", [[0, 1, 2, 3], [17, 5, 40, 8, 33], [11]])
def test_assemble_equals_pack(mini_ds, ids):
    ids = np.asarray(ids)
    n = mini_ds.n_atoms[ids].astype(int)
    n_nodes, n_edges = int(n.sum()) + 7, int((n * (n - 1)).sum()) + 13  # some padding of each kind
    dset = dense_set(mini_ds)
    got = jax.jit(assemble, static_argnums=(2, 3))(dset, ids, n_nodes, n_edges)
    want = _packed(mini_ds, ids, n_nodes, n_edges)
    for name in want._fields:
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), getattr(want, name), err_msg=name)


@pytest.mark.parametrize("pad_rows,pad_edges", [(7, 1000), (1, 50), (40, 3), (7, 8), (5, 0)])
def test_padding_edges_are_spread_over_the_padding_rows(mini_ds, pad_rows, pad_edges):
    """Padding edges join padding rows to themselves, at most ceil(edges / rows) on a row, receivers sorted; on
    the device as on the host. (A GPU adds every edge's message into its row atomically: thousands on one row
    would run one after another.)"""
    ids = np.asarray([17, 5, 40, 8])
    n = mini_ds.n_atoms[ids].astype(int)
    n_real, e_real = int(n.sum()), int((n * (n - 1)).sum())
    n_nodes, n_edges = n_real + pad_rows, e_real + pad_edges
    host = _packed(mini_ds, ids, n_nodes, n_edges)
    dev = jax.jit(assemble, static_argnums=(2, 3))(dense_set(mini_ds), ids, n_nodes, n_edges)
    for g in (host, dev):
        rcv, snd = np.asarray(g.receivers), np.asarray(g.senders)
        assert np.all(np.diff(rcv) >= 0)
        pad_r, pad_s = rcv[e_real:], snd[e_real:]
        np.testing.assert_array_equal(pad_r, pad_s)
        assert np.all((pad_r >= n_real) & (pad_r < n_nodes))
        assert np.all(np.asarray(g.edge_mask)[e_real:] == 0) and np.all(np.asarray(g.node_mask)[n_real:] == 0)
        # symmetric and sorted by (receiver, sender): the reversed pairs are a permutation of the rows
        rev = np.asarray(reverse_pairs(jnp.asarray(snd)))
        np.testing.assert_array_equal(np.sort(rev), np.arange(len(snd)))
        np.testing.assert_array_equal(rcv[rev], snd)
        np.testing.assert_array_equal(snd[rev], rcv)
        if pad_edges:
            counts = np.bincount(pad_r - n_real, minlength=pad_rows)
            assert counts.max() == -(-pad_edges // pad_rows)
            assert np.count_nonzero(counts) == -(-pad_edges // counts.max())  # consecutive full runs


def test_assemble_of_a_subset_and_noise(mini_ds):
    """Rows of a dense set of a subset map to the subset's molecules; noise rows follow the node rows."""
    from molgen.consistency.distill import PairSet

    sub = np.asarray([3, 9, 21, 30, 44])
    dset = dense_set(mini_ds, sub)
    got = assemble(dset, np.asarray([4, 0, 2]), 64, 1024)
    want = _packed(mini_ds, sub[[4, 0, 2]], 64, 1024)
    np.testing.assert_array_equal(np.asarray(got.positions), want.positions)
    np.testing.assert_array_equal(np.asarray(got.senders), want.senders)

    rng = np.random.default_rng(0)
    n = mini_ds.n_atoms[sub].astype(np.int64)
    a = int(n.sum())
    pos = np.concatenate([mini_ds.molecule(int(i))[0] for i in sub])
    typ = np.concatenate([mini_ds.molecule(int(i))[1] for i in sub])
    pairs = PairSet(n, pos, typ, rng.normal(size=(a, 3)).astype(np.float32),
                    rng.normal(size=(a, 6)).astype(np.float32))
    g, (nx, nh) = assemble(dense_set(pairs), np.asarray([1, 3]), 64, 1024)
    rows = np.r_[pairs.offsets[1]:pairs.offsets[2], pairs.offsets[3]:pairs.offsets[4]]
    k = len(rows)
    np.testing.assert_array_equal(np.asarray(nx)[:k], pairs.noise_x[rows])
    np.testing.assert_array_equal(np.asarray(nh)[:k], pairs.noise_h[rows])
    assert not np.asarray(nx)[k:].any() and not np.asarray(nh)[k:].any()
    np.testing.assert_array_equal(np.asarray(g.node_mask)[: k + 1], [1.0] * k + [0.0])


def test_shape_plan_fits_every_batch_of_the_run(mini_ds):
    ids = mini_ds.split("train")
    sampler = BatchSampler(ids, 8, seed=1)
    plan = ShapePlan(mini_ds.n_atoms, sampler, 2)
    nodes, edges = plan.shape
    assert nodes % 64 == 0 and edges % 1024 == 0
    for s in range(40):
        batch = sampler.indices(s)
        n = mini_ds.n_atoms[batch].astype(int)
        for d in range(2):  # each device's shard
            part = n[d::2]
            assert part.sum() + 1 <= nodes and (part * (part - 1)).sum() <= edges
    # A batch larger than the plan grows it (and it stays grown).
    big = np.repeat(np.argsort(mini_ds.n_atoms)[-1:], 400)[None]
    grown = plan.shape_for(big)
    assert grown[0] > nodes and grown[1] > edges and plan.shape == grown


def test_training_subset_cache_gives_the_same_batches(mini_ds, tmp_path):
    """The GPU's staged cache (the training split and the first validation molecules) round-trips, draws the full
    set's batches and holds the full set's first validation molecules."""
    from molgen.data.qm9 import load_qm9, save_cache

    assert len(mini_ds.training_subset().split("valid")) == 0
    save_cache(mini_ds.training_subset(3), tmp_path, source="test")
    sub = load_qm9(tmp_path)
    assert len(sub.split("train")) == len(mini_ds.split("train")) and len(sub.split("test")) == 0
    assert len(sub) == len(mini_ds.split("train")) + 3 and len(sub.split("valid")) == 3
    for i, j in zip(mini_ds.split("valid")[:3], sub.split("valid")):
        for a, b in zip(mini_ds.molecule(int(i)), sub.molecule(int(j))):
            np.testing.assert_array_equal(a, b)
    full = BatchSampler(mini_ds.split("train"), 8, seed=4)
    small = BatchSampler(sub.split("train"), 8, seed=4)
    for s in (0, 3, 11):
        for i, j in zip(full.indices(s), small.indices(s)):
            np.testing.assert_array_equal(mini_ds.molecule(int(i))[0], sub.molecule(int(j))[0])
            np.testing.assert_array_equal(mini_ds.molecule(int(i))[1], sub.molecule(int(j))[1])


def test_plan_groups_is_the_cheapest_cut():
    """Hand-checked: sizes 3,3,3,10 in two groups cost 3*9 + 100; one group 4*100; the exact search over every
    cut of a short profile agrees with brute force."""
    from itertools import combinations

    from molgen.data.device import plan_groups

    assert plan_groups(np.array([3, 3, 3, 10]), 2) == ((3, 3), (1, 10))
    assert plan_groups(np.array([3, 3, 3, 10]), 1) == ((4, 10),)
    rng = np.random.default_rng(0)
    w = np.sort(rng.integers(3, 30, size=12))
    for g in (1, 2, 3, 4):
        best = min(sum((hi - lo) * int(w[hi - 1]) ** 2 for lo, hi in zip((0,) + c, c + (12,)))
                   for k in range(g) for c in combinations(range(1, 12), k))
        groups = plan_groups(w, g)
        assert len(groups) <= g and sum(m for m, _ in groups) == 12
        assert sum(m * a * a for m, a in groups) == best


def test_assemble_grouped_holds_each_molecule_and_all_its_pairs(mini_ds):
    from molgen.data.device import assemble_grouped

    dset = dense_set(mini_ds)
    ids = np.argsort(mini_ds.n_atoms[:10], kind="stable")
    n = mini_ds.n_atoms[ids].astype(int)
    groups = ((4, int(n[3])), (6, int(n[9]) + 1))  # the second group with one padding row more than needed
    g = jax.jit(assemble_grouped, static_argnums=2)(dset, ids, groups)
    assert g.groups == groups
    row = 0
    for k, i in enumerate(ids):
        a = groups[0][1] if k < 4 else groups[1][1]
        x, t = mini_ds.molecule(int(i))
        np.testing.assert_array_equal(np.asarray(g.positions)[row : row + n[k]], x)
        np.testing.assert_array_equal(np.asarray(g.types)[row : row + n[k]], t)
        np.testing.assert_array_equal(np.asarray(g.node_mask)[row : row + a], [1.0] * n[k] + [0.0] * (a - n[k]))
        assert set(np.asarray(g.segment)[row : row + a]) == {k}
        row += a
    assert row == len(g.node_mask)
    np.testing.assert_array_equal(np.asarray(g.n_atoms), list(n) + [0])
    # real pairs: every ordered pair of distinct real atoms of one molecule, once
    e = np.asarray(g.edge_mask) > 0
    r, s = np.asarray(g.receivers)[e], np.asarray(g.senders)[e]
    seg = np.asarray(g.segment)
    assert np.all(seg[r] == seg[s]) and np.all(r != s)
    assert e.sum() == (n * (n - 1)).sum() and len(set(zip(r, s))) == e.sum()
    # after the groups' pairs, masked rows up to a pair count that is a multiple of EDGE_GRANULE
    from molgen.data.batching import EDGE_GRANULE

    n_group_pairs = sum(m * a * a for m, a in groups)
    assert len(g.edge_mask) % EDGE_GRANULE == 0 and 0 <= len(g.edge_mask) - n_group_pairs < EDGE_GRANULE
    assert len(g.senders) == len(g.receivers) == len(g.edge_mask) and not e[n_group_pairs:].any()


def test_group_plan_fits_every_batch_and_grows(mini_ds):
    from molgen.data.device import GroupPlan

    ids = mini_ds.split("train")
    sampler = BatchSampler(ids, 8, seed=1)
    plan = GroupPlan(mini_ds.n_atoms, sampler, 2, n_groups=3)
    assert sum(m for m, _ in plan.shape) == 4 and len(plan.shape) <= 3
    for s in range(40):
        batch = sampler.indices(s)
        for d in range(2):
            n = np.sort(mini_ds.n_atoms[batch][d::2])
            end = 0
            for m, a in plan.shape:
                end += m
                assert n[end - 1] <= a
    big = np.repeat(np.argsort(mini_ds.n_atoms)[-1:], 8)[None]
    before = plan.shape
    grown = plan.shape_for(big)
    assert grown != before and all(a == mini_ds.n_atoms.max() for _, a in grown) and plan.shape == grown


def test_assemble_grouped_carries_the_pairs_noise_in_the_atoms_rows(mini_ds):
    from molgen.consistency.distill import PairSet
    from molgen.data.device import assemble_grouped

    rng = np.random.default_rng(1)
    sub = np.asarray([3, 9, 21, 30])
    n = mini_ds.n_atoms[sub].astype(np.int64)
    a = int(n.sum())
    pos = np.concatenate([mini_ds.molecule(int(i))[0] for i in sub])
    typ = np.concatenate([mini_ds.molecule(int(i))[1] for i in sub])
    pairs = PairSet(n, pos, typ, rng.normal(size=(a, 3)).astype(np.float32), rng.normal(size=(a, 6)).astype(np.float32))
    order = np.argsort(n, kind="stable")
    groups = ((2, int(n[order[1]])), (2, int(n[order[3]])))
    g, (nx, nh) = assemble_grouped(dense_set(pairs), order, groups)
    real = np.asarray(g.node_mask) > 0
    want = np.concatenate([np.arange(pairs.offsets[k], pairs.offsets[k] + n[k]) for k in order])
    np.testing.assert_array_equal(np.asarray(nx)[real], pairs.noise_x[want])
    np.testing.assert_array_equal(np.asarray(nh)[real], pairs.noise_h[want])
    assert not np.asarray(nx)[~real].any() and not np.asarray(nh)[~real].any()
