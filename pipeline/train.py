"""SLIM step 1: the ERM reference model, trained on the training split and evaluated per group."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.config import RunConfig, fingerprint
from pipeline.data import TEST, TRAIN, VAL, ImageDataset, ImageSet, Sample, load_dataset, resolve_image_size
from pipeline.evaluate import format_metrics, group_metrics, predict
from pipeline.models import Classifier, build_model, load_weights, resolve_device, save_checkpoint
from pipeline.run import Run, atomic_write_json


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(image_set: ImageSet, samples: Sequence[Sample], size: int, batch_size: int, workers: int,
                shuffle: bool = False, with_masks: bool = False, seed: int = 0, sampler=None,
                core_only: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        ImageDataset(image_set, samples, size, with_masks=with_masks, core_only=core_only), batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler, num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        generator=None if sampler is not None else generator,
    )


def fit(model: Classifier, loader: DataLoader, epochs: int, lr: float, weight_decay: float,
        device: torch.device, progress: bool = True) -> list[float]:
    """Plain ERM: SGD with momentum, cosine schedule, horizontal flips; bf16 autocast on CUDA.

    Returns the mean training loss per epoch.
    """
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps = max(1, epochs * len(loader))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
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


def evaluate_splits(model: Classifier, image_set: ImageSet, size: int, config: RunConfig, device: torch.device,
                    progress: bool = True) -> dict:
    """Per-group metrics on val and test (those with images)."""
    results = {}
    for split, name in ((VAL, "val"), (TEST, "test")):
        samples = image_set.split(split)
        if not samples:
            continue
        loader = make_loader(image_set, samples, size, config.embed.batch_size, config.data.workers)
        probs, _ = predict(model, loader, device, desc=f"eval {name}", progress=progress)
        results[name] = group_metrics(image_set, samples, probs.argmax(1))
    return results


def train_reference(run: Run, config: RunConfig, force: bool = False, progress: bool = True) -> dict:
    """Train (or reuse) the ERM reference model of ``run``; returns the metrics it wrote."""
    image_set = load_dataset(config.data.root)
    size = resolve_image_size(image_set, config.data.image_size)
    stamp = fingerprint("train", image_set.fingerprint(), config.data, config.train)
    run.root.mkdir(parents=True, exist_ok=True)
    run.save_config(config)
    if not force and run.is_done("train", stamp, [run.checkpoint_path, run.metrics_path]):
        metrics = run.load_metrics()
        print(f"train: reusing {run.checkpoint_path} (same data and settings; --force retrains)")
        return metrics
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
    atomic_write_json(run.metrics_path, metrics)
    run.mark_done("train", stamp)
    for name, split_metrics in results.items():
        print(format_metrics(f"ERM {name}", split_metrics))
    return metrics
