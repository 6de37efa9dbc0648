"""SLIM step 1: the ERM reference model, trained on the training split and evaluated per group."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.core.config import RunConfig, fingerprint
from pipeline.core.data import TRAIN, load_dataset, resolve_image_size
from pipeline.core.io import atomic_write_json
from pipeline.core.run import Run
from pipeline.model.evaluate import evaluate_splits, format_metrics
from pipeline.model.loaders import make_loader, seed_everything
from pipeline.model.networks import Classifier, build_model, load_weights, resolve_device, save_checkpoint

log = logging.getLogger(__name__)
MOMENTUM = 0.9  # SGD with Nesterov momentum 0.9: the standard ResNet recipe the Waterbirds baselines use


def fit(model: Classifier, loader: DataLoader, epochs: int, lr: float, weight_decay: float,
        device: torch.device, progress: bool = True) -> list[float]:
    """Plain ERM: SGD with momentum, cosine schedule, horizontal flips; bf16 autocast on CUDA.

    Returns the mean training loss per epoch.
    """
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=weight_decay,
                                nesterov=True)
    steps = max(1, epochs * len(loader))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)  # stepped once per batch
    losses = []
    bar = tqdm(total=steps, desc="train", disable=not progress, unit="batch")
    for epoch in range(epochs):
        total, count = 0.0, 0
        for images, labels, _, _ in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            flip = torch.rand(images.shape[0], device=device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * labels.shape[0]
            count += labels.shape[0]
            bar.update(1)
        losses.append(total / count)
        bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
    bar.close()
    return losses


def train_reference(run: Run, config: RunConfig, force: bool = False, progress: bool = True) -> dict:
    """Train (or reuse) the ERM reference model of ``run``; returns the metrics it wrote."""
    image_set = load_dataset(config.data.root)
    size = resolve_image_size(image_set, config.data.image_size)
    stamp = fingerprint("train", image_set.fingerprint(), config.data, config.train)
    run.root.mkdir(parents=True, exist_ok=True)
    run.save_config(config)
    if not force and run.is_done("train", stamp, [run.checkpoint_path, run.metrics_path]):
        log.info("reusing %s (same data and settings; --force retrains)", run.checkpoint_path)
        return run.load_metrics()
    device = resolve_device(config.device)
    seed_everything(config.train.seed)
    model = build_model(config.train.arch, image_set.num_classes, imagenet=config.train.pretrained)
    if config.train.weights:
        load_weights(model, config.train.weights)
    loader = make_loader(image_set, image_set.split(TRAIN), size, config.train.batch_size, config.data.workers,
                         shuffle=True, seed=config.train.seed)
    losses = fit(model, loader, config.train.epochs, config.train.lr, config.train.weight_decay, device, progress)
    meta = {"arch": config.train.arch, "num_classes": image_set.num_classes, "image_size": size,
            "class_names": image_set.class_names, "fingerprint": stamp}
    save_checkpoint(model.cpu(), run.checkpoint_path, meta)
    results = evaluate_splits(model.to(device), image_set, size, config, device, progress)
    # headline numbers are the test split's; val sits beside them
    metrics = {"erm": {**results.get("test", {}), "val": results.get("val"), "train_loss": losses}}
    atomic_write_json(run.metrics_path, metrics)  # a new reference model starts the run's metrics afresh
    run.mark_done("train", stamp)
    for name, split_metrics in results.items():
        log.info(format_metrics(f"ERM {name}", split_metrics))
    return metrics
