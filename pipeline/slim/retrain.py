"""SLIM step 8: retrain with what the curation found.

``last-layer`` (DFR-style): class-balanced logistic regression on the reference model's frozen pooled
features of the subset; the regularisation strength is chosen on a held-out fifth of the subset (never on
validation groups), then the model is refit on the whole subset and written back as the linear head, so
the retrained model is an ordinary checkpoint whose GradCAM is still closed-form. ``full``: fine-tune the
whole reference model on the subset with class-balanced sampling. ``fresh``: train a new model with the
reference recipe on every training image, drawn so that each cell of the space where the answers place the
shortcut counts the same (see :func:`pipeline.slim.weights.spurious_space_cells`).

Two remedies of the works this product builds on use the same answers. ``corm`` (Core Risk Minimization,
Singla et al.): the reference recipe, each draw of a training image corrupted (noise or blur) in its
likely-spurious region, which comes from an annotator's box or from the image's attention map and verdict
(:mod:`pipeline.slim.regions`). ``low-spuriosity`` (Moayeri et al.): the linear head refit on frozen features of
the least spurious images of each class, the share kept chosen on the validation split's worst class.
``--corrupt`` adds corm's corruption to ``fresh`` and ``full`` (by default wherever counterfactuals are added:
:func:`corrupts`).

The training modes (``fresh``, ``full``, ``corm``) resume after a kill from their last finished epoch
(``.resume/retrain.pt``, keyed by everything the training depends on); the resumed model equals an undisturbed
run's.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import WeightedRandomSampler

from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.config import AUGMENTATIONS, CORRUPT_CHOICES, RETRAIN_MODES, RunConfig, fingerprint
from pipeline.core.data import TEST, VAL, ImageSet, Sample, load_dataset
from pipeline.core.errors import PipelineError
from pipeline.core.io import file_digest
from pipeline.core.run import Run
from pipeline.model import distributed
from pipeline.model.attention import compute_attention
from pipeline.model.cam import make_extractor
from pipeline.model.evaluate import evaluate_splits, format_metrics
from pipeline.model.loaders import Corruption, make_loader, seed_everything
from pipeline.model.networks import (
    Classifier,
    build_model,
    load_checkpoint,
    load_weights,
    resolve_device,
    save_checkpoint,
)
from pipeline.model.train import Resume, fit
from pipeline.slim.counterfactual import Counterfactuals, augmentation
from pipeline.slim.propagate import propagate_run
from pipeline.slim.regions import SpuriousRegions, run_regions
from pipeline.slim.report import core_accuracy
from pipeline.slim.spuriosity import spuriosity
from pipeline.slim.weights import cell_balanced_weights, class_normalised, spurious_space_cells

log = logging.getLogger(__name__)
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # inverse regularisation strengths tried for the last layer, a decade apart
DEFAULT_C = 1.0  # scikit-learn's default, used when a class is too small to hold out a fifth of it
MIN_PER_CLASS_FOR_C = 5  # a held-out fifth needs at least one image of every class
HELD_OUT = 0.2  # the fifth of the subset that chooses C
MAX_ITER = 5000  # lbfgs iterations: standardised features converge far below this
# shares of each class kept for low-spuriosity, least spurious first: a ladder from the annotation budget's scale
# (2 %) to all of them (the plain class-balanced refit), so the validation choice can also decline to filter; a
# minority is often a few percent of a class, and keeping about as many as it has balances the head best
SPURIOSITY_SHARES = (0.02, 0.05, 0.10, 0.25, 0.50, 1.00)
CORRUPTIBLE_MODES = ("fresh", "full")  # train on images drawn natural, so --corrupt can add corm's corruption


def choose_c(features: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """The C whose fit on four fifths of the subset is best (balanced accuracy) on the last fifth.

    Ties go to the first, i.e. the strongest regularisation among equals.
    """
    if np.bincount(labels).min() < MIN_PER_CLASS_FOR_C:
        log.warning("a class has fewer than %d curated images; using C=%g instead of choosing it",
                    MIN_PER_CLASS_FOR_C, DEFAULT_C)
        return DEFAULT_C
    search = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=MAX_ITER)),
        {"logisticregression__C": list(C_GRID)}, scoring="balanced_accuracy", refit=False,
        cv=StratifiedShuffleSplit(n_splits=1, test_size=HELD_OUT, random_state=seed))
    search.fit(features, labels)
    return float(search.best_params_["logisticregression__C"])


def last_layer_head(features: np.ndarray, labels: np.ndarray, num_classes: int, c: float,
                    sample_weight: np.ndarray | None = None) -> torch.nn.Linear:
    """A linear head equal to the standardised logistic regression, in the raw feature space.

    Classes are balanced by ``class_weight`` unless explicit ``sample_weight`` say otherwise.
    """
    scaler = StandardScaler().fit(features)
    model = LogisticRegression(C=c, class_weight=None if sample_weight is not None else "balanced", max_iter=MAX_ITER)
    model.fit(scaler.transform(features), labels, sample_weight=sample_weight)
    coef = model.coef_ / scaler.scale_
    intercept = model.intercept_ - coef @ scaler.mean_
    if num_classes == 2:  # one logit difference -> two symmetric logits (same softmax)
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    head = torch.nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(coef).float())
        head.bias.copy_(torch.from_numpy(intercept).float())
    return head


def retrain_last_layer(model: Classifier, features: np.ndarray, labels: np.ndarray, seed: int) -> tuple[Classifier, dict]:
    num_classes = model.head.out_features
    if len(np.unique(labels)) < num_classes:
        raise PipelineError("the curated subset lacks a class; curate with a larger --subset-size")
    c = choose_c(features, labels, seed)
    retrained = copy.deepcopy(model)
    retrained.head = last_layer_head(features, labels, num_classes, c)
    return retrained, {"C": c}


def weighted_fit(model: Classifier, config: RunConfig, image_set: ImageSet, image_ids: list[int],
                 weights: np.ndarray | None,
                 epochs: int, lr: float, device: torch.device, size: int,
                 progress: bool, resume: Resume | None = None, corruption: Corruption | None = None,
                 counterfactuals: Counterfactuals | None = None) -> tuple[Classifier, list[float]]:
    """Train ``model`` on ``image_ids`` (then ``counterfactuals``, if any) drawn with replacement by ``weights``,
    one weight per image in that order (one epoch = as many draws as images); ``None`` draws every class
    equally often. ``resume``: continue from / keep an epoch checkpoint there; ``corruption``: corrupt the
    dataset's draws (corm; counterfactuals stay as generated)."""
    samples = [image_set.samples[i] for i in image_ids]
    extra = [(counterfactuals.image_set, counterfactuals.samples)] if counterfactuals else []
    if weights is None:
        labels = with_counterfactuals(np.array([s.y for s in samples]), counterfactuals)
        weights = class_normalised(np.ones(len(labels)), labels)
    draws = np.asarray(weights, dtype=float)
    generator = torch.Generator().manual_seed(config.retrain.seed)
    sampler = WeightedRandomSampler(torch.from_numpy(draws), num_samples=len(draws),
                                    replacement=True, generator=generator)
    loader = make_loader(image_set, samples, size, config.train.batch_size, config.data.workers, sampler=sampler,
                         corruption=corruption, extra=extra, training=True)
    if resume:  # the images and their weights come from the answers: part of what a checkpoint must match
        resume = resume.refined(image_ids, hashlib.sha256(draws.tobytes()).hexdigest(), epochs, lr, size,
                                counterfactuals.digest() if counterfactuals else None)
    losses = fit(model, loader, epochs, lr, config.train.weight_decay, device, progress, resume)
    return model.cpu().eval(), losses


