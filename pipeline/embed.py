"""SLIM steps 2-3: the attention stage over the training split.

For every training image, in one streamed pass: GradCAM w.r.t. the true class, the attention-weighted
feature vector ``f = mean_ij A[:, i, j] * m[i, j]`` and the reverse vector ``f_rev = mean_ij A * (1 - m)``
(the mean instead of SLIM's sum only rescales by the constant h*w), the pooled features a last-layer retrain
needs, prediction / confidence / entropy, and AIoU where masks exist. Memory holds only the per-image vectors
and low-resolution maps; full-resolution maps live one batch at a time. A 2-D embedding of f and f_rev
(UMAP, or PCA) is computed at the end for clustering and plots.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from tqdm import tqdm

from pipeline.cam import AttentionBatch, AttentionExtractor, make_extractor, upsample_cams
from pipeline.config import PRECISIONS, RunConfig, fingerprint
from pipeline.data import TRAIN, load_dataset
from pipeline.errors import PipelineError
from pipeline.models import load_checkpoint, native_bf16, resolve_device
from pipeline.run import Run
from pipeline.train import make_loader


def attention_vectors(batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model looked at (f) and what it ignored (f_rev), from activations and [0, 1] maps.

    ``f_rev = mean(A * (1 - m)) = mean(A) - f``: one product over the activations instead of two.
    """
    attended = torch.einsum("bkhw,bhw->bk", batch.activations, batch.cams) / batch.cams[0].numel()
    return attended, batch.features - attended


def aiou(full_cams: torch.Tensor, masks: torch.Tensor, threshold: float) -> torch.Tensor:
    """Share of high attention (CAM >= threshold) that lies on the object: 1.0 = all of it."""
    hot = full_cams * (full_cams >= threshold)
    total = hot.flatten(1).sum(1)
    inside = (hot * masks).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))


def entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)


def embed_2d(vectors: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D coordinates of L2-normalised vectors. UMAP needs a few dozen points; fewer fall back to PCA."""
    from sklearn.decomposition import PCA

    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    if method == "umap" and len(unit) >= 30:
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=seed)
        with warnings.catch_warnings():  # "n_jobs overridden by random_state": determinism is the point
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            return reducer.fit_transform(unit).astype(np.float32)
    components = min(2, *unit.shape)
    coords = PCA(n_components=components, random_state=seed).fit_transform(unit)
    return np.pad(coords, ((0, 0), (0, 2 - components))).astype(np.float32)


def compute_attention(extractor: AttentionExtractor, loader, device: torch.device, threshold: float,
                      image_size: int, progress: bool = True) -> dict[str, np.ndarray]:
    """Stream ``loader`` through ``extractor``; returns one row per image (loader order)."""
    n = len(loader.dataset)
    out: dict[str, np.ndarray] = {}
    row = 0
    for images, labels, index, masks in tqdm(loader, desc="embed", disable=not progress, unit="batch"):
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        batch = extractor(images, labels)
        attended, ignored = attention_vectors(batch)
        probs = torch.softmax(batch.logits, dim=1)
        values = {
            "index": index.numpy(),
            "y": labels.cpu().numpy(),
            "pred": probs.argmax(1).cpu().numpy(),
            "confidence": probs.max(1).values.cpu().numpy(),
            "entropy": entropy(probs).cpu().numpy(),
            "features": batch.features.cpu().numpy(),
            "f_att": attended.cpu().numpy(),
            "f_rev": ignored.cpu().numpy(),
            "cam": batch.cams.cpu().numpy().astype(np.float16),
        }
        if masks.numel():
            full = upsample_cams(batch.cams, image_size)
            values["aiou"] = aiou(full, masks.to(device).float(), threshold).cpu().numpy()
        if not out:  # allocate once, from the first batch's shapes: memory is fixed by n, not by the data
            out = {key: np.empty((n, *v.shape[1:]), dtype=v.dtype) for key, v in values.items()}
        for key, value in values.items():
            out[key][row:row + len(value)] = value
        row += len(index)
    return out


def embed_run(run: Run, config: RunConfig, force: bool = False, progress: bool = True) -> dict[str, np.ndarray]:
    """Compute (or reuse) ``attention.npz`` for the run's training split."""
    run.require(run.checkpoint_path, "train --data DIR --run RUN")
    if config.embed.precision not in PRECISIONS:
        raise PipelineError(f"unknown --precision {config.embed.precision!r}; choose {', '.join(PRECISIONS)}")
    if not 0.0 < config.embed.threshold <= 1.0:
        raise PipelineError(f"--threshold must be in (0, 1], got {config.embed.threshold}")
    image_set = load_dataset(config.data.root)
    model, meta = load_checkpoint(run.checkpoint_path)
    stamp = fingerprint("embed", meta["fingerprint"], image_set.fingerprint(), config.embed)
    run.save_config(config)
    if not force and run.is_done("embed", stamp, [run.attention_path]):
        print(f"embed: reusing {run.attention_path} (same model and settings; --force recomputes)")
        return run.load_arrays(run.attention_path, "embed")
    device = resolve_device(config.device)
    loader = make_loader(image_set, image_set.split(TRAIN), meta["image_size"], config.embed.batch_size,
                         config.data.workers, with_masks=True)
    bf16 = config.embed.precision == "bf16" or (config.embed.precision == "auto" and native_bf16(device))
    extractor = make_extractor(model.to(device), config.embed.cam, bf16=bf16)
    arrays = compute_attention(extractor, loader, device, config.embed.threshold, meta["image_size"], progress)
    arrays["emb_att"] = embed_2d(arrays["f_att"], config.embed.embedding, config.embed.seed)
    arrays["emb_rev"] = embed_2d(arrays["f_rev"], config.embed.embedding, config.embed.seed)
    arrays["class_names"] = np.array(meta["class_names"])
    run.save_arrays(run.attention_path, arrays)
    run.mark_done("embed", stamp)
    _print_summary(arrays)
    return arrays


def _print_summary(arrays: dict[str, np.ndarray]) -> None:
    accuracy = float((arrays["pred"] == arrays["y"]).mean())
    line = f"embed: {len(arrays['y'])} training images, train accuracy {accuracy:.1%}, " \
           f"attention map {arrays['cam'].shape[1]}x{arrays['cam'].shape[2]}"
    if "aiou" in arrays:
        line += f", mean AIoU {float(arrays['aiou'].mean()):.2f}"
    print(line)
