"""Sampling weights for retraining: every class the same total, every cell of its shortcut space the same share.

``retrain --mode fresh`` trains a new model on all images drawn by these weights; the cells are clusters of the
space where the annotators' answers say the shortcut lives (see :func:`spurious_space_cells`).
"""

from __future__ import annotations

import numpy as np

from pipeline.core.verdicts import CORE_CUT
from pipeline.model.attention import AttentionArrays
from pipeline.slim.clustering import elbow_clusters


def spurious_space_cells(arrays: AttentionArrays, scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """A cell id per image: per class, clusters of the space where the answers say the shortcut lives.

    A class whose attention the annotators call core (mean propagated score >= ``CORE_CUT``) keeps its shortcut in what
    the model ignores (f_rev); a class called spurious keeps it in what the model attends to (f_att). Clustering
    that one space (k by the elbow) splits the class by the shortcut's values — on the synthetic benchmark the
    rare cell is exactly the minority group — without the finer splits a crossed space adds.
    """
    cells = np.zeros(len(arrays), dtype=int)
    next_cell = 0
    for y in arrays.classes:
        members = arrays.for_class(y)
        space = arrays.f_rev if scores[members].mean() >= CORE_CUT else arrays.f_att
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
