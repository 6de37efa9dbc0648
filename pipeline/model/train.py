"""SLIM step 1: the ERM reference model, trained on the training split and evaluated per group.

:func:`fit` is also what ``retrain`` (fresh and full modes) trains with. Given a :class:`Resume`, it writes an
epoch checkpoint after every epoch (model, optimizer, learning-rate schedule and every random state the rest
of training draws from) and, when started again after a kill, continues from it: the final weights equal an
undisturbed run's bit for bit on CPU, because the resumed epochs see the same states in the same order.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.core.config import RunConfig, fingerprint
from pipeline.core.data import TRAIN, ImageSet, load_dataset, resolve_image_size
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write, atomic_write_json
from pipeline.core.run import Run
from pipeline.model import distributed
from pipeline.model.evaluate import evaluate_splits, format_metrics
from pipeline.model.loaders import make_loader, seed_everything
from pipeline.model.networks import Classifier, build_model, load_weights, resolve_device, save_checkpoint

log = logging.getLogger(__name__)
MOMENTUM = 0.9  # SGD with Nesterov momentum 0.9: the standard ResNet recipe the Waterbirds baselines use


@dataclass(frozen=True)
class Resume:
    """Where :func:`fit` keeps its epoch checkpoint, and the key a checkpoint must carry to be resumed.

    The key is the stage's fingerprint and the device type (CUDA autocasts to bf16, so it trains a different
    model): a checkpoint of other settings is never resumed, only overwritten.
    """

    path: Path
    key: str

    def refined(self, *parts: Any) -> Resume:
        """The same place, keyed also by ``parts`` (inputs the stage fingerprint does not cover)."""
        return Resume(self.path, fingerprint(self.key, *parts))


def _generators(loader: DataLoader) -> list[torch.Generator]:
    """The loader's own random generators: its seed source and its sampler's (the same object for shuffling)."""
    found: list[torch.Generator] = []
    for generator in (loader.generator, getattr(loader.sampler, "generator", None)):
        if generator is not None and all(generator is not g for g in found):
            found.append(generator)
    return found


def rng_state(loader: DataLoader) -> dict:
    """Every random state an epoch draws from: torch (CPU, CUDA: flips, seeds), NumPy, Python, the loader's."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, keys.tolist(), position, has_gauss, gauss], "python": random.getstate(),
            "loader": [g.get_state() for g in _generators(loader)]}


def restore_rng_state(state: dict, loader: DataLoader) -> None:
    """Put back what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and len(state["cuda"]) == torch.cuda.device_count():  # the same GPUs: the key has the device
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    for generator, saved in zip(_generators(loader), state["loader"], strict=True):
        generator.set_state(saved)


def load_epoch_checkpoint(resume: Resume) -> dict | None:
    """The checkpoint to continue from, or ``None``: absent, of other settings, or torn (then it is removed)."""
    if not resume.path.exists():
        return None
    try:
        state = torch.load(resume.path, map_location="cpu", weights_only=True)
        key = state["key"]
    except Exception as exc:  # noqa: BLE001 - a torn file fails in torch, zipfile or pickle alike; it is a cache
        log.warning("discarding the unreadable epoch checkpoint %s (%s); starting over", resume.path,
                    exc.__class__.__name__)
        resume.path.unlink(missing_ok=True)
        return None
    if key != resume.key:
        log.info("ignoring %s: it was written with other settings", resume.path)
        return None
    return state


def fit(model: Classifier, loader: DataLoader, epochs: int, lr: float, weight_decay: float,
        device: torch.device, progress: bool = True, resume: Resume | None = None) -> list[float]:
    """Plain ERM: SGD with momentum, cosine schedule, horizontal flips; bf16 autocast on CUDA.

    With ``resume``, continues from its epoch checkpoint when there is one and writes one after every epoch;
    the caller removes it once the trained model is saved. Returns the mean training loss per epoch.

    Under torchrun the model is wrapped in DistributedDataParallel and ``loader`` gives each rank its share
    (:func:`pipeline.model.loaders.make_loader`): every rank ends with the same weights. All ranks hold the same
    random states (same seeds, same global draws), so rank 0's epoch checkpoint resumes any of them.
    """
    world = distributed.current()
    model.to(device).train()
    network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world.distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=weight_decay,
                                nesterov=True)
    steps = max(1, epochs * len(loader))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)  # stepped once per batch
    losses: list[float] = []
    state = load_epoch_checkpoint(resume) if resume else None
    if state is not None:
        losses = list(state["losses"])
        if 0 < len(losses) < epochs and loader.persistent_workers:
            iter(loader)  # an undisturbed run made its workers (one seed draw) in epoch 0, not now: draw first
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        restore_rng_state(state["rng"], loader)
        log.info("resuming from %s after epoch %d of %d", resume.path, len(losses), epochs)
    bar = tqdm(total=steps, initial=len(losses) * len(loader), desc="train", disable=not progress or not world.is_main,
               unit="batch")
    for epoch in range(len(losses), epochs):
        total, count = 0.0, 0
        for batch in loader:
            bar.update(1)
            # no image of this batch could be read (make_loader's training mode); ranks skip a step together
            if distributed.any_rank(batch is None):
                continue
            images, labels, _, _ = batch
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            flip = torch.rand(images.shape[0], device=device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = torch.nn.functional.cross_entropy(network(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * labels.shape[0]
            count += labels.shape[0]
        total, count, draws = distributed.summed(total, count, len(loader.sampler))
        if draws > count:
            log.warning("epoch %d: %d of %d image draws skipped as unreadable (named above); replace or remove "
                        "those files", epoch + 1, draws - count, draws)
        if count == 0:
            raise PipelineError("no training image could be read; check the dataset folder")
        losses.append(total / count)
        bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
        if resume and world.is_main:
            save_epoch_checkpoint(resume, model, optimizer, schedule, loader, losses)
    bar.close()
    return losses


def save_epoch_checkpoint(resume: Resume, model: Classifier, optimizer: torch.optim.Optimizer,
                          schedule: torch.optim.lr_scheduler.LRScheduler, loader: DataLoader,
                          losses: list[float]) -> None:
    """Everything the next epoch needs, atomically: a kill while writing keeps the previous epoch's."""
    state = {"key": resume.key, "losses": losses, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "schedule": schedule.state_dict(), "rng": rng_state(loader)}
    atomic_write(resume.path, lambda handle: torch.save(state, handle))


