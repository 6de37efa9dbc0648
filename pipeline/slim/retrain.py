"""SLIM step 8: retrain with what the curation found.

``last-layer`` (DFR-style): class-balanced logistic regression on the reference model's frozen pooled
features of the subset; the regularisation strength is chosen on a held-out fifth of the subset (never on
validation groups), then the model is refit on the whole subset and written back as the linear head, so
the retrained model is an ordinary checkpoint whose GradCAM is still closed-form. ``full``: fine-tune the
whole reference model on the subset with class-balanced sampling. ``fresh``: train a new model with the
reference recipe on every training image, drawn so that each cell of the space where the answers place the
shortcut counts the same (see :func:`pipeline.slim.curate.spurious_space_cells`).

The two training modes resume after a kill from their last finished epoch (``.resume/retrain.pt``, keyed by
everything the training depends on); the resumed model equals an undisturbed run's.
"""

from __future__ import annotations

import copy
import hashlib
import logging

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import WeightedRandomSampler

from pipeline.core.config import RETRAIN_MODES, RunConfig, fingerprint
from pipeline.core.data import load_dataset
from pipeline.core.errors import PipelineError
from pipeline.core.io import file_digest
from pipeline.core.run import Run
from pipeline.model.attention import AttentionArrays
from pipeline.model.evaluate import evaluate_splits, format_metrics
from pipeline.model.loaders import make_loader, seed_everything
from pipeline.model.networks import (
    Classifier,
    build_model,
    load_checkpoint,
    load_weights,
    resolve_device,
    save_checkpoint,
)
from pipeline.model.train import Resume, fit
from pipeline.slim.propagate import propagate_run
from pipeline.slim.weights import cell_balanced_weights, class_normalised, spurious_space_cells

log = logging.getLogger(__name__)
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # inverse regularisation strengths tried for the last layer, a decade apart
DEFAULT_C = 1.0  # scikit-learn's default, used when a class is too small to hold out a fifth of it
MIN_PER_CLASS_FOR_C = 5  # a held-out fifth needs at least one image of every class
HELD_OUT = 0.2  # the fifth of the subset that chooses C
MAX_ITER = 5000  # lbfgs iterations: standardised features converge far below this


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


def weighted_fit(model: Classifier, config: RunConfig, image_ids: list[int], weights: np.ndarray | None,
                 epochs: int, lr: float, device: torch.device, size: int,
                 progress: bool, resume: Resume | None = None) -> tuple[Classifier, list[float]]:
    """Train ``model`` on ``image_ids`` drawn with replacement by ``weights`` (one epoch = as many draws);
    ``None`` draws every class equally often. ``resume``: continue from / keep an epoch checkpoint there."""
    image_set = load_dataset(config.data.root)
    samples = [image_set.samples[i] for i in image_ids]
    if weights is None:
        labels = np.array([s.y for s in samples])
        weights = class_normalised(np.ones(len(samples)), labels)
    draws = np.asarray(weights, dtype=float)
    generator = torch.Generator().manual_seed(config.retrain.seed)
    sampler = WeightedRandomSampler(torch.from_numpy(draws), num_samples=len(samples),
                                    replacement=True, generator=generator)
    loader = make_loader(image_set, samples, size, config.train.batch_size, config.data.workers, sampler=sampler)
    if resume:  # the images and their weights come from the answers: part of what a checkpoint must match
        resume = resume.refined(image_ids, hashlib.sha256(draws.tobytes()).hexdigest(), epochs, lr, size)
    losses = fit(model, loader, epochs, lr, config.train.weight_decay, device, progress, resume)
    return model.cpu().eval(), losses


def retrain_full(model: Classifier, config: RunConfig, image_ids: list[int], device: torch.device,
                 size: int, progress: bool, sample_weight: np.ndarray | None = None,
                 resume: Resume | None = None) -> tuple[Classifier, dict]:
    """Fine-tune the whole model, drawing images by ``sample_weight`` (default: class-balanced)."""
    retrained, losses = weighted_fit(copy.deepcopy(model), config, image_ids, sample_weight, config.retrain.epochs,
                                     config.retrain.lr, device, size, progress, resume)
    return retrained, {"train_loss": losses}