def with_counterfactuals(values: np.ndarray, counterfactuals: Counterfactuals | None,
                         extra: np.ndarray | None = None) -> np.ndarray:
    """``values`` of the dataset's images followed by the counterfactuals' (their labels unless ``extra``)."""
    if not counterfactuals:
        return values
    return np.concatenate([values, counterfactuals.labels if extra is None else extra])


def retrain_full(model: Classifier, config: RunConfig, image_set: ImageSet, image_ids: list[int], device: torch.device,
                 size: int, progress: bool, sample_weight: np.ndarray | None = None,
                 resume: Resume | None = None, counterfactuals: Counterfactuals | None = None,
                 corruption: Corruption | None = None) -> tuple[Classifier, dict]:
    """Fine-tune the whole model, drawing images by ``sample_weight`` (default: class-balanced), each draw
    corrupted as ``corruption`` says (``--corrupt``)."""
    retrained, losses = weighted_fit(copy.deepcopy(model), config, image_set, image_ids, sample_weight,
                                     config.retrain.epochs, config.retrain.lr, device, size, progress, resume,
                                     corruption, counterfactuals)
    return retrained, {"train_loss": losses}


def fresh_model(config: RunConfig, image_set: ImageSet, num_classes: int, image_ids: list[int], weights: np.ndarray,
                device: torch.device, size: int, progress: bool, resume: Resume | None = None,
                corruption: Corruption | None = None,
                counterfactuals: Counterfactuals | None = None) -> tuple[Classifier, list[float]]:
    """A new model, trained with the reference recipe (architecture, start weights, epochs, lr) under ``weights``.

    Only the sampling (and, for corm or ``--corrupt``, the ``corruption``) differs from the reference run, so
    whatever changes is the data's balance or what the images show.
    """
    model = build_model(config.train.arch, num_classes, imagenet=config.train.pretrained)
    if config.train.weights:
        load_weights(model, config.train.weights)
    return weighted_fit(model, config, image_set, image_ids, weights, config.train.epochs, config.train.lr, device,
                        size, progress, resume, corruption, counterfactuals)


