"""The attention prior: the tool's own guess of ``P(core)`` for an image before anyone has answered.

Before anyone has answered, the guess comes from the attention map alone: attention that covers a compact
region usually sits on an object, attention spread over much of the image usually sits on background or
texture. The core probability is one minus the share of the map at or above half its maximum. It is a prior
to save annotators clicks, never a label: only human answers feed propagation.
"""

from __future__ import annotations

import numpy as np

HALF_MAX = 0.5  # a map's "hot" part: at or above half its maximum, the usual full-width-at-half-maximum cut


def attention_prior(cams: np.ndarray) -> np.ndarray:
    """P(core) per low-resolution map in [0, 1] (shape (N, h, w) -> (N,))."""
    spread = (np.asarray(cams, dtype=np.float32) >= HALF_MAX).mean(axis=(1, 2))
    return 1.0 - spread
