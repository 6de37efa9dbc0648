"""SLIM steps 2-3: the attention stage over the training split.

For every training image, in one streamed pass: GradCAM w.r.t. the true class, the attention-weighted
feature vector ``f`` and the reverse vector ``f_rev`` (:mod:`pipeline.model.attention`), the pooled features a last-layer retrain
needs, prediction / confidence / entropy, and AIoU where masks exist. Memory holds only the per-image vectors
and low-resolution maps; full-resolution maps live one batch at a time. A 2-D embedding of f and f_rev
(UMAP, or PCA) is computed at the end for clustering and plots.

The pass keeps its finished shards under ``.resume/embed/`` (:class:`~pipeline.model.attention.AttentionShards`):
re-run after a kill, it loads them and continues with the next image. The 2-D embedding is computed over all
rows at the end, so ``attention.npz`` equals an undisturbed run's.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from itertools import chain

import numpy as np
import torch

from pipeline.core.config import PRECISIONS, RunConfig, fingerprint
from pipeline.core.data import TRAIN, ImageSet, load_dataset
from pipeline.core.errors import PipelineError
from pipeline.core.io import file_digest
from pipeline.core.run import Run
from pipeline.model.attention import (
    AttentionArrays,
    AttentionShards,
    attention_batches,
    shard_rows,
    stack_rows,
    unit_rows,
)
from pipeline.model.cam import AttentionExtractor, make_extractor
from pipeline.model.loaders import make_loader
from pipeline.model.networks import load_checkpoint, native_bf16, resolve_device

log = logging.getLogger(__name__)
UMAP_MIN_POINTS = 30  # UMAP's default 15 neighbours need a few dozen points to give a stable layout


def embed_2d(vectors: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D coordinates of L2-normalised vectors; below ``UMAP_MIN_POINTS`` rows UMAP falls back to PCA."""
    from sklearn.decomposition import PCA

    unit = unit_rows(vectors)
    if method == "umap" and len(unit) >= UMAP_MIN_POINTS:
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=seed)
        with warnings.catch_warnings():  # "n_jobs overridden by random_state": determinism is the point
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            return reducer.fit_transform(unit).astype(np.float32)
    components = min(2, *unit.shape)
    coords = PCA(n_components=components, random_state=seed).fit_transform(unit)
    return np.pad(coords, ((0, 0), (0, 2 - components))).astype(np.float32)


def embed_run(run: Run, config: RunConfig, force: bool = False, progress: bool = True) -> AttentionArrays:
    """Compute (or reuse) ``attention.npz`` for the run's training split."""
    run.require(run.checkpoint_path, "train --data DIR --run RUN")
    if config.embed.precision not in PRECISIONS:
        raise PipelineError(f"unknown --precision {config.embed.precision!r}; choose {', '.join(PRECISIONS)}")
    if not 0.0 < config.embed.threshold <= 1.0:
        raise PipelineError(f"--threshold must be in (0, 1], got {config.embed.threshold}")
    image_set = load_dataset(config.data.root, run.manifest_path)
    model, meta = load_checkpoint(run.checkpoint_path)
    stamp = fingerprint("embed", meta["fingerprint"], image_set.fingerprint(), config.embed)
    run.save_config(config)
    if not force and run.is_done("embed", stamp, [run.attention_path]):
        log.info("reusing %s (same model and settings; --force recomputes)", run.attention_path)
        run.discard_resume("embed")
        return AttentionArrays.load(run.attention_path)
    device = resolve_device(config.device)
    bf16 = config.embed.precision == "bf16" or (config.embed.precision == "auto" and native_bf16(device))
    extractor = make_extractor(model.to(device), config.embed.cam, bf16=bf16)
    shards = AttentionShards(run.shard_dir("embed"),
                             fingerprint(stamp, file_digest(run.checkpoint_path), device.type, bf16),
                             shard_rows(len(image_set.split(TRAIN)), config.embed.batch_size))
    streamed = resumable_pass(extractor, image_set, shards, config, device, meta["image_size"], progress)
    arrays = dataclasses.replace(
        streamed, class_names=tuple(meta["class_names"]),
        emb_att=embed_2d(streamed.f_att, config.embed.embedding, config.embed.seed),
        emb_rev=embed_2d(streamed.f_rev, config.embed.embedding, config.embed.seed))
    arrays.save(run.attention_path)
    run.mark_done("embed", stamp)
    run.discard_resume("embed")
    _log_summary(arrays)
    return arrays


def resumable_pass(extractor: AttentionExtractor, image_set: ImageSet, shards: AttentionShards, config: RunConfig,
                   device: torch.device, size: int, progress: bool) -> AttentionArrays:
    """The attention pass over the training split, continuing after the whole shards a killed pass left.

    Shards hold whole batches, so the pass restarts on a batch boundary of the undisturbed one and computes
    the very same batches.
    """
    samples = image_set.split(TRAIN)
    shards.remove_stale()
    done = shards.completed(np.array([s.index for s in samples]))
    if done:
        log.info("resuming after %d finished shards (%d of %d images) in %s", done,
                 min(done * shards.rows, len(samples)), len(samples), shards.folder)
    loader = make_loader(image_set, samples[done * shards.rows:], size, config.embed.batch_size,
                         config.data.workers, with_masks=True)
    fresh = attention_batches(extractor, loader, device, config.embed.threshold, size, progress)
    return stack_rows(chain(shards.loaded(done), shards.written(fresh, done)), len(samples))


def _log_summary(arrays: AttentionArrays) -> None:
    accuracy = float((arrays.pred == arrays.y).mean())
    line = f"{len(arrays)} training images, train accuracy {accuracy:.1%}, " \
           f"attention map {arrays.cam.shape[1]}x{arrays.cam.shape[2]}"
    if arrays.aiou is not None:
        line += f", mean AIoU {float(arrays.aiou.mean()):.2f}"
    log.info(line)
