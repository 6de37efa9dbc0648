"""SLIM steps 2-3: the attention stage over the training split.

For every training image, in one streamed pass: GradCAM w.r.t. the true class, the attention-weighted
feature vector ``f`` and the reverse vector ``f_rev`` (:mod:`pipeline.model.attention`), the pooled features a last-layer retrain
needs, prediction / confidence / entropy, and AIoU where masks exist. Memory holds only the per-image vectors
and low-resolution maps; full-resolution maps live one batch at a time. A 2-D embedding of f and f_rev
(UMAP, or PCA) is computed at the end for clustering and plots.

The pass keeps its finished shards under ``.resume/embed/`` (:class:`~pipeline.model.attention.AttentionShards`):
re-run after a kill, it continues with the next image. ``attention.npz`` is then written from the shards one
field at a time and the 2-D embedding computed from them (fit on at most ``EMBED_FIT_ROWS`` rows), so memory
does not grow with the number of images, and the file equals an undisturbed run's.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

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
    save_streamed,
    shard_rows,
    unit_rows,
)
from pipeline.model.cam import AttentionExtractor, make_extractor
from pipeline.model.loaders import make_loader
from pipeline.model.networks import load_checkpoint, native_bf16, resolve_device

log = logging.getLogger(__name__)
UMAP_MIN_POINTS = 30  # UMAP's default 15 neighbours need a few dozen points to give a stable layout
# The 2-D embedding is fit on at most this many rows and applied to the rest shard by shard: a layout for
# clustering and plots needs no more, and UMAP over a million rows would need tens of GB. Every run so far is
# smaller, so its embedding is fit on all rows, as before.
EMBED_FIT_ROWS = 50_000


def embed_2d(vectors: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D coordinates of L2-normalised vectors; below ``UMAP_MIN_POINTS`` rows UMAP falls back to PCA."""
    reducer = _reducer(method, seed, *vectors.shape)
    with _deterministic_umap_quietly():
        coords = reducer.fit_transform(unit_rows(vectors))
    return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1]))).astype(np.float32)


@contextmanager
def _deterministic_umap_quietly() -> Iterator[None]:
    """Silence UMAP's "n_jobs overridden by random_state": determinism is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        yield


def _reducer(method: str, seed: int, rows: int, dims: int):
    """UMAP (with enough rows for its neighbourhoods) or PCA, to two components where the data has them."""
    if method == "umap" and rows >= UMAP_MIN_POINTS:
        import umap

        return umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=seed)
    from sklearn.decomposition import PCA

    return PCA(n_components=min(2, rows, dims), random_state=seed)


def embed_2d_streamed(column: Callable[[], Iterable[np.ndarray]], rows: int, method: str, seed: int) -> np.ndarray:
    """:func:`embed_2d` of the rows ``column()`` yields in parts; above ``EMBED_FIT_ROWS`` rows, fit on an even
    random sample of them and applied to every part."""
    if rows <= EMBED_FIT_ROWS:
        return embed_2d(np.concatenate(list(column())), method, seed)
    chosen = np.sort(np.random.default_rng(seed).choice(rows, EMBED_FIT_ROWS, replace=False))
    sample, start = [], 0
    for part in column():
        inside = chosen[(chosen >= start) & (chosen < start + len(part))]
        sample.append(part[inside - start])
        start += len(part)
    fitted = np.concatenate(sample)
    reducer = _reducer(method, seed, *fitted.shape)
    with _deterministic_umap_quietly():
        reducer.fit(unit_rows(fitted))
        return np.concatenate([reducer.transform(unit_rows(part)) for part in column()]).astype(np.float32)


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
    count = resumable_pass(extractor, image_set, shards, config, device, meta["image_size"], progress)
    rows = len(image_set.split(TRAIN))
    whole = {"class_names": np.array(meta["class_names"]),
             **{f"emb_{side}": embed_2d_streamed(lambda side=side: shards.column(count, f"f_{side}"), rows,
                                                 config.embed.embedding, config.embed.seed)
                for side in ("att", "rev")}}
    save_streamed(run.attention_path, lambda key: shards.column(count, key), shards.load(0), rows, whole)
    arrays = AttentionArrays.load(run.attention_path)
    run.mark_done("embed", stamp)
    run.discard_resume("embed")
    _log_summary(arrays)
    return arrays


def resumable_pass(extractor: AttentionExtractor, image_set: ImageSet, shards: AttentionShards, config: RunConfig,
                   device: torch.device, size: int, progress: bool) -> int:
    """The attention pass over the training split, continuing after the whole shards a killed pass left;
    returns the number of shards, which together hold every training image in order.

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
    return shards.write(attention_batches(extractor, loader, device, config.embed.threshold, size, progress), done)


def _log_summary(arrays: AttentionArrays) -> None:
    accuracy = float((arrays.pred == arrays.y).mean())
    line = f"{len(arrays)} training images, train accuracy {accuracy:.1%}, " \
           f"attention map {arrays.cam.shape[1]}x{arrays.cam.shape[2]}"
    if arrays.aiou is not None:
        line += f", mean AIoU {float(arrays.aiou.mean()):.2f}"
    log.info(line)
