"""The one typed configuration object of a run.

Every stage reads its settings from a :class:`RunConfig`; the run directory stores it as ``config.json`` so
that later stages (and later sessions) see the same settings the earlier ones used. Each field is declared
once, with :func:`option`: its type and default come from the field, its command-line help from the
metadata, and the CLI generates its flags from that declaration.
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
RETRAIN_MODES = ("last-layer", "full", "fresh", "corm", "low-spuriosity")
# --augment auto adds counterfactuals in the modes that train on every image or on a validation-chosen share of
# them, where they were measured to help; in the modes that train on the curated subset (a tenth of the images,
# which they outnumber five to one) they cost worst-group and mean accuracy (BENCHMARKS.md, "Counterfactuals in
# the other modes")
AUTO_COUNTERFACTUAL_MODES = ("fresh", "corm", "low-spuriosity")
CORRUPTIONS = ("noise", "blur")
AUGMENTATIONS = ("auto", "none", "counterfactual")
CORRUPT_CHOICES = ("auto", "yes", "no")
CORM_CORRUPT_PROBABILITY = 0.5  # corm: half the draws corrupted, half natural (what its benchmark rows used)
# --corrupt on top of the balancing: attention judged spurious holds about half the object, so corrupting half the
# draws erased the object too often (core accuracy fell on one set); a quarter kept it (BENCHMARKS.md)
ADDED_CORRUPT_PROBABILITY = 0.25
# counterfactuals per class as a share of its images: half led a quarter on the family mean, most on the set a class
# attends partly on the object and partly off it, and took nothing from the others (BENCHMARKS.md, fifteenth session)
COUNTERFACTUAL_SHARE = 0.5
CURATION_VARIANTS = ("attention", "published")
CONSENSUS_METHODS = ("dawid-skene", "mace", "glad", "majority")  # pipeline.slim.consensus says what each does
DEVICES = ("auto", "cpu", "cuda")


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, flag: str | None = None,
           alias: str | None = None, metavar: str | None = None, path: bool = False, exclusive: str | None = None,
           clears: str | None = None, required: bool = False, positional: bool = False) -> Any:
    """A dataclass field that is also a command-line option.

    ``flag`` overrides the ``--field-name`` spelling and ``alias`` adds a second one; ``path`` makes the value absolute (a run keeps working
    from another directory); options sharing an ``exclusive`` group cannot be given together; giving this
    option resets the field named by ``clears`` to its unset value (``None``); ``positional`` makes it an
    argument without a flag.
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "alias": alias, "metavar": metavar, "path": path,
                "exclusive": exclusive, "clears": clears, "required": required, "positional": positional}
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    """Where the images are and how they are fed to the model."""

    root: str = option("", "dataset folder (metadata.csv or class folders); required for a new run",
                       flag="--data", metavar="DIR", path=True)
    image_size: int | None = option(None, "resize images to this side (default: dataset.json's, else the images' "
                                          "own median side, at most 224)")
    workers: int = option(0, "data-loading worker processes (0: load in the main process)", metavar="N")


@dataclass
class TrainConfig:
    """ERM reference-model training (SLIM step 1)."""

    arch: str = option("smallcnn", "backbone (smallcnn keeps an 8x8 attention map at 64 px)", choices=ARCHS)
    epochs: int = option(12, "training epochs")
    batch_size: int = option(64, "images per training step (under torchrun: all processes together)")
    lr: float = option(0.01, "SGD learning rate")
    weight_decay: float = option(1e-4, "weight decay")
    pretrained: bool = option(False, "start ResNets from ImageNet weights already in the torch cache "
                                     "(never downloads)")
    weights: str | None = option(None, "start from this local checkpoint", metavar="PATH", path=True)
    seed: int = option(0, "training seed")


@dataclass
class EmbedConfig:
    """The attention stage (SLIM steps 2-3)."""

    cam: str = option("gradcam", "CAM method (gradcam: closed form in the forward pass; others use "
                                 "pytorch-grad-cam)", choices=CAM_METHODS)
    batch_size: int = option(128, "images per batch")
    threshold: float = option(0.8, "CAM level of 'looked hardest' for AIoU and overlays")
    embedding: str = option("umap", "2-D embedding of the attention vectors", choices=EMBEDDINGS)
    precision: str = option("auto", "forward precision of the closed-form GradCAM (auto: bf16 autocast on CUDA "
                                    "and on CPUs with native bf16 (AVX-512 BF16/AMX), fp32 elsewhere; bf16 maps "
                                    "are within ~0.05 of fp32)", choices=PRECISIONS)
    seed: int = option(0, "seed of the 2-D embedding")


@dataclass
class SampleConfig:
    """Which images go to the annotators (SLIM step 4)."""

    per_class: int | None = option(None, "images per class (instead of --fraction)", metavar="N",
                                   exclusive="budget")
    fraction: float = option(0.02, "fraction of each class", metavar="F", exclusive="budget", clears="per_class")
    space: str = option("vectors", "cluster the full attention vectors or their 2-D embedding",
                        choices=SAMPLE_SPACES)
    round: int = option(1, "annotation round")
    contested_below: float = option(0.8, "from round 2: answered images whose team agreement (the consensus's "
                                         "confidence, or the share of answers agreeing with it where lower) is "
                                         "below this are asked again first, of people who have not answered them "
                                         "(0: none)", metavar="P")
    seed: int = option(0, "k-means seed")