def retrain_fresh(arrays: AttentionArrays, scores: np.ndarray, config: RunConfig, image_set: ImageSet,
                  device: torch.device,
                  size: int, progress: bool, resume: Resume | None = None,
                  counterfactuals: Counterfactuals | None = None,
                  corruption: Corruption | None = None) -> tuple[Classifier, dict]:
    """Every training image, drawn so each class and each cell of its shortcut space count the same.

    Uses all images rather than the curated subset: the cells say how to balance, and a network trained from
    the start needs the data volume (the default subset is a tenth of it) to learn the core feature.
    Counterfactuals form one more cell of their class: as much weight as any group the answers found.
    ``corruption`` (``--corrupt``) corrupts the dataset's draws as corm does; counterfactuals stay as made.
    """
    shortcut = spurious_space_cells(arrays, scores, config.curate.seed)
    cells = shortcut.cells
    all_cells = with_counterfactuals(cells, counterfactuals,
                                     None if not counterfactuals else cells.max() + 1 + counterfactuals.labels)
    weights = cell_balanced_weights(with_counterfactuals(arrays.y, counterfactuals), all_cells)
    model, losses = fresh_model(config, image_set, len(arrays.class_names), [int(i) for i in arrays.index], weights,
                                device, size, progress, resume, corruption, counterfactuals)
    return model, {"train_loss": losses, "cells": int(all_cells.max()) + 1, "images": len(weights),
                   "shortcut_spaces": {name: space.as_dict() for name, space in shortcut.spaces.items()}}