def fresh_model(config: RunConfig, num_classes: int, image_ids: list[int], weights: np.ndarray,
                device: torch.device, size: int, progress: bool,
                resume: Resume | None = None) -> tuple[Classifier, list[float]]:
    """A new model, trained with the reference recipe (architecture, start weights, epochs, lr) under ``weights``.

    Only the sampling differs from the reference run, so whatever changes is the data's balance.
    """
    model = build_model(config.train.arch, num_classes, imagenet=config.train.pretrained)
    if config.train.weights:
        load_weights(model, config.train.weights)
    return weighted_fit(model, config, image_ids, weights, config.train.epochs, config.train.lr, device, size,
                        progress, resume)


def retrain_fresh(arrays: AttentionArrays, scores: np.ndarray, config: RunConfig, device: torch.device,
                  size: int, progress: bool, resume: Resume | None = None) -> tuple[Classifier, dict]:
    """Every training image, drawn so each class and each cell of its shortcut space count the same.

    Uses all images rather than the curated subset: the cells say how to balance, and a network trained from
    the start needs the data volume (the default subset is a tenth of it) to learn the core feature.
    """
    cells = spurious_space_cells(arrays, scores, config.curate.seed)
    weights = cell_balanced_weights(arrays.y, cells)
    model, losses = fresh_model(config, len(arrays.class_names), [int(i) for i in arrays.index], weights,
                                device, size, progress, resume)
    return model, {"train_loss": losses, "cells": int(cells.max()) + 1, "images": len(weights)}


def retrain_run(run: Run, config: RunConfig, progress: bool = True) -> dict:
    """Retrain by ``config.retrain.mode``; writes ``slim_model.pt`` and ``metrics.json["slim"]``.

    ``fresh`` needs the propagated answers only (it re-propagates when they are stale); ``last-layer`` and
    ``full`` train on ``curate``'s subset.
    """
    mode = config.retrain.mode
    if mode not in RETRAIN_MODES:
        raise PipelineError(f"unknown --mode {mode!r}; choose {', '.join(RETRAIN_MODES)}")
    arrays = AttentionArrays.load(run.require(run.attention_path, "embed --run RUN"))
    model, meta = load_checkpoint(run.require(run.checkpoint_path, "train --data DIR --run RUN"))
    device = resolve_device(config.device)
    resume = retrain_resume(run, config, device)
    if mode == "fresh":
        propagation, _ = propagate_run(run, config)
        seed_everything(config.retrain.seed)
        retrained, details = retrain_fresh(arrays, propagation.score, config, device, meta["image_size"], progress,
                                           resume)
    else:
        image_ids = [int(r["image_id"]) for r in run.load_csv(run.curated_path, "curate --run RUN")]
        details = {"subset_size": len(image_ids)}
        seed_everything(config.retrain.seed)
        if mode == "last-layer":
            rows = arrays.rows_of(image_ids)
            retrained, fitted = retrain_last_layer(model, arrays.features[rows], arrays.y[rows], config.retrain.seed)
        else:
            retrained, fitted = retrain_full(model, config, image_ids, device, meta["image_size"], progress,
                                             resume=resume)
        details.update(fitted)
    save_checkpoint(retrained, run.slim_checkpoint_path, {**meta, "mode": mode, **details})
    run.save_config(config)
    image_set = load_dataset(config.data.root)
    results = evaluate_splits(retrained.to(device), image_set, meta["image_size"], config, device, progress)
    slim = {**results.get("test", {}), "val": results.get("val"), "mode": mode, **details}
    run.update_metrics(slim=slim)
    run.discard_resume("retrain")
    for name, split_metrics in results.items():
        log.info(format_metrics(f"SLIM ({mode}) {name}", split_metrics))
    return slim


def retrain_resume(run: Run, config: RunConfig, device: torch.device) -> Resume:
    """Where retraining keeps its epoch checkpoint, keyed by the exact reference model and the settings.

    The reference model's bytes, not its fingerprint: the fingerprint leaves out the device it was trained on.
    :func:`weighted_fit` adds the images and weights the answers chose.
    """
    key = fingerprint("retrain", file_digest(run.checkpoint_path), config.data, config.train, config.retrain,
                      device.type)
    return Resume(run.resume_path("retrain"), key)