@dataclass
class CurateConfig:
    """Propagation and curation (SLIM steps 6-7)."""

    labels: str | None = option(None, "answers as a CSV of image_id,label (core/spurious/unsure) instead of the "
                                      "pulled ones", metavar="CSV", path=True)
    consensus: str = option("dawid-skene", "how several answers on one image become its verdict: dawid-skene, "
                                           "mace or glad weigh each annotator by estimated reliability; majority "
                                           "counts votes (a tie is unsure)", choices=CONSENSUS_METHODS)
    subset_size: int | None = option(None, "images in the curated subset (default: 10 % of the training set, "
                                           ">= 20 per class)", metavar="N")
    variant: str = option("attention", "attention: all images, cells of attended x ignored features; published: "
                                       "SLIM as written (above-median score, pooled x ignored features)",
                          choices=CURATION_VARIANTS)
    seed: int = option(0, "clustering seed")


@dataclass
class RetrainConfig:
    """Retraining with what curation found (SLIM step 8); ``fresh`` won the WGA benchmark, see BENCHMARKS.md."""

    mode: str = option("fresh", "fresh: the reference recipe again on all images, cell-balanced; last-layer: "
                                "logistic regression on frozen features of the subset; full: fine-tune on the "
                                "subset; corm: the reference recipe with each image's likely-spurious region "
                                "corrupted (Core Risk Minimization); low-spuriosity: the linear head refit on "
                                "the least spurious images of each class", choices=RETRAIN_MODES)
    epochs: int = option(20, "full mode: passes over the (class-balanced) subset (fresh and corm use the "
                             "reference's)")
    lr: float = option(0.001, "full mode: learning rate (fresh and corm use the reference's)")
    corruption: str = option("noise", "corm mode and --corrupt: replace the likely-spurious region by Gaussian "
                                      "noise, or blur it", choices=CORRUPTIONS)
    corrupt_probability: float | None = option(None, "corm mode and --corrupt: share of training draws that are "
                                                    "corrupted, the others natural (default: 0.5 in corm mode, "
                                                    "0.25 with --corrupt; measured: BENCHMARKS.md)", metavar="P")
    corrupt: str = option("auto", "fresh and full modes: also corrupt each draw's likely-spurious region as corm "
                                  "does (Core Risk Minimization on top of the balancing): yes, no, or auto: "
                                  "wherever counterfactuals are added (measured: BENCHMARKS.md)",
                          choices=CORRUPT_CHOICES)
    augment: str = option("auto", "counterfactual: add generated images of each class on the other classes' "
                                  "backgrounds (every mode; `counterfactuals --run RUN` makes and lists them); "
                                  "auto: counterfactual in fresh, corm and low-spuriosity wherever a class can "
                                  "have them (its object located in some image, by a box or attention judged "
                                  "core, and another class's too), else none (measured: BENCHMARKS.md)",
                          choices=AUGMENTATIONS)
    counterfactual_share: float = option(COUNTERFACTUAL_SHARE, "counterfactual images generated per class, as a "
                                                               "share of the class's training images (measured: "
                                                               "BENCHMARKS.md)", metavar="F")
    editor: str | None = option(None, "generative editor for counterfactuals as module:Class (e.g. a diffusers "
                                      "inpainting pipeline from local weights; docs/counterfactuals.md); default: "
                                      "composite the class's core region onto other classes' backgrounds",
                                metavar="MODULE:CLASS")
    seed: int = option(0, "seed of the retraining's sampling and initialisation")

    def corrupt_share(self, mode: str) -> float:
        """The share of draws corrupted in ``mode``: ``corrupt_probability`` as given, else the mode's measured
        default (corm's own recipe, or the lighter one added to a balanced retraining)."""
        if self.corrupt_probability is not None:
            return self.corrupt_probability
        return CORM_CORRUPT_PROBABILITY if mode == "corm" else ADDED_CORRUPT_PROBABILITY


@dataclass
class RunConfig:
    """All settings of one run; each section belongs to one stage."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    device: str = option("auto", "where to compute (auto: CUDA when present, else CPU)", choices=DEVICES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build from ``config.json``; unknown keys are ignored so old runs stay readable."""
        kwargs: dict[str, Any] = {}
        for name, section_cls in SECTIONS.items():
            known = {f.name for f in dataclasses.fields(section_cls)}
            kwargs[name] = section_cls(**{k: v for k, v in raw.get(name, {}).items() if k in known})
        if "device" in raw:
            kwargs["device"] = raw["device"]
        return cls(**kwargs)


SECTIONS = {"data": DataConfig, "train": TrainConfig, "embed": EmbedConfig, "sample": SampleConfig,
            "curate": CurateConfig, "retrain": RetrainConfig}


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts: what decides whether a stage's output can be reused."""
    blob = json.dumps(
        [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_path(path: str | Path) -> str:
    """Absolute form of a user path, so a run keeps working when started from another directory."""
    return str(Path(path).expanduser().resolve())
