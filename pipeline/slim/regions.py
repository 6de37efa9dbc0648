"""Where each training image's likely-spurious region is: what ``retrain --mode corm`` corrupts.

Only what the run knows decides it, never the dataset's masks (those are for evaluation):

1. an annotator's box marks the object (the core), so everything outside the boxes is spurious; a drawn box
   wins over the attention map, because a person located the object;
2. otherwise the image's attention map and its propagated verdict: attention judged spurious means the model
   looked at the cue, so the high-CAM region is spurious; attention judged core means it looked at the object,
   so the low-CAM region is.

A map that is flat (nothing above the threshold) localises nothing, and its image stays clean.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.core.verdicts import verdict
from pipeline.slim.overlays import full_cam

# CAM level (of the per-image min-max map) splitting "where the model looked" from the rest: half the peak, the
# usual extent of an attended region, the same cut for both verdicts. Measured on the synthetic default (seed 0,
# masks used for this evaluation only): core-judged images lose 4 % of the object and 96 % of the background to
# the corruption, spurious-judged ones 27 % and 69 %. A lower cut (0.35) spares the object of core-judged images
# no better (0.1 %) but corrupts 39 % of it in spurious-judged ones; a higher cut (0.65) corrupts 26 % of the
# object in core-judged images and leaves half the background of spurious-judged ones.
CAM_REGION_THRESHOLD = 0.5
SOURCES = ("box", "high_cam", "low_cam")  # which rule decided an image's region (counted in the metrics)


def box_mask(boxes: Sequence[dict], size: int) -> np.ndarray:
    """The union of Label Studio rectangles (``x``, ``y``, ``width``, ``height`` in percent of the image,
    optional ``rotation`` in degrees clockwise about the top-left corner) as a ``size x size`` boolean map.

    A pixel belongs to a box when its centre does. Rotation is applied in the square frame the model sees,
    which is exact for square images.
    """
    centres = (np.arange(size) + 0.5) * 100 / size  # pixel centres in percent of the side
    px, py = np.meshgrid(centres, centres)
    inside = np.zeros((size, size), bool)
    for box in boxes:
        angle = math.radians(box.get("rotation", 0.0))
        dx, dy = px - box["x"], py - box["y"]
        along = dx * math.cos(angle) + dy * math.sin(angle)  # the centre in the box's own (rotated) axes
        across = -dx * math.sin(angle) + dy * math.cos(angle)
        inside |= (along >= 0) & (along < box["width"]) & (across >= 0) & (across < box["height"])
    return inside


def region_source(p_core: float, boxes: Sequence[dict]) -> str:
    """Which rule decides the image's region: its boxes, else its verdict (``high_cam`` / ``low_cam``)."""
    if boxes:
        return "box"
    return "high_cam" if verdict(p_core) == "spurious" else "low_cam"


def spurious_region(cam: np.ndarray, p_core: float, boxes: Sequence[dict], size: int) -> np.ndarray:
    """``size x size`` map, True where the image's spurious cue most likely is (the pixels to corrupt)."""
    source = region_source(p_core, boxes)
    if source == "box":
        return ~box_mask(boxes, size)
    hot = full_cam(cam, size) >= CAM_REGION_THRESHOLD
    if not hot.any():
        return hot
    return hot if source == "high_cam" else ~hot


@dataclass(frozen=True, eq=False)
class SpuriousRegions:
    """Every training image's region, computed on demand (``region(image_id, size)``, what
    :class:`pipeline.model.loaders.Corruption` calls) from the low-resolution maps: memory holds no full-size masks.
    """

    index: np.ndarray  # (N,) image ids, rows of the attention data
    cam: np.ndarray  # (N, h, w) low-resolution maps
    score: np.ndarray  # (N,) propagated P(core)
    boxes: dict[int, list[dict]]  # image id -> the annotators' boxes

    @cached_property
    def _rows(self) -> dict[int, int]:
        return {int(image_id): row for row, image_id in enumerate(self.index)}

    def __call__(self, image_id: int, size: int) -> np.ndarray:
        row = self._rows[int(image_id)]
        return spurious_region(np.asarray(self.cam[row], np.float32), float(self.score[row]),
                               self.boxes.get(int(image_id), []), size)

    def source(self, image_id: int) -> str:
        """Which rule decides ``image_id``'s region (one of ``SOURCES``)."""
        return region_source(float(self.score[self._rows[int(image_id)]]), self.boxes.get(int(image_id), []))

    def sources(self) -> dict[str, int]:
        """How many images each rule decided: what the run's metrics report."""
        counts = Counter(region_source(float(p), self.boxes.get(int(i), [])) for i, p in zip(self.index, self.score))
        return {source: counts[source] for source in SOURCES}

    def digest(self) -> str:
        """What the regions depend on (maps, scores, boxes, the threshold): part of the retraining's resume key."""
        blob = hashlib.sha256()
        for part in (self.index, np.asarray(self.cam, np.float32), np.asarray(self.score, np.float64)):
            blob.update(np.ascontiguousarray(part).tobytes())
        blob.update(json.dumps(sorted(self.boxes.items()), sort_keys=True).encode())
        blob.update(repr(CAM_REGION_THRESHOLD).encode())
        return blob.hexdigest()


def annotated_boxes(run: Run) -> dict[int, list[dict]]:
    """Every box drawn on an image in the run's database (all annotators, skipped answers left out)."""
    if not run.labels_path.exists():
        return {}
    store = AnnotationStore(run.labels_path)
    try:
        boxes: dict[int, list[dict]] = {}
        for annotation in store.annotations():
            if annotation.boxes and not annotation.skipped:
                boxes.setdefault(annotation.image_id, []).extend(annotation.boxes)
        return boxes
    finally:
        store.close()


def run_regions(run: Run, arrays: AttentionArrays, scores: np.ndarray) -> SpuriousRegions:
    """The regions of the run's training images from its attention, propagated scores and stored boxes."""
    return SpuriousRegions(arrays.index, arrays.cam, scores, annotated_boxes(run))
