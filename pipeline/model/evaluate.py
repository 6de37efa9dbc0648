"""Per-group accuracy, worst-group accuracy and the mean beside it.

Groups are class x place where the dataset has ``place`` (Waterbirds' convention), else the class alone.
``mean_acc`` follows the Waterbirds literature (GroupDRO, DFR, SLIM): group accuracies weighted by the training
split's group proportions, i.e. accuracy on the training distribution. ``avg_acc`` is the plain accuracy over
the evaluated split; both are reported so neither hides the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.core.config import RunConfig
from pipeline.core.data import TEST, TRAIN, VAL, ImageSet, Sample
from pipeline.model.loaders import make_loader
from pipeline.model.networks import Classifier


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device, desc: str = "predict",
            progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N, C) and dataset indices (N,) in loader order."""
    model.eval()
    probs, indices = [], []
    for images, _, index, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images.to(device, non_blocking=True))
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        indices.append(index.numpy())
    return np.concatenate(probs), np.concatenate(indices)


def group_metrics(image_set: ImageSet, samples: Sequence[Sample], predictions: np.ndarray) -> dict:
    """Accuracy per group, worst group, train-weighted mean and plain average for ``samples``."""
    labels = np.array([s.y for s in samples])
    groups = np.array([image_set.group_of(s) for s in samples])
    correct = predictions == labels
    train_counts = np.bincount([image_set.group_of(s) for s in image_set.split(TRAIN)],
                               minlength=image_set.num_groups)
    per_group, weighted, weight = {}, 0.0, 0.0
    for g in range(image_set.num_groups):
        members = groups == g
        if not members.any():
            continue
        acc = float(correct[members].mean())
        per_group[image_set.group_name(g)] = {"acc": acc, "n": int(members.sum())}
        weighted += acc * train_counts[g]
        weight += train_counts[g]
    accs = [v["acc"] for v in per_group.values()]
    return {
        "worst_group_acc": min(accs),
        "mean_acc": float(weighted / weight) if weight else float(correct.mean()),
        "avg_acc": float(correct.mean()),
        "per_group": per_group,
        "n": len(samples),
    }


def format_metrics(name: str, metrics: dict) -> str:
    """A few human-readable lines for the terminal."""
    headline = (f"{name}: worst-group {metrics['worst_group_acc']:.1%}  mean {metrics['mean_acc']:.1%}  "
                f"average {metrics['avg_acc']:.1%}  (n={metrics['n']})")
    lines = [headline]
    for group, value in metrics["per_group"].items():
        lines.append(f"    {group:<24} {value['acc']:.1%}  (n={value['n']})")
    return "\n".join(lines)


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
