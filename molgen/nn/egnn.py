"""The E(3)-equivariant graph neural network of EDM (Satorras et al. 2021; Hoogeboom et al. 2022), in Flax.

Works on packed graphs (:mod:`molgen.data.batching`): node rows, directed edge rows (receiver <- sender),
masks, and a segment id per node; or on grouped graphs (molecules of similar size padded to a common size,
all pairs), whose pair arrays need no gathers or scatters (:class:`molgen.nn.pairs.Pairs`).  Only real atoms and
real pairs contribute: every message is multiplied by its edge mask and every node update by its node mask. With
``sorted_grads`` (training) every sum over pair rows, forward and in the gradient, is a scatter-add by sorted
indices (:func:`molgen.nn.pairs.sender_rows`), which a GPU adds run by run instead of with an atomic add per
element; without it (sampling) the network also takes forward-mode derivatives (``jax.jvp``), which
:func:`~molgen.nn.pairs.sender_rows` does not. With ``pair_kernel`` (training on a GPU in bf16 or TF32, packed
batches of molecules of up to 32 atoms) the backward passes of the pair MLPs' first layers and of the gated
messages' sums are GPU kernels (:mod:`molgen.nn.pairgrad`).

Layout, as in EDM's ``EGNN``: an input embedding, ``n_layers`` equivariant blocks, each with
``inv_sublayers`` graph-convolution sub-layers (edge MLP, optional attention gate, sum aggregation divided
by ``normalization_factor``, residual node MLP) followed by one coordinate update
``x_i += sum_j (x_i - x_j) / (|x_i - x_j| + norm_constant) * tanh(phi(m_ij)) * coords_range / n_layers``,
and an output embedding.  Edge attributes are the squared distance in the current block and at the input.

The first layer of each edge MLP acts on ``concat(h_i, h_j, e_ij)``; with ``split_edge_layer`` it is computed
as ``W_i h_i + W_j h_j + W_e e_ij`` from per-node products (same parameters, same result, fewer FLOPs).

Precision: ``EGNN(cfg, dtype=jnp.bfloat16)`` runs the hidden layers' matrix products and the per-edge activations in
bfloat16 (products accumulate in float32), while the parameters, the residual feature stream, coordinates,
distances, the coordinate update, every sum over neighbours, every gather of node rows into pair rows (so
that no scatter-add of the backward pass runs in bfloat16) and the output layer stay float32. The default
(float32) computes everything in float32. The parameters are the same either way. The first layer of each edge
MLP adds the edge attributes' term (two attributes) as a product with the pair rows; with bf16, or
``fused_attrs=True`` (training in TF32, and sampling), it is computed element-wise in float32 instead: exact, and
fused with the sum rather than a [pairs, features] array of its own written and read again. With bf16 the layers
with one output per pair (attention logit, coordinate weight) are float32 sums of element-wise products
(PairScalar).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from molgen.nn.pairgrad import gated_sum, pair_layer, supported
from molgen.nn.pairs import Pairs, gather_rows, segment_sum

# PyTorch's nn.Linear default (uniform, variance 1/(3 fan_in)), which EDM's released models were trained with.
torch_like = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclass(frozen=True)
class EGNNConfig:
    nf: int = 128
    n_layers: int = 6
    inv_sublayers: int = 1
    attention: bool = True
    tanh: bool = True
    coords_range: float = 15.0
    norm_constant: float = 1.0
    normalization_factor: float = 1.0
    in_node_nf: int = 6  # one-hot(5) + charge; the conditioning channel is added on top
    split_edge_layer: bool = True

    def replace(self, **kw) -> "EGNNConfig":
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EGNNConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


PRESETS: dict[str, EGNNConfig] = {
    "tiny": EGNNConfig(nf=32, n_layers=2),
    "small": EGNNConfig(nf=64, n_layers=4),
    "base": EGNNConfig(nf=128, n_layers=6),
    "edm": EGNNConfig(nf=256, n_layers=9),
}


def remove_mean(x, node_mask, segment, n_segments):
    """Subtract each molecule's mean over its real atoms; padding rows stay zero."""
    x = x * node_mask[:, None]
    total = segment_sum(x, segment, n_segments, sorted_ids=True)
    count = segment_sum(node_mask, segment, n_segments, sorted_ids=True)
    mean = total / jnp.maximum(count, 1.0)[:, None]
    return (x - gather_rows(mean, segment, sorted_ids=True)) * node_mask[:, None]


