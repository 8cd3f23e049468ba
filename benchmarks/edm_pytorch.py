"""Time EDM's original PyTorch implementation (Hoogeboom et al.) on the same machine, for a side-by-side ratio
with molgen's own benchmarks (train_step.py, sampling.py).

EDM's code is NOT part of molgen and is never committed here. To measure it:

    git clone <EDM's public repository> .edm             # e3_diffusion_for_molecules (git-ignored here)
    python -m venv .torchenv && .torchenv/bin/pip install torch numpy
    .torchenv/bin/python benchmarks/edm_pytorch.py --edm-repo .edm --cache $MOLGEN_HOME/qm9_v1.npz

The script only needs numpy and torch (it reads molgen's processed QM9 cache with numpy, without importing
molgen or JAX). It builds EDM's model with EDM's own `get_model` arguments for QM9 (egnn_dynamics, attention,
tanh, coords_range 15, norm_constant 1, sum aggregation, normalize_factors [1, 4, 10], charges included) at
each preset size and times, per preset:

* a training step exactly as EDM's `train_epoch` does it: a batch of random training molecules padded to the
  batch's largest molecule (EDM's collate drops all-zero columns), `compute_loss_and_nll`, backward, EDM's
  adaptive gradient clipping, AdamW (amsgrad), EMA update;
* one reverse-diffusion step of EDM's sampler (`sample_p_zs_given_zt`) on molecules whose sizes are drawn from
  the training histogram, each padded to 29 atoms as EDM's `qm9/sampling.py` does, reported per 1000 molecules.

Medians over --repeats after --warmup untimed steps (on a GPU, `torch.cuda.synchronize()` closes each timing).
`--device cuda` runs it on the GPU; `--batch-sizes 64,256,1024` times the training step at several batch sizes,
one line each, in the form of benchmarks/train_step.py:

    RESULT edm-pytorch <preset> batch=<B> molecules_per_s=<X> step_s=...
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np

PRESETS = {"small": (64, 4), "base": (128, 6), "edm": (256, 9)}
CHARGE_OF = np.array([1, 6, 7, 8, 9])  # H, C, N, O, F: EDM's charge channel


def edm_args(nf: int, n_layers: int) -> SimpleNamespace:
    return SimpleNamespace(
        include_charges=True, context_node_nf=0, conditioning=[], condition_time=True, nf=nf, n_layers=n_layers,
        attention=True, tanh=True, model="egnn_dynamics", norm_constant=1, inv_sublayers=1, sin_embedding=False,
        normalization_factor=1, aggregation_method="sum", probabilistic_model="diffusion", diffusion_steps=1000,
        diffusion_noise_schedule="polynomial_2", diffusion_noise_precision=1e-5, diffusion_loss_type="l2",
        normalize_factors=[1, 4, 10], lr=1e-4, ode_regularization=1e-3, ema_decay=0.999,
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edm-repo", required=True, help="checkout of EDM's public repository")
    ap.add_argument("--cache", required=True, help="molgen's processed QM9 cache (qm9_v1.npz)")
    ap.add_argument("--presets", default="small,base,edm")
    ap.add_argument("--batch-sizes", default="64", help="comma-separated batch sizes of the training step")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--no-sampling", action="store_true", help="time the training step only")
    ap.add_argument("--sample-batch", type=int, default=100, help="molecules per timed sampling call")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return ap.parse_args()


class Edm:
    """EDM's modules (imported from its checkout), the device and molgen's QM9 cache as EDM's batches."""

    def __init__(self, args):
        sys.path.insert(0, args.edm_repo)
        import torch
        from equivariant_diffusion import utils as edm_utils
        from qm9 import losses
        from qm9.models import get_model, get_optim
        import utils as edm_top_utils

        self.torch, self.utils, self.losses, self.top_utils = torch, edm_utils, losses, edm_top_utils
        self.get_model, self.get_optim = get_model, get_optim
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = torch.device(args.device)
        # read once: an npz file's arrays are read (and decompressed) again at every access, which per molecule of
        # a batch cost seconds a batch (batch 1024 never finished on an H200 host)
        with np.load(args.cache) as cache:
            self.d = {k: cache[k] for k in ("positions", "types", "n_atoms", "split_train")}
        self.offsets = np.concatenate([[0], np.cumsum(self.d["n_atoms"].astype(np.int64))])
        self.train = self.d["split_train"]
        counts = np.bincount(self.d["n_atoms"][self.train], minlength=30)
        self.dataset_info = {"n_nodes": {int(n): int(c) for n, c in enumerate(counts) if c > 0},
                             "atom_decoder": ["H", "C", "N", "O", "F"], "max_n_nodes": 29}

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def batch(self, ids):
        """EDM's training batch: the molecules padded to the largest, positions centred, one-hot types, charges."""
        torch, d, device = self.torch, self.d, self.device
        n_max, b = int(d["n_atoms"][ids].max()), len(ids)
        x = np.zeros((b, n_max, 3), np.float32)
        one_hot = np.zeros((b, n_max, 5), np.float32)
        charges = np.zeros((b, n_max, 1), np.float32)
        mask = np.zeros((b, n_max), np.float32)
        for k, i in enumerate(ids):
            s, e = self.offsets[i], self.offsets[i + 1]
            n = e - s
            x[k, :n] = d["positions"][s:e]
            t = d["types"][s:e].astype(np.int64)
            one_hot[k, np.arange(n), t] = 1
            charges[k, :n, 0] = CHARGE_OF[t]
            mask[k, :n] = 1
        node_mask = torch.from_numpy(mask).to(device)
        edge_mask = node_mask[:, None, :] * node_mask[:, :, None]
        edge_mask = edge_mask * (~torch.eye(n_max, dtype=torch.bool, device=device))[None]
        xt = self.utils.remove_mean_with_mask(torch.from_numpy(x).to(device), node_mask[:, :, None])
        h = {"categorical": torch.from_numpy(one_hot).to(device), "integer": torch.from_numpy(charges).to(device)}
        return xt, h, node_mask[:, :, None], edge_mask


