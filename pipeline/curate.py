"""SLIM step 7: a small training subset balanced over what the model attends to and what it ignores.

Per class: cluster the candidates in two spaces (k by the elbow over 2-5), cross the two clusterings into
cells, give each cell a share of the class budget proportional to its spread (median distance to the cell's
centre: rare, diverse cells get more than their size), and inside a cell take the members nearest to k-means
centres (diverse picks, not near-duplicates). Which candidates and which spaces is the variant's choice:
see :func:`curate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.preprocessing import StandardScaler

from pipeline.config import CURATION_VARIANTS, RunConfig
from pipeline.data import load_dataset
from pipeline.errors import PipelineError
from pipeline.propagate import propagate_run
from pipeline.run import Run, atomic_write_json
from pipeline.sample import pick_near_centroids

K_RANGE = range(2, 6)
CURATED_COLUMNS = ("image_id", "y", "class_name", "score", "cell")


@dataclass(frozen=True)
class Pick:
    row: int  # row in the attention arrays
    cell: tuple[int, int]  # (feature cluster, reverse-attention cluster)


def elbow_k(points: np.ndarray, seed: int) -> int:
    """k in 2..5 where the inertia curve bends most (largest distance below the chord from k=1 to k=5)."""
    ks = [k for k in range(1, K_RANGE.stop) if k <= len(points)]
    if len(ks) < 3:
        return max(1, min(len(points), K_RANGE.start))
    inertia = np.array([KMeans(n_clusters=k, n_init=3, random_state=seed).fit(points).inertia_ for k in ks])
    x = (np.array(ks) - ks[0]) / (ks[-1] - ks[0])
    y = (inertia - inertia[-1]) / max(inertia[0] - inertia[-1], 1e-12)
    below_chord = (1 - x) - y
    candidates = [i for i, k in enumerate(ks) if k in K_RANGE]
    return ks[max(candidates, key=lambda i: below_chord[i])]


def elbow_clusters(space: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Standardise, pick k by the elbow, cluster: returns the standardised points and a cluster per point."""
    points = StandardScaler().fit_transform(space)
    return points, KMeans(n_clusters=elbow_k(points, seed), n_init=4, random_state=seed).fit_predict(points)


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


def curate(arrays: dict[str, np.ndarray], scores: np.ndarray, subset_size: int, seed: int = 0,
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
    keep, first = (0.5, arrays["features"]) if variant == "published" else (1.0, arrays["f_att"])
    classes = np.unique(arrays["y"])
    picks: list[Pick] = []
    for i, y in enumerate(classes):
        members = np.flatnonzero(arrays["y"] == y)
        order = members[np.argsort(-scores[members], kind="stable")]
        kept = order[: max(1, math.ceil(len(order) * keep))]  # published: above the class median
        budget = subset_size // len(classes) + (i < subset_size % len(classes))
        for pick in curate_class(first[kept], arrays["f_rev"][kept], budget, seed):
            picks.append(Pick(int(kept[pick.row]), pick.cell))
    return picks


def spurious_space_cells(arrays: dict[str, np.ndarray], scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """A cell id per image: per class, clusters of the space where the answers say the shortcut lives.

    A class whose attention the annotators call core (mean propagated score >= 0.5) keeps its shortcut in what
    the model ignores (f_rev); a class called spurious keeps it in what the model attends to (f_att). Clustering
    that one space (k by the elbow) splits the class by the shortcut's values — on the synthetic benchmark the
    rare cell is exactly the minority group — without the finer splits a crossed space adds.
    """
    cells = np.zeros(len(arrays["y"]), dtype=int)
    next_cell = 0
    for y in np.unique(arrays["y"]):
        members = np.flatnonzero(arrays["y"] == y)
        space = arrays["f_rev"] if scores[members].mean() >= 0.5 else arrays["f_att"]
        clusters = elbow_clusters(space[members], seed)[1]
        cells[members] = next_cell + clusters
        next_cell += int(clusters.max()) + 1
    return cells


def class_normalised(weights: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``weights`` rescaled so every class sums to one: the balance each retraining starts from."""
    weights = np.asarray(weights, dtype=float)
    return weights / np.bincount(labels, weights=weights)[labels]


def cell_balanced_weights(labels: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Sampling weight per image: every class the same total, every cell inside a class the same share."""
    return class_normalised(1.0 / np.bincount(cells)[cells], labels)


def default_subset_size(n_train: int, n_classes: int) -> int:
    """10 % of the training images, at least 20 per class: enough for a stable last-layer fit."""
    return max(20 * n_classes, round(0.1 * n_train))


def curate_run(run: Run, config: RunConfig) -> list[dict[str, str]]:
    """Propagate the answers, curate the subset; writes ``curated.csv`` and the composition to metrics."""
    scores, _, answers = propagate_run(run, config)
    arrays = run.load_arrays(run.attention_path, "embed --run RUN")
    class_names = [str(c) for c in arrays["class_names"]]
    size = config.curate.subset_size or default_subset_size(len(arrays["y"]), len(class_names))
    if size < len(class_names):
        raise PipelineError(f"--subset-size must be at least one image per class ({len(class_names)}), got {size}")
    picks = curate(arrays, scores, size, config.curate.seed, config.curate.variant)
    rows = [[int(arrays["index"][p.row]), int(arrays["y"][p.row]), class_names[int(arrays["y"][p.row])],
             f"{scores[p.row]:.4f}", f"{p.cell[0]}-{p.cell[1]}"] for p in picks]
    run.save_csv(run.curated_path, CURATED_COLUMNS, rows)
    run.save_config(config)
    composition = subset_composition(run, config, [r[0] for r in rows], class_names)
    composition["answers"] = dict(answers.counts)
    metrics = run.load_metrics()
    metrics["curation"] = composition
    atomic_write_json(run.metrics_path, metrics)
    by_group = composition.get("by_group")
    print(f"curate: {len(rows)} images from {len(arrays['y'])} ({answers.counts['core']} core / "
          f"{answers.counts['spurious']} spurious answers spread) — by class: "
          + ", ".join(f"{k}: {v}" for k, v in composition["by_class"].items())
          + (" — by group (evaluation only): " + ", ".join(f"{k}: {v}" for k, v in by_group.items())
             if by_group else ""))
    return run.load_csv(run.curated_path, "curate --run RUN")


def subset_composition(run: Run, config: RunConfig, image_ids: list[int], class_names: list[str]) -> dict:
    """Counts by class and, where the dataset has ``place``, by group. Read after choosing, never before."""
    image_set = load_dataset(config.data.root)
    samples = [image_set.samples[i] for i in image_ids]
    composition: dict = {"size": len(samples),
                         "by_class": {name: sum(s.y == y for s in samples) for y, name in enumerate(class_names)}}
    if image_set.has_place:
        composition["by_group"] = {image_set.group_name(g): sum(image_set.group_of(s) == g for s in samples)
                                   for g in range(image_set.num_groups)}
    return composition