def retrain_corm(arrays: AttentionArrays, regions: SpuriousRegions, config: RunConfig, image_set: ImageSet,
                 device: torch.device,
                 size: int, progress: bool, resume: Resume | None = None,
                 counterfactuals: Counterfactuals | None = None) -> tuple[Classifier, dict]:
    """Core Risk Minimization: the reference recipe on every training image, each draw corrupted in the image's
    likely-spurious region with ``config.retrain.corrupt_share("corm")``.

    Images are drawn uniformly (the reference run's distribution), so the corruption is the only change: what
    this mode adds can be read against ERM directly. Counterfactuals join the uniform draws uncorrupted: their
    likely-spurious region already shows another class's background, which corruption would only erase.
    """
    corruption = Corruption(regions, config.retrain.corruption, config.retrain.corrupt_share("corm"))
    image_ids = [int(i) for i in arrays.index]
    if resume:  # the regions come from the answers and boxes: a checkpoint must match them too
        resume = resume.refined(regions.digest())
    draws = np.ones(len(image_ids) + (len(counterfactuals) if counterfactuals else 0))
    model, losses = fresh_model(config, image_set, len(arrays.class_names), image_ids, draws, device, size,
                                progress, resume,
                                corruption, counterfactuals)
    return model, {"train_loss": losses, "images": len(draws), **corruption_details(corruption, regions)}


def corruption_details(corruption: Corruption, regions: SpuriousRegions) -> dict:
    """What a retraining records of its corruption: the report says how the draws were corrupted and where the
    regions came from."""
    return {"corruption": corruption.kind, "corrupt_probability": corruption.probability,
            "regions": regions.sources()}


def least_spurious_rows(labels: np.ndarray, spurious: np.ndarray, share: float) -> np.ndarray:
    """Rows of the ``share`` least spurious images of each class (ties in row order), at least
    ``MIN_PER_CLASS_FOR_C`` of each (or all it has), so the head's regularisation can still be chosen."""
    kept = []
    for y in np.unique(labels):
        members = np.flatnonzero(labels == y)
        keep = min(len(members), max(MIN_PER_CLASS_FOR_C, math.ceil(share * len(members))))
        kept.append(members[np.argsort(spurious[members], kind="stable")[:keep]])
    return np.sort(np.concatenate(kept))


def worst_class_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """The lowest per-class accuracy: what low-spuriosity is chosen by (class labels only, never groups)."""
    return float(min((predictions[labels == y] == y).mean() for y in np.unique(labels)))


@dataclass(frozen=True)
class FrozenImages:
    """Images as the reference model's frozen pooled features, with their labels: what a refit head learns from."""

    features: np.ndarray
    labels: np.ndarray

    def joined(self, other: FrozenImages | None) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of these images followed by ``other``'s."""
        if other is None:
            return self.features, self.labels
        return np.concatenate([self.features, other.features]), np.concatenate([self.labels, other.labels])


def retrain_low_spuriosity(model: Classifier, arrays: AttentionArrays, spurious: np.ndarray, val_features: np.ndarray,
                           val_labels: np.ndarray, seed: int,
                           extra: FrozenImages | None = None) -> tuple[Classifier, dict]:
    """The linear head refit (as ``last-layer``) on frozen features of the least spurious images of each class
    (:func:`pipeline.slim.spuriosity.spuriosity`), for each of ``SPURIOSITY_SHARES``; the share whose head has
    the best validation worst-class accuracy wins. ``extra`` (counterfactuals) joins every share's images.

    ``spurious`` is every training image's spuriosity. Ties go to the larger share: with the same validation
    evidence, more images give the steadier head.
    """
    val_worst: dict[str, float] = {}
    best: tuple[float, float, Classifier, dict, int] | None = None
    for share in SPURIOSITY_SHARES:
        rows = least_spurious_rows(arrays.y, spurious, share)
        features, labels = FrozenImages(arrays.features[rows], arrays.y[rows]).joined(extra)
        candidate, fitted = retrain_last_layer(model, features, labels, seed)
        with torch.no_grad():
            predictions = candidate.head(torch.from_numpy(val_features).float()).argmax(1).numpy()
        val_worst[f"{share:g}"] = worst_class_accuracy(predictions, val_labels)
        if best is None or (val_worst[f"{share:g}"], share) >= best[:2]:
            best = (val_worst[f"{share:g}"], share, candidate, fitted, len(rows))
    _, share, retrained, fitted, images = best
    return retrained, {"share": share, "images": images + (len(extra.labels) if extra else 0),
                       "val_worst_class": val_worst, **fitted}


