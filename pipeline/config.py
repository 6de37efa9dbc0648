"""The one typed configuration object of a run.

Every stage reads its settings from a :class:`RunConfig`; the CLI is the only place that builds one from
flags, and the run directory stores it as ``config.json`` so that later stages (and later sessions) see the
same settings the earlier ones used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHS = ("smallcnn", "resnet18", "resnet50")
CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "eigencam", "layercam", "scorecam", "hirescam")
EMBEDDINGS = ("umap", "pca")
SAMPLE_SPACES = ("vectors", "embedding")
PRECISIONS = ("auto", "fp32", "bf16")
RETRAIN_MODES = ("last-layer", "full", "fresh")
CURATION_VARIANTS = ("attention", "published")


@dataclass
class DataConfig:
    """Where the images are and how they are fed to the model."""

    root: str = ""
    image_size: int | None = None  # None: the dataset's own size (synthetic) or 224
    workers: int = 0


@dataclass
class TrainConfig:
    """ERM reference-model training (SLIM step 1)."""

    arch: str = "smallcnn"
    epochs: int = 12
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 1e-4
    pretrained: bool = False  # ImageNet weights, only if already in the torch cache
    weights: str | None = None  # a local checkpoint to start from
    seed: int = 0


@dataclass
class EmbedConfig:
    """The attention stage (SLIM steps 2-3)."""

    cam: str = "gradcam"
    batch_size: int = 128
    threshold: float = 0.8  # CAM level counted as "where the model looked hardest" (AIoU delta)
    embedding: str = "umap"
    precision: str = "auto"  # auto: bf16 autocast where the hardware runs bf16 natively, else fp32
    seed: int = 0


@dataclass
class SampleConfig:
    """Which images go to the annotators (SLIM step 4)."""

    per_class: int | None = None
    fraction: float = 0.02
    space: str = "vectors"
    round: int = 1
    seed: int = 0


@dataclass
class CurateConfig:
    """Propagation and curation (SLIM steps 6-7)."""

    labels: str | None = None  # CSV of image_id,label instead of the run's pulled annotations
    subset_size: int | None = None  # None: 10 % of the training images
    variant: str = "attention"  # or "published" (SLIM step 7 as written)
    seed: int = 0


@dataclass
class RetrainConfig:
    """Retraining with what curation found (SLIM step 8); ``fresh`` won the WGA benchmark, see BENCHMARKS.md."""

    mode: str = "fresh"
    epochs: int = 20  # full mode: passes over the (class-balanced) subset; fresh uses the reference's epochs
    lr: float = 0.001  # full mode; fresh uses the reference's learning rate
    seed: int = 0


@dataclass
class RunConfig:
    """All settings of one run; each section belongs to one stage."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build from ``config.json``; unknown keys are ignored so old runs stay readable."""
        sections = {"data": DataConfig, "train": TrainConfig, "embed": EmbedConfig, "sample": SampleConfig,
                    "curate": CurateConfig, "retrain": RetrainConfig}
        kwargs: dict[str, Any] = {}
        for name, section_cls in sections.items():
            known = {f.name for f in dataclasses.fields(section_cls)}
            kwargs[name] = section_cls(**{k: v for k, v in raw.get(name, {}).items() if k in known})
        if "device" in raw:
            kwargs["device"] = raw["device"]
        return cls(**kwargs)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts: what decides whether a stage's output can be reused."""
    blob = json.dumps(
        [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_path(path: str | Path) -> str:
    """Absolute form of a user path, so a run keeps working when started from another directory."""
    return str(Path(path).expanduser().resolve())
