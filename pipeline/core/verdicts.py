"""The vocabulary of an answer: what an annotator can say about where the model looked, and how scores map to it.

An annotator judges one attention map: ``core`` (the highlighted region is the object itself), ``spurious``
(something else: background, texture, context) or ``unsure``. Propagation turns verdicts into a score
``P(core)`` per image; :data:`CORE_CUT` is where that score says "core".
"""

from __future__ import annotations

CHOICES = ("core", "spurious", "unsure")
CORE, SPURIOUS = 1, 0  # a verdict as a label for label spreading
UNDECIDED = 0.5  # P(core) of an image nothing speaks for or against
CORE_CUT = 0.5  # P(core) at or above which the verdict is core: the two verdicts are symmetric, no prior favours one
AIOU_CORE = 0.5  # at least half of the strongest attention on the object: what a person would call "on it" (the
# simulated annotator's rule, and the true verdict wherever masks give AIoU)


def verdict(p_core: float) -> str:
    """``core`` or ``spurious`` for a score ``P(core)`` in [0, 1]."""
    return "core" if p_core >= CORE_CUT else "spurious"