@dataclass(frozen=True)
class RetrainInputs:
    """What every mode may use: the run and its settings, the reference model and the training attention."""

    run: Run
    config: RunConfig
    image_set: ImageSet  # checked against the run's manifest once, for every mode's loaders
    arrays: AttentionArrays
    model: Classifier
    meta: dict
    device: torch.device
    resume: Resume
    progress: bool
    counterfactuals: Counterfactuals | None  # --augment counterfactual: added to every mode's training images
    corrupt: bool  # --corrupt: fresh and full corrupt their draws as corm does (corm always does)

    @property
    def size(self) -> int:
        return self.meta["image_size"]

    @cached_property
    def scores(self) -> np.ndarray:
        """The propagated ``P(core)`` of every training image (re-propagated when stale, by rank 0 first); once
        per retraining, as reading it consolidates the answers and records their agreement again."""
        with distributed.main_first():
            return propagate_run(self.run, self.config)[0].score

    def regions(self) -> SpuriousRegions:
        """Each training image's likely-spurious region, from its box or its attention map and verdict."""
        return run_regions(self.run, self.arrays, self.scores)

    def corruption(self) -> tuple[Corruption | None, Resume, dict]:
        """``--corrupt``'s corruption (``None`` unless asked for), the resume key (which then depends on the
        regions, i.e. the answers and boxes, too) and what the retraining records of it."""
        if not self.corrupt:
            return None, self.resume, {}
        regions = self.regions()
        retrain = self.config.retrain
        corruption = Corruption(regions, retrain.corruption, retrain.corrupt_share(retrain.mode))
        return corruption, self.resume.refined(regions.digest()), corruption_details(corruption, regions)

    def curated_ids(self) -> list[int]:
        return [int(r["image_id"]) for r in self.run.load_csv(self.run.curated_path, "curate --run RUN")]

    def frozen_counterfactuals(self) -> FrozenImages | None:
        """The counterfactuals as the reference model's features (for the modes that refit the head only)."""
        if not self.counterfactuals:
            return None
        cf = self.counterfactuals
        arrays = frozen_attention(self.model, cf.image_set, cf.samples, self.size, self.config, self.device)
        return FrozenImages(arrays.features, arrays.y)


def _fresh(inputs: RetrainInputs) -> tuple[Classifier, dict]:
    scores = inputs.scores
    corruption, resume, corrupted = inputs.corruption()
    seed_everything(inputs.config.retrain.seed)
    model, details = retrain_fresh(inputs.arrays, scores, inputs.config, inputs.image_set, inputs.device,
                                   inputs.size, inputs.progress, resume, inputs.counterfactuals, corruption)
    return model, {**details, **corrupted}


def _last_layer(inputs: RetrainInputs) -> tuple[Classifier, dict]:
    image_ids = inputs.curated_ids()
    seed_everything(inputs.config.retrain.seed)
    rows = inputs.arrays.rows_of(image_ids)
    features, labels = FrozenImages(inputs.arrays.features[rows], inputs.arrays.y[rows]).joined(
        inputs.frozen_counterfactuals())
    retrained, fitted = retrain_last_layer(inputs.model, features, labels, inputs.config.retrain.seed)
    return retrained, {"subset_size": len(image_ids), **fitted}


def _full(inputs: RetrainInputs) -> tuple[Classifier, dict]:
    image_ids = inputs.curated_ids()
    corruption, resume, corrupted = inputs.corruption()
    seed_everything(inputs.config.retrain.seed)
    retrained, fitted = retrain_full(inputs.model, inputs.config, inputs.image_set, image_ids, inputs.device,
                                     inputs.size, inputs.progress, resume=resume,
                                     counterfactuals=inputs.counterfactuals, corruption=corruption)
    return retrained, {"subset_size": len(image_ids), **fitted, **corrupted}