def train_reference(run: Run, config: RunConfig, force: bool = False, progress: bool = True) -> dict:
    """Train (or reuse) the ERM reference model of ``run``; returns the metrics it wrote.

    A run killed during training resumes from its last finished epoch (``.resume/train.pt``). Under torchrun
    every rank trains (DDP) and rank 0 alone saves, evaluates and writes; the others then read its metrics.
    """
    with distributed.main_first():  # rank 0 checks the dataset and writes the manifest; the rest trust it
        image_set = load_dataset(config.data.root, run.manifest_path)
    size = resolve_image_size(image_set, config.data.image_size)
    stamp = fingerprint("train", image_set.fingerprint(), config.data, config.train)
    distributed.on_main(lambda: run.save_config(config))
    if not force and run.is_done("train", stamp, [run.checkpoint_path, run.metrics_path]):
        log.info("reusing %s (same data and settings; --force retrains)", run.checkpoint_path)
        distributed.on_main(lambda: run.discard_resume("train"))
        return run.load_metrics()
    device = resolve_device(config.device)
    seed_everything(config.train.seed)
    model = build_model(config.train.arch, image_set.num_classes, imagenet=config.train.pretrained)
    if config.train.weights:
        load_weights(model, config.train.weights)
    loader = make_loader(image_set, image_set.split(TRAIN), size, config.train.batch_size, config.data.workers,
                         shuffle=True, seed=config.train.seed, training=True)
    resume = Resume(run.resume_path("train"), fingerprint(stamp, distributed.placement(device)))
    losses = fit(model, loader, config.train.epochs, config.train.lr, config.train.weight_decay, device, progress,
                 resume)
    meta = {"arch": config.train.arch, "num_classes": image_set.num_classes, "image_size": size,
            "class_names": image_set.class_names, "fingerprint": stamp}
    distributed.on_main(lambda: _save_reference(run, model, meta, image_set, config, device, losses, progress))
    return run.load_metrics()


def _save_reference(run: Run, model: Classifier, meta: dict, image_set: ImageSet, config: RunConfig,
                    device: torch.device, losses: list[float], progress: bool) -> None:
    """Save the trained reference model, evaluate it on every split and start the run's metrics afresh."""
    save_checkpoint(model.cpu(), run.checkpoint_path, meta)
    results = evaluate_splits(model.to(device), image_set, meta["image_size"], config, device, progress)
    # headline numbers are the test split's; val sits beside them
    metrics = {"erm": {**results.get("test", {}), "val": results.get("val"), "train_loss": losses}}
    atomic_write_json(run.metrics_path, metrics)  # a new reference model starts the run's metrics afresh
    run.mark_done("train", meta["fingerprint"])
    run.discard_resume("train")
    for name, split_metrics in results.items():
        log.info(format_metrics(f"ERM {name}", split_metrics))
