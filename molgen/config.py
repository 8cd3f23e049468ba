"""The run configuration: one frozen dataclass, saved as config.json next to every checkpoint so that a
checkpoint alone says how to rebuild its model and how to sample from it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from molgen.consistency.ict import ConsistencyConfig
from molgen.consistency.stack import StackConfig
from molgen.diffusion.edm import DiffusionConfig
from molgen.nn.egnn import EGNNConfig

MODES = ("diffusion", "ct", "ect", "distill")


@dataclass(frozen=True)
class RunConfig:
    mode: str = "diffusion"
    model: EGNNConfig = field(default_factory=EGNNConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 500
    steps: int = 10000
    ema: float = 0.999
    clip: float = 1.0
    seed: int = 0
    remove_h: bool = False
    ckpt_every: int = 500
    eval_every: int = 1000
    keep: int = 3
    init: str | None = None  # the run an "ect" (diffusion) or "distill" (consistency) run was initialised from
    # "distill": the diffusion model whose PF-ODE gives the targets, how many noise -> molecule pairs, ODE steps
    teacher: str | None = None
    n_pairs: int = 0
    teacher_steps: int = 18
    # "distill": this share of each batch keeps the anchor model's (default: init's) f at low noise levels
    anchor: str | None = None
    anchor_fraction: float = 0.0
    bond_weight: float = 0.0  # "distill": weight of the short-pair distance term
    relax_weight: float = 0.0  # "distill": weight of the teacher-relaxation term (see distill_loss)
    # "distill": 0: that term's target is one teacher call on the output re-noised to a random low level;
    # R > 0: R teacher refinement steps on the output itself, no noise (molgen.refine)
    relax_rounds: int = 0
    # "distill": weight of distribution matching (molgen.consistency.dmd); > 0 trains a fake diffusion model
    # (the teacher's network, started from the teacher) beside the student: parameters {"student", "fake"}
    dmd_weight: float = 0.0
    # "distill": R > 0 regresses onto the --init student's own one-call answers relaxed by R rounds of the
    # teacher's denoising (molgen.consistency.distill.refine_pairs) instead of the ODE ends; the rounds' noise
    # level is refine_sigma, or with 0 the sampler's schedule molgen.refine.refine_levels(R)
    refine_rounds: int = 0
    refine_sigma: float = 0.0
    # "distill": the pairs' noise is pair_temperature * z, so the student learns the map from the noise that
    # `molgen sample --temperature` gives it (and the teacher's targets are its reduced-temperature molecules)
    pair_temperature: float = 1.0
    # A stacked model (molgen.consistency.stack): the consistency function is followed, inside the same network
    # call, by denoising stages of a diffusion model's network; None: a plain model
    stack: StackConfig | None = None
    freeze_stages: bool = False  # a stacked model's training updates its base network only
    # Training arithmetic (molgen.train.PRECISIONS, or "auto": per platform); sampling is float32 regardless
    precision: str = "auto"
    # For sampling without the data set: the training split's atom-count histogram (index = atoms).
    size_hist: tuple[int, ...] = ()
    type_fractions: tuple[float, ...] = ()

    def replace(self, **kw) -> "RunConfig":
        return dataclasses.replace(self, **kw)

    @property
    def n_features(self) -> int:
        return self.model.in_node_nf

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        subs = {"model": EGNNConfig, "diffusion": DiffusionConfig, "consistency": ConsistencyConfig}
        for k, typ in subs.items():
            if k in d:
                names = {f.name for f in dataclasses.fields(typ)}
                d[k] = typ(**{a: b for a, b in d[k].items() if a in names})
        if d.get("stack") is not None:
            d["stack"] = StackConfig.from_dict(d["stack"])
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        for k in ("size_hist", "type_fractions"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def save(self, path: Path) -> None:
        from molgen.io_utils import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
