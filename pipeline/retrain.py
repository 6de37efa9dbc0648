"""SLIM step 8: retrain with what the curation found.

``last-layer`` (DFR-style): class-balanced logistic regression on the reference model's frozen pooled
features of the subset; the regularisation strength is chosen on a held-out fifth of the subset (never on
validation groups), then the model is refit on the whole subset and written back as the linear head, so
the retrained model is an ordinary checkpoint whose GradCAM is still closed-form. ``full``: fine-tune the
whole reference model on the subset with class-balanced sampling. ``fresh``: train a new model with the
reference recipe on every training image, drawn so that each cell of the space where the answers place the
shortcut counts the same (see :func:`pipeline.curate.spurious_space_cells`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.utils.data import WeightedRandomSampler

from pipeline.config import RETRAIN_MODES, RunConfig
from pipeline.curate import cell_balanced_weights, class_normalised, spurious_space_cells
from pipeline.data import load_dataset
from pipeline.errors import PipelineError
from pipeline.evaluate import format_metrics
from pipeline.models import (
    Classifier,
    build_model,
    load_checkpoint,
    load_weights,
    resolve_device,
    save_checkpoint,
)
from pipeline.run import Run, atomic_write_json
from pipeline.train import evaluate_splits, fit, make_loader, seed_everything

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def balanced_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean([(predictions[labels == y] == y).mean() for y in np.unique(labels)]))


def choose_c(features: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """The C whose fit on four fifths of the subset is best (balanced accuracy) on the last fifth."""
    if np.bincount(labels).min() < 5:
        return 1.0
    fit_x, held_x, fit_y, held_y = train_test_split(features, labels, test_size=0.2, stratify=labels,
                                                    random_state=seed)
    scaler = StandardScaler().fit(fit_x)
    scores = []
    for c in C_GRID:
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(scaler.transform(fit_x), fit_y)
        scores.append(balanced_accuracy(model.predict(scaler.transform(held_x)), held_y))
    return C_GRID[int(np.argmax(scores))]  # first best: the strongest regularisation among equals


def last_layer_head(features: np.ndarray, labels: np.ndarray, num_classes: int, c: float,
                    sample_weight: np.ndarray | None = None) -> torch.nn.Linear:
    """A linear head equal to the standardised logistic regression, in the raw feature space.

    Classes are balanced by ``class_weight`` unless explicit ``sample_weight`` say otherwise.
    """
    scaler = StandardScaler().fit(features)
    model = LogisticRegression(C=c, class_weight=None if sample_weight is not None else "balanced", max_iter=5000)
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
                 epochs: int, lr: float, device: torch.device, size: int, progress: bool) -> tuple[Classifier, list[float]]:
    """Train ``model`` on ``image_ids`` drawn with replacement by ``weights`` (one epoch = as many draws);
    ``None`` draws every class equally often."""
    image_set = load_dataset(config.data.root)
    samples = [image_set.samples[i] for i in image_ids]
    if weights is None:
        labels = np.array([s.y for s in samples])
        weights = class_normalised(np.ones(len(samples)), labels)
    generator = torch.Generator().manual_seed(config.retrain.seed)
    sampler = WeightedRandomSampler(torch.from_numpy(np.asarray(weights, dtype=float)), num_samples=len(samples),
                                    replacement=True, generator=generator)
    loader = make_loader(image_set, samples, size, config.train.batch_size, config.data.workers, sampler=sampler)
    losses = fit(model, loader, epochs, lr, config.train.weight_decay, device, progress)
    return model.cpu().eval(), losses


def retrain_full(model: Classifier, run: Run, config: RunConfig, image_ids: list[int], device: torch.device,
                 size: int, progress: bool, sample_weight: np.ndarray | None = None) -> tuple[Classifier, dict]:
    """Fine-tune the whole model, drawing images by ``sample_weight`` (default: class-balanced)."""
    retrained, losses = weighted_fit(copy.deepcopy(model), config, image_ids, sample_weight, config.retrain.epochs,
                                     config.retrain.lr, device, size, progress)
    return retrained, {"train_loss": losses}


def fresh_model(config: RunConfig, num_classes: int, image_ids: list[int], weights: np.ndarray,
                device: torch.device, size: int, progress: bool) -> tuple[Classifier, list[float]]:
    """A new model, trained with the reference recipe (architecture, start weights, epochs, lr) under ``weights``.

    Only the sampling differs from the reference run, so whatever changes is the data's balance.
    """
    model = build_model(config.train.arch, num_classes, imagenet=config.train.pretrained)
    if config.train.weights:
        load_weights(model, config.train.weights)
    return weighted_fit(model, config, image_ids, weights, config.train.epochs, config.train.lr, device, size,
                        progress)


def retrain_fresh(arrays: dict[str, np.ndarray], scores: np.ndarray, config: RunConfig, device: torch.device,
                  size: int, progress: bool) -> tuple[Classifier, dict]:
    """Every training image, drawn so each class and each cell of its shortcut space count the same.

    Uses all images rather than the curated subset: the cells say how to balance, and a network trained from
    the start needs the data volume (the default subset is a tenth of it) to learn the core feature.
    """
    cells = spurious_space_cells(arrays, scores, config.curate.seed)
    weights = cell_balanced_weights(arrays["y"], cells)
    model, losses = fresh_model(config, len(arrays["class_names"]), [int(i) for i in arrays["index"]], weights,
                                device, size, progress)
    return model, {"train_loss": losses, "cells": int(cells.max()) + 1, "images": len(weights)}


def retrain_run(run: Run, config: RunConfig, progress: bool = True) -> dict:
    """Retrain by ``config.retrain.mode`` from curate's outputs; writes ``slim_model.pt`` and ``metrics.json["slim"]``."""
    mode = config.retrain.mode
    if mode not in RETRAIN_MODES:
        raise PipelineError(f"unknown --mode {mode!r}; choose {', '.join(RETRAIN_MODES)}")
    curated = run.load_csv(run.curated_path, "curate --run RUN")
    arrays = run.load_arrays(run.attention_path, "embed --run RUN")
    model, meta = load_checkpoint(run.checkpoint_path)
    image_ids = [int(r["image_id"]) for r in curated]
    row_of = {int(i): r for r, i in enumerate(arrays["index"])}
    rows = np.array([row_of[i] for i in image_ids])
    device = resolve_device(config.device)
    seed_everything(config.retrain.seed)
    if mode == "last-layer":
        retrained, details = retrain_last_layer(model, arrays["features"][rows], arrays["y"][rows],
                                                config.retrain.seed)
    elif mode == "full":
        retrained, details = retrain_full(model, run, config, image_ids, device, meta["image_size"], progress)
    else:
        scores = run.load_arrays(run.propagation_path, "curate --run RUN")["score"]
        retrained, details = retrain_fresh(arrays, scores, config, device, meta["image_size"], progress)
    save_checkpoint(retrained, run.slim_checkpoint_path, {**meta, "mode": mode, **details,
                                                          "subset_size": len(image_ids)})
    run.save_config(config)
    image_set = load_dataset(config.data.root)
    results = evaluate_splits(retrained.to(device), image_set, meta["image_size"], config, device, progress)
    metrics = run.load_metrics()
    metrics["slim"] = {**results.get("test", {}), "val": results.get("val"), "mode": mode,
                       "subset_size": len(image_ids), **details}
    atomic_write_json(run.metrics_path, metrics)
    for name, split_metrics in results.items():
        print(format_metrics(f"SLIM ({mode}) {name}", split_metrics))
    return metrics["slim"]
