"""SLIM step 7: a small training subset balanced over what the model attends to and what it ignores.

Per class: cluster the candidates in two spaces (k by the elbow over 2-5), cross the two clusterings into
cells, give each cell a share of the class budget proportional to its spread (median distance to the cell's
centre: rare, diverse cells get more than their size), and inside a cell take the members nearest to k-means
centres (diverse picks, not near-duplicates). Which candidates and which spaces is the variant's choice:
see :func:`curate`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from pipeline.core.attention_arrays import AttentionArrays, read_rows
from pipeline.core.config import CURATION_VARIANTS, RunConfig
from pipeline.core.data import ImageSet, load_dataset
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.slim.clustering import elbow_clusters, pick_near_centroids
from pipeline.slim.propagate import propagate_run

log = logging.getLogger(__name__)
CURATED_COLUMNS = ("image_id", "y", "class_name", "score", "cell")
PUBLISHED_KEEP = 0.5  # SLIM step 7 as written keeps the above-median half of each class by score
MIN_SUBSET_PER_CLASS = 20  # the smallest class share a last-layer fit stays stable on
DEFAULT_SUBSET_SHARE = 0.1  # the curated subset is a tenth of the training set by default


@dataclass(frozen=True)
class Pick:
    row: int  # row in the attention arrays
    cell: tuple[int, int]  # (feature cluster, reverse-attention cluster)


def allocate(budget: int, weights: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Split ``budget`` over cells by ``weights`` (largest remainders), never more than a cell holds."""
    allocation = np.zeros(len(weights), dtype=int)
    remaining = min(budget, int(sizes.sum()))
    open_cells = sizes > 0
    while remaining > 0 and open_cells.any():
        share = np.where(open_cells, weights, 0.0)
        share = share / share.sum() if share.sum() > 0 else open_cells / open_cells.sum()
        exact = share * remaining
        step = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - step))[: remaining - step.sum()]:
            step[i] += 1
        step = np.minimum(step, sizes - allocation)
        if step.sum() == 0:
            break
        allocation += step
        remaining -= int(step.sum())
        open_cells = allocation < sizes
    return allocation


def curate_class(first: np.ndarray, reverse: np.ndarray, budget: int, seed: int) -> list[Pick]:
    """Picks (rows of the inputs) for one class's kept images, balanced over ``first`` x ``reverse`` cells."""
    first_space, by_first = elbow_clusters(first, seed)
    reverse_space, by_reverse = elbow_clusters(reverse, seed)
    joint = np.hstack([first_space, reverse_space])
    cells = sorted(set(zip(by_first.tolist(), by_reverse.tolist())))
    members = [np.flatnonzero((by_first == f) & (by_reverse == r)) for f, r in cells]
    spread = np.array([np.median(np.linalg.norm(joint[m] - joint[m].mean(0), axis=1)) if len(m) > 1 else 0.0
                       for m in members])
    weights = spread if spread.sum() > 0 else np.ones(len(cells))
    picks = []
    for cell, rows, n in zip(cells, members, allocate(budget, weights, np.array([len(m) for m in members]))):
        if n:
            picks += [Pick(int(rows[r]), cell) for r, _, _ in pick_near_centroids(joint[rows], int(n), seed)]
    return picks


def curate(arrays: AttentionArrays, scores: np.ndarray, subset_size: int, seed: int = 0,
           variant: str = "attention") -> list[Pick]:
    """The curated subset: ``subset_size`` rows split evenly over classes (as far as they have images).

    ``published``: SLIM step 7 as written: the above-median half by propagated score, cells of the pooled
    feature space x the reverse-attention space. ``attention`` (default): every image, cells of the attended
    space (f) x the reverse-attention space (f_rev). On the synthetic benchmark the median cut is what breaks
    under 10 % annotation noise (a few flipped answers decide which half survives), and balancing over what
    the model attends to beats balancing over pooled features; see BENCHMARKS.md.
    """
    if variant not in CURATION_VARIANTS:
        raise PipelineError(f"unknown --variant {variant!r}; choose {' or '.join(CURATION_VARIANTS)}")
    keep, first = (PUBLISHED_KEEP, arrays.features) if variant == "published" else (1.0, arrays.f_att)
    classes = arrays.classes
    picks: list[Pick] = []
    for i, y in enumerate(classes):
        members = arrays.for_class(y)
        order = members[np.argsort(-scores[members], kind="stable")]
        kept = order[: max(1, math.ceil(len(order) * keep))]  # published: above the class median
        budget = subset_size // len(classes) + (i < subset_size % len(classes))
        for pick in curate_class(read_rows(first, kept), read_rows(arrays.f_rev, kept), budget, seed):
            picks.append(Pick(int(kept[pick.row]), pick.cell))
    return picks


def default_subset_size(n_train: int, n_classes: int) -> int:
    """A tenth of the training images, at least 20 per class: enough for a stable last-layer fit."""
    return max(MIN_SUBSET_PER_CLASS * n_classes, round(DEFAULT_SUBSET_SHARE * n_train))


def curate_run(run: Run, config: RunConfig) -> list[dict[str, str]]:
    """Propagate the answers (when stale), curate the subset; writes ``curated.csv`` and its composition."""
    propagation, answers = propagate_run(run, config)
    arrays = AttentionArrays.load(run.attention_path)
    class_names = list(arrays.class_names)
    size = config.curate.subset_size or default_subset_size(len(arrays), len(class_names))
    if size < len(class_names):
        raise PipelineError(f"--subset-size must be at least one image per class ({len(class_names)}), got {size}")
    scores = propagation.score
    picks = curate(arrays, scores, size, config.curate.seed, config.curate.variant)
    rows = [[int(arrays.index[p.row]), int(arrays.y[p.row]), class_names[int(arrays.y[p.row])],
             f"{scores[p.row]:.4f}", f"{p.cell[0]}-{p.cell[1]}"] for p in picks]
    run.save_csv(run.curated_path, CURATED_COLUMNS, rows)
    run.save_config(config)
    composition = subset_composition(load_dataset(config.data.root, run.manifest_path), [r[0] for r in rows],
                                     class_names)
    composition["answers"] = dict(answers.counts)
    run.update_metrics(curation=composition)
    by_group = composition.get("by_group")
    log.info("%d images from %d (%d core / %d spurious answers spread) — by class: %s%s", len(rows), len(arrays),
             answers.counts["core"], answers.counts["spurious"],
             ", ".join(f"{k}: {v}" for k, v in composition["by_class"].items()),
             " — by group (evaluation only): " + ", ".join(f"{k}: {v}" for k, v in by_group.items())
             if by_group else "")
    return run.load_csv(run.curated_path, "curate --run RUN")


def subset_composition(image_set: ImageSet, image_ids: list[int], class_names: list[str]) -> dict:
    """Counts by class and, where the dataset has ``place``, by group. Read after choosing, never before."""
    samples = [image_set.samples[i] for i in image_ids]
    composition: dict = {"size": len(samples),
                         "by_class": {name: sum(s.y == y for s in samples) for y, name in enumerate(class_names)}}
    if image_set.has_place:
        composition["by_group"] = {image_set.group_name(g): sum(image_set.group_of(s) == g for s in samples)
                                   for g in range(image_set.num_groups)}
    return composition
