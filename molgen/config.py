"""The run configuration: the model (network, noise schedule, consistency function, stages), the objective it
is trained with, the optimiser and the data. Frozen dataclasses, saved as config.json next to every checkpoint
and in every model folder, so that a checkpoint alone rebuilds its model and says how it was trained.

A model's config.json holds the sections that apply to it: ``diffusion`` (EDM's noise schedule: diffusion
models, and consistency models built on an EDM network), ``consistency`` (consistency models), ``stack``
(stacked models), ``distill`` (models trained by distillation), ``inpaint`` (diffusion models trained to
complete fragments), ``polish`` (diffusion models taught to polish by a teacher).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from molgen.consistency.distill import DistillConfig
from molgen.consistency.ict import ConsistencyConfig
from molgen.consistency.polisher import PolishConfig
from molgen.consistency.stack import StackConfig
from molgen.diffusion.edm import DiffusionConfig
from molgen.diffusion.inpaint import InpaintConfig
from molgen.nn.egnn import EGNNConfig


@dataclass(frozen=True)
class OptimConfig:
    batch_size: int = 64  # molecules per step, split over the devices
    lr: float = 5e-4  # Adam's learning rate after the linear warm-up
    warmup: int = 500  # steps
    steps: int = 10000  # optimiser steps of the whole run
    ema: float = 0.999  # decay of the evaluation (and shipped) parameters
    clip: float = 1.0  # gradient clipping by global norm
    precision: str = "auto"  # molgen.networks.PRECISIONS, or auto (per platform)
    layout: str = "auto"  # of a batch on the device: molgen.data.device.LAYOUTS, or auto (per platform)
    ckpt_every: int = 500  # steps between checkpoints (0: only at the end)
    eval_every: int = 1000  # validation loss of the EMA parameters (0: never)
    keep: int = 3  # checkpoints kept


@dataclass(frozen=True)
class DataConfig:
    remove_h: bool = False
    size_hist: tuple[int, ...] = ()  # the training split's atom-count histogram (index = atoms): sampling needs it
    type_fractions: tuple[float, ...] = ()  # the training split's atom-type mix


@dataclass(frozen=True)
class RunConfig:
    objective: str = "diffusion"  # molgen.objectives.OBJECTIVES
    model: EGNNConfig = field(default_factory=EGNNConfig)
    diffusion: DiffusionConfig | None = field(default_factory=DiffusionConfig)
    consistency: ConsistencyConfig | None = None
    stack: StackConfig | None = None
    distill: DistillConfig | None = None
    inpaint: InpaintConfig | None = None  # trained to complete fragments (molgen.diffusion.inpaint)
    polish: PolishConfig | None = None  # trained to polish as a teacher does (molgen.consistency.polisher)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    init: str | None = None  # the model the run started from

    def replace(self, **kw) -> "RunConfig":
        return dataclasses.replace(self, **kw)

    def with_optim(self, **kw) -> "RunConfig":
        """The same run with some optimiser settings changed."""
        return dataclasses.replace(self, optim=dataclasses.replace(self.optim, **kw))

    @property
    def kind(self) -> str:
        """What the network computes: "consistency" (a consistency function) or "diffusion" (EDM's epsilon)."""
        return "diffusion" if self.consistency is None else "consistency"

    @property
    def n_features(self) -> int:
        return self.model.in_node_nf

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return from_dict(cls, upgrade(d))

    def save(self, path: Path) -> None:
        from molgen.io_utils import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        """A saved config.json (a damaged or foreign file: one line, MolgenError)."""
        from molgen import MolgenError
        from molgen.io_utils import read_json_object

        d = read_json_object(path, "a molgen config")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError, AttributeError) as e:
            raise MolgenError(f"{path}: not a molgen config ({e})") from None


def resolve_auto(value: str, choices: tuple[str, ...], per_platform: dict[str, str], what: str,
                 platform: str | None = None) -> str:
    """A setting that may be ``auto``: the platform's entry of ``per_platform`` (the first choice on an unlisted
    platform); anything else must be one of ``choices`` (else one line: MolgenError)."""
    if value == "auto":
        import jax

        return per_platform.get(platform or jax.default_backend(), choices[0])
    if value not in choices:
        from molgen import MolgenError

        raise MolgenError(f"{what} must be auto, {', '.join(choices)}; got {value!r}")
    return value


def from_dict(cls, d):
    """A (nested, frozen) dataclass from a dict: unknown keys are ignored, lists become tuples."""
    if d is None:
        return None
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, typ = d[f.name], hints[f.name]
        args = typing.get_args(typ) if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union else ()
        sub = next((a for a in args if dataclasses.is_dataclass(a)), typ if dataclasses.is_dataclass(typ) else None)
        if sub is not None and isinstance(v, dict):
            v = from_dict(sub, v)
        elif isinstance(v, list):
            v = tuple(v)
        kw[f.name] = v
    return cls(**kw)


_OLD_OPTIM = ("batch_size", "lr", "warmup", "steps", "ema", "clip", "ckpt_every", "eval_every", "keep", "precision")
_OLD_DISTILL = {"teacher": "teacher", "n_pairs": "pairs", "teacher_steps": "teacher_steps",
                "pair_temperature": "pair_temperature", "anchor": "anchor", "anchor_fraction": "anchor_fraction",
                "bond_weight": "bond_weight"}


def upgrade(d: dict) -> dict:
    """The sections of a config.json written before objectives, optimiser and data had sections of their own
    (a flat dict with ``mode``); a current one is returned as it is."""
    if "mode" not in d:
        return d
    mode = d["mode"]
    new = {"objective": mode, "model": d.get("model", {}), "seed": d.get("seed", 0), "init": d.get("init"),
           "optim": {k: d[k] for k in _OLD_OPTIM if k in d},
           "data": {k: d[k] for k in ("remove_h", "size_hist", "type_fractions") if k in d},
           "stack": d.get("stack"), "diffusion": d.get("diffusion", {})}
    if mode != "diffusion":
        cons = dict(d.get("consistency", {}))
        schedule = {k: cons.pop(k) for k in ("timesteps", "precision", "power") if k in cons}
        new["consistency"] = cons
        new["diffusion"] = schedule if cons.get("parametrization") == "ict-vp" else None
    if mode == "distill":
        dist = {new_k: d[old] for old, new_k in _OLD_DISTILL.items() if old in d}
        dist["teacher"], dist["anchor"] = dist.get("teacher") or "", dist.get("anchor") or ""
        rounds = int(d.get("refine_rounds", 0))
        dist.update(targets="polished" if rounds else "ode", polish_calls=rounds or DistillConfig.polish_calls)
        new["distill"] = dist
    return new