def coord2diff(x, pairs: Pairs, norm_constant):
    diff = pairs.combine(x, -x)
    radial = jnp.sum(diff**2, axis=-1, keepdims=True)
    norm = jnp.sqrt(radial + 1e-8)
    return radial, diff / (norm + norm_constant)


def _kernels(pairs: Pairs, dt, fused_attrs: bool, features: int, n_attrs: int) -> bool:
    """Whether a pair MLP takes its gradient from :mod:`molgen.nn.pairgrad`'s kernels: asked for (``Pairs.kernel``,
    packed batches), the arithmetic of bf16 or TF32 training (the edge attributes' term element-wise), and
    shapes the kernels take."""
    return pairs.kernel and (dt != jnp.float32 or fused_attrs) and supported(pairs.receivers.shape[0], features,
                                                                            n_attrs)


class EdgeInput(nn.Module):
    """Dense layer on concat(h_receiver, h_sender, edge_attr), plain or split into per-node products, and its SiLU
    (the sum rounded to the compute type first)."""

    features: int
    split: bool = True
    dtype: jnp.dtype = jnp.float32  # of the node products (the edge attributes' term stays float32)
    fused_attrs: bool = False  # the edge attributes' term element-wise (always with bf16)

    @nn.compact
    def __call__(self, h, edge_attr, pairs: Pairs):
        nf, ne = h.shape[-1], edge_attr.shape[-1]
        kernel = self.param("kernel", torch_like, (2 * nf + ne, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        dt = self.dtype
        # Node rows go to pair rows in float32 at either precision: the backward pass of that gather is a
        # scatter-add into the node rows, which accumulates in float32 (on an H200, XLA's float32 atomic adds
        # write 4 values per instruction, its bfloat16 ones 1). With bf16 the sum is rounded to bfloat16 before the
        # SiLU.
        if self.split:
            hc = h.astype(dt)
            hr, hs = hc @ kernel[:nf].astype(dt), hc @ kernel[nf : 2 * nf].astype(dt)
            if _kernels(pairs, dt, self.fused_attrs, self.features, ne):
                return pair_layer(hr, hs, edge_attr, kernel[2 * nf :], bias, pairs.index(), dt)
            node_terms = pairs.combine(hr.astype(jnp.float32), hs.astype(jnp.float32))
        else:
            x = jnp.concatenate([pairs.receiver(h), pairs.sender(h)], axis=-1).astype(dt)
            node_terms = (x @ kernel[: 2 * nf].astype(dt)).astype(jnp.float32)
        w = kernel[2 * nf :]
        if dt == jnp.float32 and not self.fused_attrs:
            return nn.silu(node_terms + edge_attr @ w + bias)
        # The edge attributes' term element-wise, in float32 (exact: no TF32 or bf16 rounding of the distances),
        # fused with the sum instead of a [pairs, features] product of its own that is written and read again
        return nn.silu((node_terms + sum(edge_attr[:, k : k + 1] * w[k] for k in range(ne)) + bias).astype(dt))


class PairScalar(nn.Dense):
    """A dense layer to one output per pair (the attention gate's logit, the coordinate update's weight), with
    nn.Dense's parameters. ``elementwise`` (bf16 training): the product as a float32 sum of element-wise products
    over the features, which XLA fuses into one pass over the pair rows; as a matrix product with one column, XLA
    on a GPU padded and converted the [pairs, features] rows for it and for its weight's gradient (~15 GB a
    256 x 9 step at batch 1024, docs/performance.md)."""

    elementwise: bool = False

    @nn.compact
    def __call__(self, x):
        if not self.elementwise:
            return super().__call__(x)
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        y = jnp.sum(x.astype(jnp.float32) * kernel[:, 0], axis=-1, keepdims=True)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        return y.astype(self.dtype or jnp.float32)


def _dense(features, dtype=jnp.float32, **kw):
    return nn.Dense(features, kernel_init=torch_like, dtype=dtype, param_dtype=jnp.float32, **kw)


class DenseParams(nn.Module):
    """A dense layer's parameters under nn.Dense's names and initialisers (the same parameter tree, and fresh
    values, as the layer), for :func:`molgen.nn.pairgrad.gated_sum`."""

    shape: tuple[int, int]

    @nn.compact
    def __call__(self):
        return self.param("kernel", torch_like, self.shape), self.param("bias", nn.initializers.zeros,
                                                                        (self.shape[1],))


class GCL(nn.Module):
    cfg: EGNNConfig
    dtype: jnp.dtype = jnp.float32
    fused_attrs: bool = False

    @nn.compact
    def __call__(self, h, edge_attr, pairs: Pairs, node_mask, edge_mask):
        c, dt = self.cfg, self.dtype
        if c.attention and _kernels(pairs, dt, self.fused_attrs, c.nf, edge_attr.shape[-1]):
            m = EdgeInput(c.nf, c.split_edge_layer, dt, self.fused_attrs, name="edge_in")(h, edge_attr, pairs)
            w2, b2 = DenseParams((c.nf, c.nf), name="edge_out")()
            v, bv = DenseParams((c.nf, 1), name="att")()
            agg = gated_sum(m @ w2.astype(dt), b2, v[:, 0], bv, edge_mask, pairs.receivers, pairs.n_nodes, dt)
        else:
            agg = pairs.sum(self._messages(h, edge_attr, pairs, edge_mask))
        agg = agg / c.normalization_factor
        out = _dense(c.nf, dt, name="node_in")(jnp.concatenate([h, agg], axis=-1))
        out = h + _dense(c.nf, dt, name="node_out")(nn.silu(out)).astype(jnp.float32)
        return out * node_mask[:, None]

    def _messages(self, h, edge_attr, pairs: Pairs, edge_mask):
        c, dt = self.cfg, self.dtype
        # The first layer's sum in the compute type: with bf16 its gradient, read by the two scatter-adds and two
        # sums of the backward pass, is a bfloat16 array (half the memory traffic of a float32 one)
        m = EdgeInput(c.nf, c.split_edge_layer, dt, self.fused_attrs, name="edge_in")(h, edge_attr, pairs)
        m = nn.silu(_dense(c.nf, dt, name="edge_out")(m))
        if c.attention:
            m = m * nn.sigmoid(PairScalar(1, kernel_init=torch_like, dtype=dt, elementwise=dt != jnp.float32,
                                          name="att")(m))
        return m.astype(jnp.float32) * edge_mask[:, None]  # neighbour sums in float32


COORD_OUT_INIT = nn.initializers.variance_scaling(1e-6, "fan_avg", "uniform")


class EquivariantUpdate(nn.Module):
    cfg: EGNNConfig
    dtype: jnp.dtype = jnp.float32
    fused_attrs: bool = False

    @nn.compact
    def __call__(self, h, x, coord_diff, edge_attr, pairs: Pairs, node_mask, edge_mask):
        c, dt = self.cfg, self.dtype
        m = EdgeInput(c.nf, c.split_edge_layer, dt, self.fused_attrs, name="coord_in")(h, edge_attr, pairs)
        m = nn.silu(_dense(c.nf, dt, name="coord_hidden")(m))
        w = PairScalar(1, use_bias=False, name="coord_out", elementwise=dt != jnp.float32,  # float32 weight
                       kernel_init=COORD_OUT_INIT)(m.astype(jnp.float32))
        return self._move(x, w, coord_diff, pairs, node_mask, edge_mask)

    def _move(self, x, w, coord_diff, pairs: Pairs, node_mask, edge_mask):
        c = self.cfg
        if c.tanh:
            w = jnp.tanh(w) * (c.coords_range / c.n_layers)
        trans = coord_diff * w * edge_mask[:, None]
        agg = pairs.sum(trans) / c.normalization_factor
        return (x + agg) * node_mask[:, None]


class EquivariantBlock(nn.Module):
    cfg: EGNNConfig
    dtype: jnp.dtype = jnp.float32
    fused_attrs: bool = False

    @nn.compact
    def __call__(self, h, x, edge_attr0, pairs: Pairs, node_mask, edge_mask):
        c = self.cfg
        d2, coord_diff = coord2diff(x, pairs, c.norm_constant)
        edge_attr = jnp.concatenate([d2, edge_attr0], axis=-1)
        for i in range(c.inv_sublayers):
            h = GCL(c, self.dtype, self.fused_attrs, name=f"gcl_{i}")(h, edge_attr, pairs, node_mask, edge_mask)
        x = EquivariantUpdate(c, self.dtype, self.fused_attrs, name="update")(
            h, x, coord_diff, edge_attr, pairs, node_mask, edge_mask)
        return h * node_mask[:, None], x


class EGNN(nn.Module):
    """EDM's dynamics network: (x, h, conditioning) -> (zero-CoM position output, feature output)."""

    cfg: EGNNConfig
    dtype: jnp.dtype = jnp.float32  # compute type of the hidden layers (module docstring: Precision)
    fused_attrs: bool = False  # edge attributes' term element-wise (module docstring: Precision); bf16: always
    sorted_grads: bool = False  # training: the gathers by sender summed back by sorted receivers (sender_rows)
    pair_kernel: bool = False  # training, packed: the pair MLPs' gradients in GPU kernels (pairgrad)

    @nn.compact
    def __call__(self, x, h, cond, graph):
        """x [N,3] zero-CoM, h [N,F], cond [N] (time / noise level per atom), graph: a packed Graph.

        Returns ``vel`` [N,3] = x_final - x with zero CoM per molecule, and ``h_out`` [N,F].
        """
        c = self.cfg
        node_mask, edge_mask = graph.node_mask, graph.edge_mask
        pairs = Pairs(graph, self.sorted_grads, self.pair_kernel)
        n_seg = graph.n_atoms.shape[0]
        hin = jnp.concatenate([h, cond[:, None]], axis=-1) * node_mask[:, None]
        d2_0, _ = coord2diff(x, pairs, c.norm_constant)
        hh = _dense(c.nf, self.dtype, name="embedding")(hin).astype(jnp.float32)
        xx = x
        for i in range(c.n_layers):
            hh, xx = EquivariantBlock(c, self.dtype, self.fused_attrs, name=f"block_{i}")(
                hh, xx, d2_0, pairs, node_mask, edge_mask)
        h_out = _dense(c.in_node_nf + 1, name="embedding_out")(hh) * node_mask[:, None]
        vel = remove_mean(xx - x, node_mask, graph.segment, n_seg)
        return vel, h_out[:, : c.in_node_nf]


def forward_flops(cfg: EGNNConfig, n_nodes: int, n_edges: int, split: bool | None = None) -> int:
    """Floating-point operations of the matrix products of one forward pass over ``n_nodes`` atoms and
    ``n_edges`` ordered pairs (2 per multiply-add; element-wise work not counted). ``split`` (default: the
    config's) counts the first edge layer as per-node products; False counts it on the concatenated pair, as in
    EDM's code. A training step (forward and backward) costs about 3 times this."""
    split = cfg.split_edge_layer if split is None else split
    f, n, e = cfg.nf, n_nodes, n_edges
    f_in = cfg.in_node_nf + 1  # features + the noise-level channel

    def edge_input():  # concat(h_i, h_j, [d2, d2_0]) @ W, two edge attributes
        return 2 * (2 * n * f * f + e * 2 * f) if split else 2 * e * (2 * f + 2) * f

    gcl = edge_input() + 2 * e * f * f + (2 * e * f if cfg.attention else 0) + 2 * n * 2 * f * f + 2 * n * f * f
    update = edge_input() + 2 * e * f * f + 2 * e * f
    block = cfg.inv_sublayers * gcl + update
    return 2 * n * f_in * f + cfg.n_layers * block + 2 * n * f * (cfg.in_node_nf + 1)


@functools.lru_cache(maxsize=8)
def _init_program(cfg: EGNNConfig):
    return jax.jit(EGNN(cfg).init)


def init_params(cfg: EGNNConfig, seed: int):
    """Fresh parameters of an EGNN (initialised on a one-molecule dummy graph; shapes do not depend on it). Jitted:
    one compiled program instead of one per operation, eagerly (seconds for every new run), kept per config."""
    import numpy as np

    from molgen.data.batching import pack

    g = pack([np.zeros((3, 3), np.float32)], [np.zeros(3, np.int32)])
    h = np.zeros((len(g.node_mask), cfg.in_node_nf), np.float32)
    return _init_program(cfg)(jax.random.PRNGKey(seed), g.positions, h, g.node_mask, g)
