"""``simulate-annotator``: answer open tasks through Label Studio as a careful person with masks would.

It sees what an annotator sees — the task (its image id) and the attention map drawn on its overlay — plus
the one thing a person would judge by eye: the object's true mask. Its rule: AIoU >= 0.5 (at least half of
the strongest attention lies on the object) means ``core``, else ``spurious``; ``--noise`` flips that
fraction of answers. Answers are submitted through the same API endpoint the labeling UI posts to, so
``pull`` and the ML backend cannot tell them from a person's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.config import option
from pipeline.core.data import load_dataset, load_mask, resolve_image_size
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.labelstudio.client import Settings, Studio
from pipeline.labelstudio.schema import choice_result
from pipeline.model.attention import AttentionArrays, aiou
from pipeline.slim.overlays import full_cam

log = logging.getLogger(__name__)
AIOU_CORE = 0.5  # at least half of the strongest attention on the object: what a person would call "on it"
LEAD_TIME_S = (2.0, 8.0)  # seconds a simulated answer takes, uniform: what a quick annotator spends per task


@dataclass(frozen=True)
class AnnotatorOptions:
    """How the simulated annotator answers; the fields are :func:`simulate_annotator`'s keyword arguments."""

    noise: float = option(0.0, "fraction of answers flipped")
    seed: int = option(0, "seed of the noise and lead times")


def decide(low_res_cam: np.ndarray, mask: np.ndarray, threshold: float) -> tuple[str, float]:
    """(choice, AIoU) for one image from the map the annotator sees and the object's mask."""
    cam = torch.from_numpy(full_cam(low_res_cam, mask.shape[0]))[None]
    value = float(aiou(cam, torch.from_numpy(mask)[None].float(), threshold)[0])
    return ("core" if value >= AIOU_CORE else "spurious"), value


def simulate_annotator(run: Run, settings: Settings, noise: float = 0.0, seed: int = 0,
                       progress: bool = True) -> dict[str, int]:
    """Answer every open task of the run's project; returns counts by choice."""
    if not 0.0 <= noise <= 1.0:
        raise PipelineError(f"--noise must be a fraction in [0, 1], got {noise}")
    config = run.load_config()
    image_set = load_dataset(config.data.root)
    if not image_set.has_masks:
        raise PipelineError(f"{image_set.root} has no mask_filename column; the simulated annotator needs masks")
    size = resolve_image_size(image_set, config.data.image_size)
    arrays = AttentionArrays.load(run.require(run.attention_path, "embed --run RUN"))
    store = AnnotationStore(run.labels_path)
    try:
        project, run_id = store.get_meta("project_id"), store.get_meta("run_id")
    finally:
        store.close()
    if project is None:
        raise PipelineError(f"nothing pushed from {run.root} yet; run `python -m pipeline push --run {run.root}`")
    counts = {"core": 0, "spurious": 0, "flipped": 0}
    with Studio(settings) as studio:
        open_tasks = [t for t in studio.list_tasks(int(project))
                      if (t.get("data") or {}).get("run_id") == run_id
                      and t["total_annotations"] == 0 and t["cancelled_annotations"] == 0]
        for task in tqdm(open_tasks, desc="annotate", unit="task", disable=not progress):
            image_id = int(task["data"]["image_id"])
            sample = image_set.samples[image_id]
            choice, _ = decide(arrays.cam[arrays.row_of(image_id)],
                               load_mask(image_set.root / sample.mask_filename, size), config.embed.threshold)
            rng = np.random.default_rng([seed, image_id])
            if rng.random() < noise:
                choice = "spurious" if choice == "core" else "core"
                counts["flipped"] += 1
            # submitted once (a broken connection is reported): a re-run answers only the tasks still open
            studio.submit_annotation(int(task["id"]), int(project), choice_result(choice),
                                     lead_time=round(float(rng.uniform(*LEAD_TIME_S)), 2))
            counts[choice] += 1
    log.info(f"answered {len(open_tasks)} open tasks (core {counts['core']}, spurious "
             f"{counts['spurious']}; {counts['flipped']} flipped by --noise {noise:g})")
    return counts
