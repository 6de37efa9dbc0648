"""Pre-annotations: the tool's own guess of ``core`` / ``spurious`` for a task, with a score.

Before anyone has answered, the guess comes from the attention map alone: attention that covers a compact
region usually sits on an object, attention spread over much of the image usually sits on background or
texture. The core probability is one minus the share of the map at or above half its maximum. It is a prior
to save annotators clicks, never a label: only human answers feed propagation.
"""

from __future__ import annotations

import numpy as np

from pipeline.labelstudio import choice_result

HALF_MAX = 0.5


def attention_prior(cams: np.ndarray) -> np.ndarray:
    """P(core) per low-resolution map in [0, 1] (shape (N, h, w) -> (N,))."""
    spread = (np.asarray(cams, dtype=np.float32) >= HALF_MAX).mean(axis=(1, 2))
    return 1.0 - spread


def prediction(p_core: float, model_version: str) -> dict:
    """A Label Studio prediction: the likelier choice, scored by how sure the guess is."""
    choice = "core" if p_core >= 0.5 else "spurious"
    return {"model_version": model_version, "score": round(float(max(p_core, 1.0 - p_core)), 4),
            "result": choice_result(choice)}
