"""Data loaders and seeding: how every stage that feeds images to a network gets them.

The torch side of the data: :mod:`pipeline.core.data` describes a dataset without torch, so stages that never
feed a network do not load it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    default_collate,
)

from pipeline.core.config import CORRUPTIONS
from pipeline.core.data import IMAGENET_MEAN, IMAGENET_STD, ImageSet, Sample, load_mask, load_rgb
from pipeline.core.errors import PipelineError
from pipeline.model.distributed import RankShare, current, share_of_batch

log = logging.getLogger(__name__)
# blur sigma as a share of the image side (4 px at 64 px, 14 px at 224 px): wide enough to wash out texture and
# stripes (a 12 px period keeps ~10 % of its contrast at 64 px), while colour, which blur keeps, survives
BLUR_SIGMA = 1 / 16


def normalize(rgb: np.ndarray) -> torch.Tensor:
    """HWC [0, 1] array to the CHW tensor the models expect (ImageNet statistics)."""
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


@dataclass(frozen=True)
class Corruption:
    """Training-time corruption of each image's likely-spurious region (Core Risk Minimization).

    ``region(image_id, size)`` is the ``size x size`` boolean map of the pixels to corrupt; it comes from what
    the run knows about the image (boxes, attention, verdicts), never from the dataset's masks. Each draw of an
    image is corrupted with ``probability`` (fresh noise every draw), so clean draws keep natural images in the
    training distribution. ``noise`` replaces the region by Gaussian noise in the normalised space, the same
    noise the core-accuracy probe uses; ``blur`` blurs it (``BLUR_SIGMA``), removing texture but not colour.
    """

    region: Callable[[int, int], np.ndarray]
    kind: str = "noise"
    probability: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in CORRUPTIONS:
            raise PipelineError(f"unknown --corruption {self.kind!r}; choose {' or '.join(CORRUPTIONS)}")
        if not 0.0 <= self.probability <= 1.0:
            raise PipelineError(f"--corrupt-probability must be in [0, 1], got {self.probability}")

    def apply(self, rgb: np.ndarray, image_id: int) -> torch.Tensor:
        """The normalised image, its region corrupted when this draw (torch's RNG, so seeded and resumable) says so."""
        if torch.rand(()) >= self.probability:
            return normalize(rgb)
        region = self.region(image_id, rgb.shape[0])
        if self.kind == "blur":
            side = rgb.shape[0]
            blurred = Image.fromarray((rgb * 255).round().astype(np.uint8)).filter(
                ImageFilter.GaussianBlur(side * BLUR_SIGMA))
            return normalize(np.where(region[..., None], np.asarray(blurred, np.float32) / 255.0, rgb))
        image = normalize(rgb)
        return torch.where(torch.from_numpy(region), torch.randn(image.shape), image)


class ImageDataset(Dataset):
    """Yields ``(image, y, index, mask)``; ``mask`` is an empty tensor when the dataset has none.

    ``core_only`` (evaluation) replaces everything outside the object's mask by Gaussian noise (fixed per
    image), the probe of Salient ImageNet / Core Risk Minimization: a model that needs the background fails on
    it. ``corruption`` (training) corrupts each image's estimated spurious region instead; see
    :class:`Corruption`. ``skip_unreadable`` (training): an image that cannot be decoded (damaged after the
    dataset was checked, or broken past its header) yields ``None`` and a warning instead of ending the run;
    :func:`pipeline.model.loaders.make_loader` drops it from the batch and training counts the skips.
    """

    def __init__(self, image_set: ImageSet, samples: Sequence[Sample], size: int, with_masks: bool = False,
                 core_only: bool = False, corruption: Corruption | None = None, skip_unreadable: bool = False):
        self.root = image_set.root
        self.samples = list(samples)
        self.size = size
        self.with_masks = (with_masks or core_only) and image_set.has_masks
        self.core_only = core_only and image_set.has_masks
        self.corruption = corruption
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        sample = self.samples[i]
        try:
            rgb = load_rgb(self.root / sample.filename, self.size)
        except PipelineError as error:
            if not self.skip_unreadable:
                raise
            log.warning("skipped image %d: %s", sample.index, error)
            return None
        image = self.corruption.apply(rgb, sample.index) if self.corruption else normalize(rgb)
        if self.with_masks:
            mask = torch.from_numpy(load_mask(self.root / sample.mask_filename, self.size))
        else:
            mask = torch.zeros(0, dtype=torch.bool)
        if self.core_only:
            noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(sample.index))
            image = torch.where(mask, image, noise)
        return image, sample.y, sample.index, mask


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch: a stage run twice with the same seed gives the same model."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def readable_collate(batch: list):
    """The default collation of the images that could be read; ``None`` when none of the batch could."""
    readable = [item for item in batch if item is not None]
    return default_collate(readable) if readable else None


def make_loader(image_set: ImageSet, samples: Sequence[Sample], size: int, batch_size: int, workers: int,
                shuffle: bool = False, with_masks: bool = False, seed: int = 0, sampler: Sampler | None = None,
                core_only: bool = False, corruption: Corruption | None = None,
                extra: Sequence[tuple[ImageSet, Sequence[Sample]]] = (), training: bool = False) -> DataLoader:
    """Batches of ``(image, y, index, mask)``; shuffling (or ``sampler``) is seeded, so epochs are repeatable.

    ``corruption``: training images with their estimated spurious region corrupted (``retrain --mode corm``).
    ``extra``: more images after ``samples``, from other folders and never corrupted (counterfactuals, whose
    spurious region was already replaced); their ``index`` is their own set's. ``training``: an unreadable
    image is left out of its batch (a batch of none is ``None``) rather than ending hours of training; every
    other use needs every image and stops with the error naming it.

    Under torchrun, a training loader gives this rank its share of the draws in its share of each batch
    (:class:`~pipeline.model.distributed.RankShare`); the order drawn is the same as one process's.
    """
    generator = torch.Generator().manual_seed(seed)
    dataset: Dataset = ImageDataset(image_set, samples, size, with_masks=with_masks, core_only=core_only,
                                    corruption=corruption, skip_unreadable=training)
    if extra:
        dataset = ConcatDataset([dataset, *(ImageDataset(other, rows, size) for other, rows in extra)])
    seed_source = generator if sampler is None else None  # workers' seeds: from the shuffle's own generator
    world = current()
    if training and world.distributed:
        if sampler is None:
            sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        sampler, batch_size, shuffle = RankShare(sampler, world), share_of_batch(batch_size, world), False
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle,
        sampler=sampler, num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        generator=seed_source, collate_fn=readable_collate if training else None,
    )
