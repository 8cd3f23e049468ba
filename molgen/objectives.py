"""The training objectives, by name. Each owns what it adds to a run's config and its loss; a run looks its
objective up once.

* ``diffusion``: EDM's epsilon objective (:func:`molgen.diffusion.edm.diffusion_loss`);
* ``ct``: consistency training from scratch (iCT, ``ict`` parametrisation, :mod:`molgen.consistency.ict`);
* ``ect``: consistency tuning of a diffusion model (``--init``; ``ict-vp`` parametrisation);
* ``inpaint``: EDM's objective with a random fragment of most molecules given clean: a diffusion model that
  completes fragments (:mod:`molgen.diffusion.inpaint`);
* ``distill``: regression of a consistency model's one-call sample onto a diffusion teacher's targets
  (:mod:`molgen.consistency.distill`), with an anchor model's low-noise behaviour kept;
* ``polish``: regression of a diffusion model's denoiser onto a teacher's at the polishing levels, on a
  consistency model's molecules (:mod:`molgen.consistency.polisher`): a small, fast polisher.

A loss is ``loss(params, batch, key, step, anchor) -> (loss, aux)``; the parameters it needs besides the trained
ones (the distillation anchor's, else None) come loaded, as an argument, so one compiled training program serves
any anchor of the same shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from molgen import MolgenError
from molgen.config import RunConfig
from molgen.consistency.distill import DistillConfig, distill_loss
from molgen.consistency.ict import ConsistencyConfig, consistency_loss, measure_sigma_data
from molgen.consistency.polisher import PolishConfig, polish_loss
from molgen.data.features import type_features
from molgen.diffusion.edm import diffusion_loss
from molgen.diffusion.inpaint import InpaintConfig, inpaint_loss
from molgen.networks import model_fn


def features(graph):
    return type_features(graph.types, graph.node_mask)


@dataclass(frozen=True)
class Objective:
    name: str
    kind: str  # what the trained network computes: "diffusion" or "consistency"
    init: str  # what --init is: "none", "optional" (a warm start of the same kind), "diffusion" or "consistency"
    pairs: bool = False  # trains on teacher-made pairs instead of QM9
    from_init: tuple[str, ...] = ()  # the config sections a run takes from its --init model, not from its recipe

    def taken_from(self, init_cfg: RunConfig) -> dict:
        """The sections of ``init_cfg`` this objective's run keeps (:attr:`from_init`)."""
        return {s: getattr(init_cfg, s) for s in self.from_init}

    def configure(self, cfg: RunConfig, ds, init_cfg: RunConfig | None) -> RunConfig:
        """The run's config completed: sections this objective needs, values measured on the data."""
        hist = tuple(int(c) for c in ds.size_histogram("train"))
        fracs = tuple(float(f) for f in ds.type_fractions("train"))
        return cfg.replace(data=dataclasses.replace(cfg.data, size_hist=hist, type_fractions=fracs))

    def make_loss(self, cfg: RunConfig, apply: Callable) -> Callable:
        raise NotImplementedError


def _with_sigma_data(cfg: RunConfig, ds) -> RunConfig:
    sx, sh = measure_sigma_data(ds, ds.split("train"), lambda t, m: type_features(t, m, np), seed=cfg.seed)
    return cfg.replace(consistency=dataclasses.replace(cfg.consistency, sigma_data_x=sx, sigma_data_h=sh))


class Diffusion(Objective):
    def configure(self, cfg, ds, init_cfg):
        cfg = super().configure(cfg, ds, init_cfg).replace(consistency=None, distill=None, stack=None, inpaint=None)
        if init_cfg is not None:  # a warm start keeps the network and schedule of the model it starts from
            cfg = cfg.replace(**self.taken_from(init_cfg))
        return cfg

    def make_loss(self, cfg, apply):
        return lambda p, g, k, s, a: diffusion_loss(apply, p, g.positions, features(g), g, k, cfg.diffusion)


class Inpaint(Diffusion):
    def configure(self, cfg, ds, init_cfg):
        return super().configure(cfg, ds, init_cfg).replace(inpaint=cfg.inpaint or InpaintConfig())

    def make_loss(self, cfg, apply):
        return lambda p, g, k, s, a: inpaint_loss(apply, p, g.positions, features(g), g, k, cfg.diffusion, cfg.inpaint)


class Consistency(Objective):
    def configure(self, cfg, ds, init_cfg):
        cfg = super().configure(cfg, ds, init_cfg).replace(distill=None, stack=None, inpaint=None)
        cons = cfg.consistency or ConsistencyConfig()
        if cons.total_steps <= 0:  # the curriculum spans the run
            cons = dataclasses.replace(cons, total_steps=cfg.optim.steps)
        if self.init == "diffusion":  # tuning: the diffusion model's network, fed as EDM fed it
            cons = dataclasses.replace(cons, parametrization="ict-vp")
            cfg = cfg.replace(**self.taken_from(init_cfg), consistency=cons)
        else:
            cfg = cfg.replace(diffusion=None, consistency=dataclasses.replace(cons, parametrization="ict"))
        return _with_sigma_data(cfg, ds)

    def make_loss(self, cfg, apply):
        cfn = model_fn(cfg, apply)
        return lambda p, g, k, s, a: consistency_loss(cfn, p, g.positions, features(g), g, k, s, cfg.consistency)


class Distill(Objective):
    def configure(self, cfg, ds, init_cfg):
        # the student, its network and noise levels are --init's; the data are pairs made for this run
        return cfg.replace(**self.taken_from(init_cfg), distill=cfg.distill or DistillConfig())

    def make_loss(self, cfg, apply):
        cfn = model_fn(cfg, apply)
        return lambda p, b, k, s, a: distill_loss(cfn, p, b[0].positions, features(b[0]), b[1], b[0], cfg.consistency,
                                                  cfg.distill, k, a)


class Polish(Objective):
    def configure(self, cfg, ds, init_cfg):
        # a diffusion model (--init's network and schedule) trained on examples made for this run
        return cfg.replace(**self.taken_from(init_cfg), polish=cfg.polish or PolishConfig(), consistency=None,
                           distill=None, stack=None, inpaint=None)

    def make_loss(self, cfg, apply):
        den = model_fn(cfg, apply)
        return lambda p, b, k, s, a: polish_loss(den, p, b[0], b[1], cfg.polish.type_weight)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Diffusion("diffusion", "diffusion", "optional", from_init=("model", "diffusion")),
    Inpaint("inpaint", "diffusion", "optional", from_init=("model", "diffusion")),
    Consistency("ct", "consistency", "none"),
    Consistency("ect", "consistency", "diffusion", from_init=("model", "diffusion")),
    Distill("distill", "consistency", "consistency", pairs=True,
            from_init=("model", "diffusion", "consistency", "stack", "data")),
    Polish("polish", "diffusion", "diffusion", pairs=True, from_init=("model", "diffusion", "data")),
)}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise MolgenError(f"objective must be one of {', '.join(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]
