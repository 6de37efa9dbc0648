"""SLIM step 8: retrain on the curated subset.

``last-layer`` (DFR-style): class-balanced logistic regression on the reference model's frozen pooled
features of the subset; the regularisation strength is chosen on a held-out fifth of the subset (never on
validation groups), then the model is refit on the whole subset and written back as the linear head, so
the retrained model is an ordinary checkpoint whose GradCAM is still closed-form. ``full``: fine-tune the
whole reference model on the subset with class-balanced sampling.
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
from pipeline.data import load_dataset
from pipeline.errors import PipelineError
from pipeline.evaluate import format_metrics
from pipeline.models import Classifier, load_checkpoint, resolve_device, save_checkpoint
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


def retrain_full(model: Classifier, run: Run, config: RunConfig, image_ids: list[int], device: torch.device,
                 size: int, progress: bool) -> tuple[Classifier, dict]:
    image_set = load_dataset(config.data.root)
    samples = [image_set.samples[i] for i in image_ids]
    labels = np.array([s.y for s in samples])
    weights = 1.0 / np.bincount(labels)[labels]
    generator = torch.Generator().manual_seed(config.retrain.seed)
    sampler = WeightedRandomSampler(torch.from_numpy(weights), num_samples=len(samples), replacement=True,
                                    generator=generator)
    loader = make_loader(image_set, samples, size, config.train.batch_size, config.data.workers, sampler=sampler)
    retrained = copy.deepcopy(model)
    losses = fit(retrained, loader, config.retrain.epochs, config.retrain.lr, config.train.weight_decay, device,
                 progress)
    return retrained.cpu().eval(), {"train_loss": losses}


def retrain_run(run: Run, config: RunConfig, progress: bool = True) -> dict:
    """Retrain on ``curated.csv``; writes ``slim_model.pt`` and ``metrics.json['slim']``."""
    mode = config.retrain.mode
    if mode not in RETRAIN_MODES:
        raise PipelineError(f"unknown --mode {mode!r}; choose last-layer or full")
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
    else:
        retrained, details = retrain_full(model, run, config, image_ids, device, meta["image_size"], progress)
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
