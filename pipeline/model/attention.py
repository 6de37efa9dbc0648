"""The attention pass: GradCAM, the attention vectors and AIoU for every image, streamed batch by batch.

:func:`attention_batches` yields the per-image fields of :class:`~pipeline.core.attention_arrays.AttentionArrays`
batch by batch; :class:`AttentionShards` keeps the finished slices on disk as it goes, so a killed pass continues
from the last complete shard instead of the start.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.core.attention_arrays import AttentionArrays, stack_rows
from pipeline.core.io import atomic_write
from pipeline.model.cam import AttentionBatch, AttentionExtractor, upsample_cams

log = logging.getLogger(__name__)
SHARD_IMAGES = 512  # most work a kill can cost: ~1 s of a GPU's ResNet-50 pass, ~12 MB of its vectors
MIN_SHARDS = 8  # and at most an eighth of a small pass, so a short one resumes too


def attention_vectors(batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model looked at (f) and what it ignored (f_rev), from activations and [0, 1] maps.

    ``f = mean_ij A[:, i, j] * m[i, j]`` (SLIM sums; the mean only rescales by the constant h*w) and
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


def compute_attention(extractor: AttentionExtractor, loader: DataLoader, device: torch.device, threshold: float,
                      image_size: int, progress: bool = True) -> AttentionArrays:
    """Stream ``loader`` through ``extractor``: one row per image, in loader order.

    Memory holds only the per-image vectors and low-resolution maps, allocated once from the first batch's
    shapes; full-resolution maps (for AIoU) live one batch at a time.
    """
    return stack_rows(attention_batches(extractor, loader, device, threshold, image_size, progress),
                      len(loader.dataset))


def attention_batches(extractor: AttentionExtractor, loader: DataLoader, device: torch.device, threshold: float,
                      image_size: int, progress: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """The per-image values of each batch of ``loader`` (the fields of :class:`AttentionArrays`), in order."""
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
        yield values


def shard_rows(n_images: int, batch_size: int) -> int:
    """Images per shard: a whole number of batches, so a resumed pass sees exactly the batches (and the float
    rounding) of an undisturbed one; about ``SHARD_IMAGES``, fewer for a pass under ``MIN_SHARDS`` of those."""
    wanted = min(SHARD_IMAGES, math.ceil(n_images / MIN_SHARDS))
    return batch_size * max(1, wanted // batch_size)


@dataclass(frozen=True)
class AttentionShards:
    """The finished slices of one attention pass: ``FOLDER/KEY-00000.npz``, ``rows`` images each, in order.

    ``key`` is the pass's fingerprint (model bytes, data, settings, device): shards of another pass are never
    read. Each shard is an ``.npz`` of the per-image fields of its rows, written atomically, so a killed pass
    leaves whole shards only; one that does not read back is discarded and recomputed. Members are stored
    uncompressed (``np.savez``), so a shard's arrays can also be memory-mapped where they lie.
    """

    folder: Path
    key: str
    rows: int

    def path(self, shard: int) -> Path:
        return self.folder / f"{self.key}-{shard:05d}.npz"

    def remove_stale(self) -> None:
        """Delete shards of other passes (older models or settings): they can never be resumed."""
        for path in self.folder.glob("*.npz"):
            if not path.name.startswith(f"{self.key}-"):
                path.unlink(missing_ok=True)

    def first_missing(self, index: np.ndarray, first: int = 0, stop: int | None = None) -> int:
        """The number of the first shard from ``first`` (up to ``stop``) that is absent or not whole: whole
        ones are complete and hold exactly the expected image ids (``index``, in pass order).

        Each is read in full (the zip's checksums catch a torn one) and dropped again: memory holds one shard.
        The first one that is not whole is deleted; ``first``/``stop`` keep a rank to its own shards.
        """
        shard = first
        while (stop is None or shard < stop) and self.path(shard).exists():
            expected = index[shard * self.rows:(shard + 1) * self.rows]
            try:
                part = self.load(shard)
                whole = np.array_equal(part["index"], expected) and all(len(v) == len(expected)
                                                                         for v in part.values())
            except Exception as exc:  # noqa: BLE001 - a torn file fails in zipfile, zlib or numpy alike; a cache
                log.warning("discarding the unreadable attention shard %s (%s); recomputing it",
                            self.path(shard), exc.__class__.__name__)
                whole = False
            if not whole:
                self.path(shard).unlink(missing_ok=True)
                break
            shard += 1
        return shard

    def load(self, shard: int) -> dict[str, np.ndarray]:
        """One shard's fields; raises on a torn file (:meth:`completed` has checked the ones it counts)."""
        with np.load(self.path(shard), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}

    def column(self, count: int, key: str) -> Iterator[np.ndarray]:
        """Field ``key`` of the first ``count`` shards, one shard at a time (only that member is read)."""
        for shard in range(count):
            with np.load(self.path(shard), allow_pickle=False) as npz:
                yield npz[key]

    def write(self, batches: Iterable[dict[str, np.ndarray]], first: int) -> int:
        """Group ``batches`` into shards numbered from ``first``, saving each as it completes; returns the number
        of shards there are now."""
        pending: list[dict[str, np.ndarray]] = []
        shard = first
        for values in batches:
            pending.append(values)
            if sum(len(p["index"]) for p in pending) >= self.rows:
                self._save(shard, pending)
                shard, pending = shard + 1, []
        if pending:
            self._save(shard, pending)
            shard += 1
        return shard

    def _save(self, shard: int, batches: list[dict[str, np.ndarray]]) -> None:
        part = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
        atomic_write(self.path(shard), lambda handle: np.savez(handle, **part))
