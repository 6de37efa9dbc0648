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
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from pipeline.core.attention_arrays import AttentionArrays, save_streamed, unit_rows
from pipeline.core.config import PRECISIONS, RunConfig, fingerprint
from pipeline.core.data import TRAIN, ImageSet, load_dataset
from pipeline.core.errors import PipelineError
from pipeline.core.io import file_digest
from pipeline.core.run import Run
from pipeline.model import distributed
from pipeline.model.attention import AttentionShards, attention_batches, shard_rows
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
    """Compute (or reuse) ``attention.npz`` for the run's training split.

    Under torchrun each rank computes its own block of the pass's shards and rank 0 merges them.
    """
    run.require(run.checkpoint_path, "train --data DIR --run RUN")
    if config.embed.precision not in PRECISIONS:
        raise PipelineError(f"unknown --precision {config.embed.precision!r}; choose {', '.join(PRECISIONS)}")
    if not 0.0 < config.embed.threshold <= 1.0:
        raise PipelineError(f"--threshold must be in (0, 1], got {config.embed.threshold}")
    with distributed.main_first():  # rank 0 checks the dataset and writes the manifest; the rest trust it
        image_set = load_dataset(config.data.root, run.manifest_path)
    model, meta = load_checkpoint(run.checkpoint_path)
    stamp = fingerprint("embed", meta["fingerprint"], image_set.fingerprint(), config.embed)
    distributed.on_main(lambda: run.save_config(config))
    if not force and run.is_done("embed", stamp, [run.attention_path]):
        log.info("reusing %s (same model and settings; --force recomputes)", run.attention_path)
        distributed.on_main(lambda: run.discard_resume("embed"))
        return AttentionArrays.load(run.attention_path)
    device = resolve_device(config.device)
    bf16 = config.embed.precision == "bf16" or (config.embed.precision == "auto" and native_bf16(device))
    extractor = make_extractor(model.to(device), config.embed.cam, bf16=bf16)
    rows = len(image_set.split(TRAIN))
    shards = AttentionShards(run.shard_dir("embed"),
                             fingerprint(stamp, file_digest(run.checkpoint_path), device.type, bf16),
                             shard_rows(rows, config.embed.batch_size))
    distributed.on_main(shards.remove_stale)  # other passes' shards go before any rank writes its own
    count = resumable_pass(extractor, image_set, shards, config, device, meta["image_size"], progress)
    distributed.barrier()  # every rank's shards are written
    distributed.on_main(lambda: _merge(run, shards, count, rows, meta, config, stamp))
    arrays = AttentionArrays.load(run.attention_path)
    _log_summary(arrays)
    return arrays


def _merge(run: Run, shards: AttentionShards, count: int, rows: int, meta: dict, config: RunConfig,
           stamp: str) -> None:
    """``attention.npz`` from the pass's ``count`` shards and their 2-D embedding; the stage is then done."""
    absent = [shards.path(shard).name for shard in range(count) if not shards.path(shard).exists()]
    if absent:
        raise PipelineError(f"{len(absent)} attention shards are missing ({absent[0]} ...) in {shards.folder}; "
                            "re-run `embed` to compute them")
    whole = {"class_names": np.array(meta["class_names"]),
             **{f"emb_{side}": embed_2d_streamed(lambda side=side: shards.column(count, f"f_{side}"), rows,
                                                 config.embed.embedding, config.embed.seed)
                for side in ("att", "rev")}}
    save_streamed(run.attention_path, lambda key: shards.column(count, key), shards.load(0), rows, whole)
    run.mark_done("embed", stamp)
    run.discard_resume("embed")


def resumable_pass(extractor: AttentionExtractor, image_set: ImageSet, shards: AttentionShards, config: RunConfig,
                   device: torch.device, size: int, progress: bool) -> int:
    """This rank's part of the attention pass over the training split, continuing after the whole shards a
    killed pass left; returns the number of shards of the whole pass, which together hold every training
    image in order.

    Shards hold whole batches, so the pass restarts on a batch boundary of the undisturbed one and computes
    the very same batches; under torchrun each rank takes one contiguous block of shards
    (:func:`~pipeline.model.distributed.block_of`), so a 2-process pass computes the same batches as well.
    """
    samples = image_set.split(TRAIN)
    count = math.ceil(len(samples) / shards.rows)
    world = distributed.current()
    block = distributed.block_of(count, world)
    start = shards.first_missing(np.array([s.index for s in samples]), block.start, block.stop)
    if start > block.start:
        log.info("resuming after %d finished shards of %d in %s", start - block.start, len(block), shards.folder)
    todo = samples[start * shards.rows:block.stop * shards.rows]
    if todo:
        loader = make_loader(image_set, todo, size, config.embed.batch_size, config.data.workers, with_masks=True)
        shards.write(attention_batches(extractor, loader, device, config.embed.threshold, size,
                                       progress and world.is_main), start)
    return count


def _log_summary(arrays: AttentionArrays) -> None:
    accuracy = float((arrays.pred == arrays.y).mean())
    line = f"{len(arrays)} training images, train accuracy {accuracy:.1%}, " \
           f"attention map {arrays.cam.shape[1]}x{arrays.cam.shape[2]}"
    if arrays.aiou is not None:
        line += f", mean AIoU {float(arrays.aiou.mean()):.2f}"
    log.info(line)
