"""SLIM step 4: choose the few images per class that annotators will see.

Per class, k-means on the attention representation with k = the class's budget, and for each centroid the
nearest image not yet chosen: the picks cover the different ways the model attends to that class, so a
handful of answers can be spread to every image. Earlier rounds' picks are never asked again.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from tqdm import tqdm

from pipeline.core.config import RunConfig, SampleConfig, fingerprint
from pipeline.core.data import load_dataset
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.model.attention import AttentionArrays
from pipeline.slim.clustering import pick_near_centroids
from pipeline.slim.overlays import VIEWS, write_overlays
from pipeline.slim.propagate import Propagation

log = logging.getLogger(__name__)
UNCERTAIN_POOL = 3  # later rounds cluster the 3 x budget least certain images: uncertain, yet still diverse
SELECTION_COLUMNS = ("image_id", "img_filename", "y", "class_name", "pred", "confidence", "round", "cluster",
                     "distance", "overlay")


def class_budget(class_size: int, config: SampleConfig) -> int:
    """Images to ask about for a class of ``class_size``: ``per_class`` or ``fraction`` (at least one)."""
    wanted = config.per_class if config.per_class is not None else math.ceil(config.fraction * class_size)
    return max(1, min(wanted, class_size))


def select(arrays: AttentionArrays, config: SampleConfig, exclude: set[int],
           certainty: np.ndarray | None = None) -> list[tuple[int, int, float]]:
    """(row in ``arrays``, cluster, distance) for every class, never an image id in ``exclude``.

    With ``certainty`` (a later round, after propagation), only the least certain images compete: the
    ``UNCERTAIN_POOL`` x budget least certain of each class, clustered so the new questions stay diverse.
    """
    excluded = np.isin(arrays.index, list(exclude))
    picks = []
    for y in arrays.classes:
        rows = np.flatnonzero((arrays.y == y) & ~excluded)
        if len(rows) == 0:
            continue
        budget = class_budget(len(arrays.for_class(y)), config)
        if certainty is not None:
            rows = rows[np.argsort(certainty[rows], kind="stable")[: UNCERTAIN_POOL * budget]]
        points = arrays.representation(config.space, rows)  # one class in memory at a time
        for row, cluster, distance in pick_near_centroids(points, budget, config.seed):
            picks.append((int(rows[row]), cluster, distance))
    return picks


def validate(config: SampleConfig) -> None:
    if config.per_class is not None and config.per_class < 1:
        raise PipelineError(f"--per-class must be at least 1, got {config.per_class}")
    if config.per_class is None and not 0.0 < config.fraction <= 1.0:
        raise PipelineError(f"--fraction must be in (0, 1], got {config.fraction}")
    if config.round < 1:
        raise PipelineError(f"--round must be 1 or more, got {config.round}")


def earlier_picks(run: Run, round_: int) -> set[int]:
    """Image ids selected in rounds before ``round_``."""
    ids: set[int] = set()
    for earlier in (r for r in run.rounds() if r < round_):
        ids |= {int(r["image_id"]) for r in run.load_csv(run.selection_path(earlier), "sample")}
    return ids


def sample_run(run: Run, config: RunConfig, force: bool = False, progress: bool = True) -> list[dict[str, str]]:
    """Write ``selection_round{R}.csv`` and one overlay PNG per selected image; reuse them if current."""
    validate(config.sample)
    round_ = config.sample.round
    arrays = AttentionArrays.load(run.require(run.attention_path, "embed --run RUN"))
    exclude = earlier_picks(run, round_)
    certainty = None
    if round_ > 1 and run.propagation_path.exists():  # ask where the propagated answer is least sure
        propagation = Propagation.load(run.propagation_path)
        if propagation.matches(arrays):
            certainty = propagation.certainty
    selection_path = run.selection_path(round_)
    stamp = fingerprint("sample", run.stage_fingerprint("embed"), config.sample, sorted(exclude),
                        None if certainty is None else certainty.round(6).tolist())
    run.save_config(config)
    if not force and run.is_done(f"sample_round{round_}", stamp, [selection_path]):
        log.info("reusing %s (same attention and settings; --force re-selects)", selection_path)
        return run.load_csv(selection_path, "sample")
    image_set = load_dataset(config.data.root, run.manifest_path)
    picks = select(arrays, config.sample, exclude, certainty)
    rows = []
    for row, cluster, distance in tqdm(picks, desc="overlays", disable=not progress, unit="img"):
        sample = image_set.samples[int(arrays.index[row])]
        views = {kind: run.view_path(round_, sample.index, kind) for kind in VIEWS}
        write_overlays(image_set.root / sample.filename, arrays.cam[row], config.embed.threshold, views)
        overlay = views["overview"]
        rows.append([sample.index, sample.filename, sample.y, image_set.class_names[sample.y],
                     int(arrays.pred[row]), f"{float(arrays.confidence[row]):.4f}", round_, cluster,
                     f"{distance:.4f}", str(overlay.relative_to(run.root))])
    run.save_csv(selection_path, SELECTION_COLUMNS, rows)
    run.mark_done(f"sample_round{round_}", stamp)
    _log_summary(image_set.class_names, rows, len(arrays))
    return run.load_csv(selection_path, "sample")


def _log_summary(class_names: list[str], rows: list[list], total: int) -> None:
    counts = {name: 0 for name in class_names}
    for r in rows:
        counts[r[3]] += 1
    parts = ", ".join(f"{name}: {n}" for name, n in counts.items())
    log.info("%d images to annotate (%.1f%% of %d) — %s", len(rows), 100 * len(rows) / total, total, parts)
