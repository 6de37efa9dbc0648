"""``simulate-annotator``: answer open tasks through Label Studio as a careful person with masks would.

It sees what an annotator sees — the task (its image id) and the attention map drawn on its overlay — plus
the one thing a person would judge by eye: the object's true mask. Its rule: AIoU >= 0.5 (at least half of
the strongest attention lies on the object) means ``core``, else ``spurious``; ``--noise`` flips that
fraction of answers. With ``--checks`` it answers the counterfactual checks of ``push-checks`` instead: ``yes``
while at least half of the donor's object (its mask) is still in the generated image, else ``no``. Answers are
submitted through the same API endpoint the labeling UI posts to, so ``pull`` and the ML backend cannot tell
them from a person's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.config import option
from pipeline.core.data import ImageSet, load_dataset, load_mask, load_rgb, resolve_image_size
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.labelstudio.client import Settings, Studio
from pipeline.labelstudio.pull import nothing_pushed
from pipeline.labelstudio.schema import choice_result
from pipeline.labelstudio.verify import CHECK_NAMES, META_KEY, NO, YES
from pipeline.model.attention import AttentionArrays, aiou
from pipeline.slim.counterfactual import manifest
from pipeline.slim.overlays import full_cam

log = logging.getLogger(__name__)
AIOU_CORE = 0.5  # at least half of the strongest attention on the object: what a person would call "on it"
OBJECT_KEPT = 0.5  # at least half of the object still there: a person would still recognise the class
SAME_PIXEL = 1 / 255  # a pixel kept from the donor differs from it by PNG rounding at most
LEAD_TIME_S = (2.0, 8.0)  # seconds a simulated answer takes, uniform: what a quick annotator spends per task


@dataclass(frozen=True)
class AnnotatorOptions:
    """How the simulated annotator answers; the fields are :func:`simulate_annotator`'s keyword arguments."""

    noise: float = option(0.0, "fraction of answers flipped")
    seed: int = option(0, "seed of the noise and lead times")
    checks: bool = option(False, "answer the counterfactual check tasks of push-checks instead: yes while at "
                                 "least half of the donor's object (its true mask) is still in the image")


@dataclass(frozen=True)
class Answerer:
    """How one kind of task is answered: the answer from the task's data, the entropy of its noise and lead
    time (fixed per task, so a re-run gives the same answer), the two answers a flip swaps, and an answer as
    the ``result`` the labeling UI would submit."""

    decide: Callable[[dict], str]
    entropy: Callable[[dict], int]
    answers: tuple[str, str]
    result: Callable[[str], list[dict]]


def decide(low_res_cam: np.ndarray, mask: np.ndarray, threshold: float) -> tuple[str, float]:
    """(choice, AIoU) for one image from the map the annotator sees and the object's mask."""
    cam = torch.from_numpy(full_cam(low_res_cam, mask.shape[0]))[None]
    value = float(aiou(cam, torch.from_numpy(mask)[None].float(), threshold)[0])
    return ("core" if value >= AIOU_CORE else "spurious"), value


def object_kept(generated: np.ndarray, original: np.ndarray, mask: np.ndarray) -> float:
    """Share of the object's pixels (``mask``) that the generated image kept from its donor."""
    same = np.abs(generated - original).max(axis=2) <= SAME_PIXEL
    return float((same & mask).sum() / max(int(mask.sum()), 1))


def answer_open_tasks(settings: Settings, project: int, run_id: str | None, answerer: Answerer, noise: float,
                      seed: int, progress: bool) -> dict[str, int]:
    """Answer each task of this run in ``project`` that nobody answered or skipped yet; counts by answer."""
    first, second = answerer.answers
    counts = {first: 0, second: 0, "flipped": 0}
    with Studio(settings) as studio:
        open_tasks = [t for t in studio.list_tasks(project)
                      if (t.get("data") or {}).get("run_id") == run_id
                      and t["total_annotations"] == 0 and t["cancelled_annotations"] == 0]
        for task in tqdm(open_tasks, desc="annotate", unit="task", disable=not progress):
            answer = answerer.decide(task["data"])
            rng = np.random.default_rng([seed, answerer.entropy(task["data"])])
            if rng.random() < noise:
                answer = second if answer == first else first
                counts["flipped"] += 1
            # submitted once (a broken connection is reported): a re-run answers only the tasks still open
            studio.submit_annotation(int(task["id"]), project, answerer.result(answer),
                                     lead_time=round(float(rng.uniform(*LEAD_TIME_S)), 2))
            counts[answer] += 1
    log.info(f"answered {len(open_tasks)} open tasks ({first} {counts[first]}, {second} {counts[second]}; "
             f"{counts['flipped']} flipped by --noise {noise:g})")
    return counts


def masked_dataset(run: Run) -> ImageSet:
    """The run's dataset, which must have masks: they are what the simulated annotator judges by."""
    image_set = load_dataset(run.load_config().data.root, run.manifest_path)
    if not image_set.has_masks:
        raise PipelineError(f"{image_set.root} has no mask_filename column; the simulated annotator needs masks")
    return image_set


def attention_answerer(run: Run, image_set: ImageSet) -> Answerer:
    """core / spurious from the AIoU of the map the annotator sees on the object's mask."""
    config = run.load_config()
    size = resolve_image_size(image_set, config.data.image_size)
    arrays = AttentionArrays.load(run.require(run.attention_path, "embed --run RUN"))

    def decide_task(data: dict) -> str:
        image_id = int(data["image_id"])
        mask = load_mask(image_set.root / image_set.samples[image_id].mask_filename, size)
        return decide(arrays.cam[arrays.row_of(image_id)], mask, config.embed.threshold)[0]

    return Answerer(decide_task, lambda data: int(data["image_id"]), ("core", "spurious"), choice_result)


def check_answerer(run: Run, image_set: ImageSet) -> Answerer:
    """yes / no from how much of the donor's object the generated image kept (:data:`OBJECT_KEPT`)."""
    rows = {r["key"]: r for r in manifest(run)}
    size = json.loads((run.counterfactual_dir / "dataset.json").read_text())["image_size"]

    def decide_task(data: dict) -> str:
        row = rows.get(data["key"])
        if row is None:  # no longer generated: its answer changes nothing, but a person would still give one
            return YES
        donor = image_set.samples[int(row["donor"])]
        kept = object_kept(load_rgb(run.counterfactual_dir / row["img_filename"], size),
                           load_rgb(image_set.root / donor.filename, size),
                           load_mask(image_set.root / donor.mask_filename, size))
        return YES if kept >= OBJECT_KEPT else NO

    return Answerer(decide_task, lambda data: int(data["key"], 16), (YES, NO),
                    lambda answer: choice_result(answer, CHECK_NAMES))


def simulate_annotator(run: Run, settings: Settings, noise: float = 0.0, seed: int = 0, checks: bool = False,
                       progress: bool = True) -> dict[str, int]:
    """Answer every open task of the run's project (with ``checks``: of its check project); counts by answer."""
    if not 0.0 <= noise <= 1.0:
        raise PipelineError(f"--noise must be a fraction in [0, 1], got {noise}")
    image_set = masked_dataset(run)
    answerer = (check_answerer if checks else attention_answerer)(run, image_set)
    store = AnnotationStore(run.labels_path)
    try:
        project, run_id = store.get_meta(META_KEY if checks else "project_id"), store.get_meta("run_id")
    finally:
        store.close()
    if project is None:
        raise nothing_pushed(run, "push-checks" if checks else "push")
    return answer_open_tasks(settings, int(project), run_id, answerer, noise, seed, progress)