def _corm(inputs: RetrainInputs) -> tuple[Classifier, dict]:
    regions = inputs.regions()
    seed_everything(inputs.config.retrain.seed)
    return retrain_corm(inputs.arrays, regions, inputs.config, inputs.image_set, inputs.device, inputs.size,
                        inputs.progress,
                        inputs.resume, inputs.counterfactuals)


def _low_spuriosity(inputs: RetrainInputs) -> tuple[Classifier, dict]:
    config = inputs.config
    spurious = spuriosity(inputs.arrays, inputs.scores, seed=config.curate.seed)
    val = validation_attention(inputs.model, inputs.image_set, inputs.size, config, inputs.device)
    extra = inputs.frozen_counterfactuals()
    seed_everything(config.retrain.seed)
    return retrain_low_spuriosity(inputs.model, inputs.arrays, spurious, val.features, val.y, config.retrain.seed,
                                  extra)


def validation_attention(model: Classifier, image_set: ImageSet, size: int, config: RunConfig,
                         device: torch.device) -> AttentionArrays:
    """The reference model's features on the validation split: what low-spuriosity's share is chosen on."""
    samples = image_set.split(VAL)
    if not samples:
        raise PipelineError("low-spuriosity chooses its share on the validation split, and the dataset has none; "
                            "add images with split 1")
    return frozen_attention(model, image_set, samples, size, config, device)


def frozen_attention(model: Classifier, image_set: ImageSet, samples: list[Sample], size: int, config: RunConfig,
                     device: torch.device) -> AttentionArrays:
    """The reference model's features (and attention) on ``samples``, in their order."""
    loader = make_loader(image_set, samples, size, config.embed.batch_size, config.data.workers)
    return compute_attention(make_extractor(model.to(device), "gradcam"), loader, device, config.embed.threshold,
                             size, progress=False)


def corrupts(mode: str, corrupt: str, augment: str) -> bool:
    """Whether a ``fresh`` or ``full`` retraining also corrupts its draws' likely-spurious regions (``--corrupt``;
    ``corm`` always does, the head-refit modes never see images).

    ``auto`` corrupts wherever counterfactuals are added (``augment``). Why: measured over the synthetic family
    with boxes (BENCHMARKS.md, "Counterfactuals with corm's corruption on top"), corrupting a quarter of the
    draws keeps worst-group accuracy (-0.1 +- 2.6 points over the same retraining without, eleven set-seeds)
    and keeps core accuracy level with ERM's or above it on every set where it is not at chance (set means
    85.3 / 90.0 / 72.2 % on ``default`` / ``minority`` / ``mixed``, ERM's 85.6 / 64.0 / 49.9 %; without it
    ``minority`` fell to 49.7 %).
    Without counterfactuals it was not measured, so there it stays off.
    """
    if corrupt not in CORRUPT_CHOICES:
        raise PipelineError(f"unknown --corrupt {corrupt!r}; choose {', '.join(CORRUPT_CHOICES)}")
    if mode not in CORRUPTIBLE_MODES:
        if corrupt == "yes" and mode != "corm":
            raise PipelineError(f"--corrupt yes needs a mode that trains on images ({' or '.join(CORRUPTIBLE_MODES)}); "
                                f"--mode {mode} refits the head on frozen features")
        return False
    return corrupt == "yes" or (corrupt == "auto" and augment == "counterfactual")


# mode -> how it retrains; RETRAIN_MODES (the CLI's choices) names exactly these
MODES: dict[str, Callable[[RetrainInputs], tuple[Classifier, dict]]] = {
    "fresh": _fresh, "last-layer": _last_layer, "full": _full, "corm": _corm, "low-spuriosity": _low_spuriosity}


