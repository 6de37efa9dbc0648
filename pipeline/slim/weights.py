"""Sampling weights for retraining: every class the same total, every cell of its shortcut space the same share.

``retrain --mode fresh`` trains a new model on all images drawn by these weights; the cells are clusters of the
space where the shortcut lives (see :func:`spurious_space_cells`): the one the annotators' answers point at,
checked against the reference model's own training errors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.core.attention_arrays import AttentionArrays, read_rows
from pipeline.core.verdicts import CORE_CUT
from pipeline.slim.clustering import elbow_clusters

log = logging.getLogger(__name__)
ATTENDED, IGNORED = "attended", "ignored"  # the two spaces a class's shortcut can live in: f_att, f_rev
MIN_ERRORS_TO_CHECK = 5  # fewer training errors in a class are too few to judge a clustering by: answers decide
# The answers' space is overruled only when the other space lifts the reference model's training errors at least
# 1 / 0.4 = 2.5 times as much. On the synthetic family a space that leaves the minority group without a cell of
# its own lifts them 0.7-2.4x against 5.7-7.6x for the other space (ratio <= 0.39); where both spaces isolate
# it, the ratio is >= 0.49 (BENCHMARKS.md, "mixed attention").
OVERRULE_LIFT_RATIO = 0.4


@dataclass(frozen=True)
class ShortcutSpace:
    """Where one class's shortcut is taken to live, and why: what the answers say and what the errors say."""

    answered: str  # ATTENDED for a class whose attention the answers call spurious, IGNORED for one called core
    chosen: str  # the space whose clusters become the class's cells
    error_lift: dict[str, float | None]  # per space: how much balancing its clusters lifts the training errors
    errors: int  # the reference model's training errors in the class

    def as_dict(self) -> dict:
        return {"answered": self.answered, "chosen": self.chosen, "errors": self.errors,
                "error_lift": {space: None if lift is None else round(lift, 2) for space, lift in self.error_lift.items()}}


@dataclass(frozen=True)
class ShortcutCells:
    """A cell id per training image (rows of the attention arrays) and each class's space, by class name."""

    cells: np.ndarray
    spaces: dict[str, ShortcutSpace]


def error_lift(clusters: np.ndarray, errors: np.ndarray) -> float | None:
    """How many times their share of the class the misclassified images weigh once every cluster counts the same.

    The reference model's training errors are the images its shortcut fails on (JTT's insight): a clustering
    that gives them cells of their own lifts them far above 1; one that scatters them over large cells leaves
    them near 1. None without errors.
    """
    if not errors.any():
        return None
    weights = 1.0 / np.bincount(clusters)[clusters]
    return float((weights[errors].sum() / weights.sum()) / errors.mean())


def choose_space(answered: str, error_lift_by_space: dict[str, float | None], errors: int) -> str:
    """The answers' space, unless the errors say clearly that the other one separates the shortcut better.

    A class the model attends to partly on the object and partly elsewhere (mixed attention) has a mean
    verdict near the cut; the attended space then splits it by whatever varies in what it attends to (e.g. the
    object's style), not by the shortcut, and balancing those clusters leaves the minority group as rare as
    before. The training errors, which need no labels, notice this.
    """
    other = IGNORED if answered == ATTENDED else ATTENDED
    if errors < MIN_ERRORS_TO_CHECK:
        return answered
    return other if error_lift_by_space[answered] < OVERRULE_LIFT_RATIO * error_lift_by_space[other] else answered


def spurious_space_cells(arrays: AttentionArrays, scores: np.ndarray, seed: int = 0) -> ShortcutCells:
    """A cell id per image: per class, clusters of the space where the shortcut lives.

    A class whose attention the annotators call core (mean propagated score >= ``CORE_CUT``) keeps its shortcut in what
    the model ignores (f_rev); a class called spurious keeps it in what the model attends to (f_att). Clustering
    that one space (k by the elbow) splits the class by the shortcut's values — on the synthetic benchmark the
    rare cell is exactly the minority group — without the finer splits a crossed space adds. Where the
    reference model's training errors say the other space separates them far better (:func:`choose_space`),
    that one is used instead.
    """
    cells = np.zeros(len(arrays), dtype=int)
    spaces = {}
    next_cell = 0
    errors = arrays.pred != arrays.y
    for y in arrays.classes:
        members = arrays.for_class(y)
        answered = IGNORED if scores[members].mean() >= CORE_CUT else ATTENDED
        clusters = {ATTENDED: elbow_clusters(read_rows(arrays.f_att, members), seed)[1],
                    IGNORED: elbow_clusters(read_rows(arrays.f_rev, members), seed)[1]}
        lift = {space: error_lift(found, errors[members]) for space, found in clusters.items()}
        space = ShortcutSpace(answered, choose_space(answered, lift, int(errors[members].sum())), lift,
                              int(errors[members].sum()))
        if space.chosen != space.answered:
            log.info("class %s: the answers point at the %s space, but its clusters lift the reference model's %d "
                     "training errors %.1fx against %.1fx in the %s space: balancing the %s space",
                     arrays.class_names[y], answered, space.errors, lift[answered], lift[space.chosen],
                     space.chosen, space.chosen)
        spaces[arrays.class_names[y]] = space
        cells[members] = next_cell + clusters[space.chosen]
        next_cell += int(clusters[space.chosen].max()) + 1
    return ShortcutCells(cells, spaces)


def class_normalised(weights: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``weights`` rescaled so every class sums to one: the balance each retraining starts from."""
    weights = np.asarray(weights, dtype=float)
    return weights / np.bincount(labels, weights=weights)[labels]


def cell_balanced_weights(labels: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Sampling weight per image: every class the same total, every cell inside a class the same share."""
    return class_normalised(1.0 / np.bincount(cells)[cells], labels)
