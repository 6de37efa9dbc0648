"""Data loaders and seeding: how every stage that feeds images to a network gets them."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    default_collate,
)

from pipeline.core.data import Corruption, ImageDataset, ImageSet, Sample
from pipeline.model.distributed import RankShare, current, share_of_batch


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