def retrain_run(run: Run, config: RunConfig, progress: bool = True) -> dict:
    """Retrain by ``config.retrain.mode``; writes ``slim_model.pt`` and ``metrics.json["slim"]``.

    ``fresh``, ``corm`` and ``low-spuriosity`` need the propagated answers only (re-propagated when stale);
    ``last-layer`` and ``full`` train on ``curate``'s subset. Where the dataset has masks, the metrics carry
    core accuracy (background replaced by noise) beside the group accuracies.

    Under torchrun the modes that train a network (fresh, full, corm) train it with DDP; the head-only modes
    (seconds) run alike on every rank; rank 0 alone writes and evaluates.
    """
    mode = config.retrain.mode
    if mode not in MODES:
        raise PipelineError(f"unknown --mode {mode!r}; choose {', '.join(RETRAIN_MODES)}")
    arrays = AttentionArrays.load(run.require(run.attention_path, "embed --run RUN"))
    if config.retrain.augment not in AUGMENTATIONS:
        raise PipelineError(f"unknown --augment {config.retrain.augment!r}; choose {', '.join(AUGMENTATIONS)}")
    model, meta = load_checkpoint(run.require(run.checkpoint_path, "train --data DIR --run RUN"))
    device = resolve_device(config.device)
    corrupts(mode, config.retrain.corrupt, "none")  # a bad --corrupt stops before the counterfactuals are made
    with distributed.main_first():  # what rank 0 (re)makes, the other ranks then read: manifest, counterfactuals
        augment, counterfactuals = augmentation(run, config, arrays)
        image_set = load_dataset(config.data.root, run.manifest_path)
    corrupt = corrupts(mode, config.retrain.corrupt, augment)
    inputs = RetrainInputs(run, config, image_set, arrays, model, meta, device, retrain_resume(run, config, device),
                           progress, counterfactuals, corrupt)
    retrained, details = MODES[mode](inputs)
    details["augment"] = augment
    if counterfactuals:
        details["counterfactuals"] = {"images": len(counterfactuals), "rejected": counterfactuals.rejected}
    distributed.on_main(lambda: _save_retrained(inputs, retrained, details))
    return run.load_metrics()["slim"]


def _save_retrained(inputs: RetrainInputs, retrained: Classifier, details: dict) -> None:
    """Save the retrained model, evaluate it (group and core accuracy) and record it in the run's metrics."""
    run, config, image_set, device, mode = inputs.run, inputs.config, inputs.image_set, inputs.device, \
        inputs.config.retrain.mode
    save_checkpoint(retrained, run.slim_checkpoint_path, {**inputs.meta, "mode": mode, **details})
    run.save_config(config)
    results = evaluate_splits(retrained.to(device), image_set, inputs.size, config, device, inputs.progress)
    if image_set.has_masks:
        for split, name in ((VAL, "val"), (TEST, "test")):
            if name in results:
                results[name]["core_acc"] = core_accuracy(retrained, image_set, image_set.split(split), inputs.size,
                                                          config, device)
    run.update_metrics(slim={**results.get("test", {}), "val": results.get("val"), "mode": mode, **details})
    run.discard_resume("retrain")
    for name, split_metrics in results.items():
        log.info(format_metrics(f"SLIM ({mode}) {name}", split_metrics))
        if "core_acc" in split_metrics:
            log.info("SLIM (%s) %s: core accuracy (background replaced by noise) %.1f%%", mode, name,
                     100 * split_metrics["core_acc"])


def retrain_resume(run: Run, config: RunConfig, device: torch.device) -> Resume:
    """Where retraining keeps its epoch checkpoint, keyed by the exact reference model and the settings.

    The reference model's bytes, not its fingerprint: the fingerprint leaves out the device it was trained on.
    :func:`weighted_fit` adds the images and weights the answers chose.
    """
    key = fingerprint("retrain", file_digest(run.checkpoint_path), config.data, config.train, config.retrain,
                      distributed.placement(device))
    return Resume(run.resume_path("retrain"), key)
