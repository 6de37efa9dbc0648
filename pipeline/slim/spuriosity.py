"""Spuriosity (Moayeri et al.): how strongly an image of a class shows the cue the class is confounded with.

Moayeri et al. read it from the activation of the model's spurious features. Here the answers say where those
features are, per class, exactly as SLIM's retraining reads them (:func:`pipeline.slim.weights.spurious_space_cells`):
a class whose attention the annotators call core (mean propagated ``P(core)`` >= ``CORE_CUT``) keeps its
shortcut in what the model ignores (``f_rev``); a class called spurious keeps it in what the model attends to
(``f_att``); unless the reference model's training errors say clearly that the other space separates them. An image's spuriosity is how typical it is there: the cosine between its vector and the class's
mean direction. The class's majority (the cue present) is typical; images without the cue (a waterbird on
land) are not.

Why not the propagated score itself: inside a class whose answers are all alike, ``P(core)`` measures how close
an image's attention is to the nearest *annotated* image, so its order follows which images happened to be
sampled. On the synthetic default (places used only to check) the least spurious tenth of the spurious-judged
class by ``1 - P(core)`` held 44 % / 42 % / 0 % minority images on seeds 0 / 1 / 2 (5 % in the class); by
typicality, 53 % / 53 % / 44 %.

Scores are those of the reference model's attention: a fixed ranking of the images, so models are compared on
the same quartiles.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.attention_arrays import AttentionArrays, read_rows, unit_rows
from pipeline.slim.weights import ATTENDED, spurious_space_cells


def shortcut_vectors(arrays: AttentionArrays, rows: np.ndarray, class_spurious: bool) -> np.ndarray:
    """Unit vectors of ``rows`` in the space where the shortcut lives: attended features for a class whose
    attention was judged spurious, ignored features for one judged core."""
    return unit_rows(read_rows(arrays.f_att if class_spurious else arrays.f_rev, rows))


def spuriosity(train: AttentionArrays, scores: np.ndarray, images: AttentionArrays | None = None,
               seed: int = 0) -> np.ndarray:
    """Spuriosity of every row of ``images`` (default: the training images), by class, in [-1, 1].

    ``train`` and ``scores`` (its propagated ``P(core)``) decide each class's shortcut space (with the
    retraining's k-means ``seed``) and its mean direction; ``images`` must come from the same reference model
    (e.g. its validation attention).
    """
    images = train if images is None else images
    spaces = spurious_space_cells(train, scores, seed).spaces
    out = np.zeros(len(images))
    for y in train.classes:
        members, targets = train.for_class(y), images.for_class(y)
        class_spurious = spaces[train.class_names[y]].chosen == ATTENDED
        centre = unit_rows(shortcut_vectors(train, members, class_spurious).mean(axis=0, keepdims=True))[0]
        out[targets] = shortcut_vectors(images, targets, class_spurious) @ centre
    return out