def time_training(edm: Edm, a, bs: int, args, rng) -> tuple:
    """EDM's training step as its ``train_epoch`` runs it; (median step seconds, set-up seconds, model, nodes_dist)."""
    t_setup = time.perf_counter()
    model, nodes_dist, _ = edm.get_model(a, edm.device, edm.dataset_info, None)
    model = model.to(edm.device)  # get_model builds it on the CPU
    model_ema = copy.deepcopy(model)
    ema = edm.utils.EMA(a.ema_decay)
    optim = edm.get_optim(a, model)
    queue = edm.top_utils.Queue()
    queue.add(3000)
    model.train()
    times, first = [], None
    for r in range(args.warmup + args.repeats):
        x, h, node_mask, edge_mask = edm.batch(rng.choice(edm.train, bs, replace=False))
        edm.sync()
        t0 = time.perf_counter()
        first = first or t0
        optim.zero_grad()
        nll, reg, _ = edm.losses.compute_loss_and_nll(a, model, nodes_dist, x, h, node_mask, edge_mask, None)
        loss = nll + a.ode_regularization * reg
        loss.backward()
        edm.top_utils.gradient_clipping(model, queue)
        optim.step()
        ema.update_model_average(model_ema, model)
        edm.sync()
        if r >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), first - t_setup, model, nodes_dist


def time_sampling(edm: Edm, model, nodes_dist, args) -> float:
    """Seconds of one reverse-diffusion call per 1000 molecules, each padded to 29 atoms as EDM's sampler does."""
    torch, device, bsz = edm.torch, edm.device, args.sample_batch
    model.eval()
    sizes = nodes_dist.sample(bsz)
    node_mask = torch.zeros(bsz, 29, device=device)
    for k in range(bsz):
        node_mask[k, : int(sizes[k])] = 1
    edge_mask = (node_mask[:, None, :] * node_mask[:, :, None] * (~torch.eye(29, dtype=torch.bool, device=device))[None])
    edge_mask = edge_mask.view(bsz * 29 * 29, 1)
    node_mask = node_mask[:, :, None]
    stimes = []
    with torch.no_grad():
        z = model.sample_combined_position_feature_noise(bsz, 29, node_mask)
        for r in range(args.warmup + max(3, args.repeats // 2)):
            s = torch.full((bsz, 1), 500 / 1000.0, device=device)
            t = torch.full((bsz, 1), 501 / 1000.0, device=device)
            edm.sync()
            t0 = time.perf_counter()
            z = model.sample_p_zs_given_zt(s, t, z, node_mask, edge_mask, None)
            edm.sync()
            if r >= args.warmup:
                stimes.append(time.perf_counter() - t0)
    return statistics.median(stimes) * 1000 / bsz


def main() -> None:
    t_start = time.perf_counter()
    args = parse_args()
    edm = Edm(args)
    torch = edm.torch
    rng = np.random.default_rng(0)
    dev_name = torch.cuda.get_device_name(edm.device) if edm.device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {dev_name}, threads {torch.get_num_threads()}, "
          f"batch sizes {args.batch_sizes}, start-up {time.perf_counter() - t_start:.1f} s", flush=True)
    for name in args.presets.split(","):
        nf, layers = PRESETS[name]
        a = edm_args(nf, layers)
        model = None
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            try:
                step_s, setup_s, model, nodes_dist = time_training(edm, a, bs, args, rng)
                n_params = sum(p.numel() for p in model.parameters())
                print(f"RESULT edm-pytorch {name} batch={bs} molecules_per_s={bs / step_s:.0f} step_s={step_s:.4f} "
                      f"params={n_params} device={args.device} repeats={args.repeats} setup_s={setup_s:.1f} "
                      f"elapsed_s={time.perf_counter() - t_start:.1f}", flush=True)
            except torch.cuda.OutOfMemoryError as e:  # a batch too large for the GPU: the next one is still measured
                first = str(e).splitlines()[0] if str(e) else ""
                print(f"SKIPPED edm-pytorch {name} batch={bs} (OutOfMemoryError: {first[:120]})", flush=True)
                model = None
                torch.cuda.empty_cache()
        if args.no_sampling or model is None:
            continue
        call_s = time_sampling(edm, model, nodes_dist, args)
        print(f"EDM-pytorch {name:6s} nf={nf} layers={layers} params={n_params:,}  train step {step_s:.3f} s "
              f"(batch {bs}, median of {args.repeats})  sampling: {call_s:.3f} s per network call per 1000 molecules "
              f"(1000-step sampling of 1000 molecules ~ {call_s * 1000 / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
