"""SLIM step 4: choose the few images per class that annotators will see.

Per class, k-means on the attention representation with k = the class's budget, and for each centroid the
nearest image not yet chosen: the picks cover the different ways the model attends to that class, so a
handful of answers can be spread to every image.

From round 2 on, the images the annotators disagreed on come first: those whose team agreement (the consensus's
confidence, or the share of answers agreeing with it where lower) is below ``--contested-below`` are asked again, of someone on the team who has not answered them yet (their Label
Studio task is reopened by ``push``; Label Studio never gives a task to a person who answered it), and take
that much of the class's budget. The rest of the budget goes to new images, the least certain first. Other
earlier picks are never asked again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.config import RunConfig, SampleConfig, fingerprint
from pipeline.core.data import load_dataset
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.slim.clustering import pick_near_centroids
from pipeline.slim.consensus import TIE, VERDICTS
from pipeline.slim.overlays import VIEWS, write_overlays
from pipeline.slim.propagate import Propagation, consolidate

log = logging.getLogger(__name__)
UNCERTAIN_POOL = 3  # later rounds cluster the 3 x budget least certain images: uncertain, yet still diverse
SELECTION_COLUMNS = ("image_id", "img_filename", "y", "class_name", "pred", "confidence", "round", "cluster",
                     "distance", "overlay", "reask", "answered_by")
REASK_CLUSTER = -1  # the cluster column of a re-asked image: it was chosen for its disagreement, not by k-means


@dataclass(frozen=True)
class Contested:
    """An answered image the team did not agree on, and who answered it (they are not asked again)."""

    image_id: int
    agreement: float  # how sure the team is of its verdict (:func:`team_agreement`); 1/2 with no verdict
    answered_by: tuple[str, ...]


def team_agreement(choices: list[str], verdict: int | None, confidence: float) -> float:
    """The lower of the consensus's confidence in ``verdict`` and the share of ``choices`` (core / spurious /
    unsure) that agree with it; 1/2 without a verdict (a tie, or only "unsure").

    The consensus alone does not flag a split: with most images core, Dawid-Skene's prior makes one "core" against
    one "spurious" from equally trusted people 80 % or more core. The share of agreeing answers does (1/2).
    """
    if verdict is None:
        return TIE
    agreeing = sum(VERDICTS.get(choice) == verdict for choice in choices)
    return min(confidence, agreeing / len(choices))


def contested_images(run: Run, config: RunConfig) -> list[Contested]:
    """The pulled images whose team agreement is below ``--contested-below``, least agreed first, among those that
    someone on the team (everyone who has answered anything) has not answered yet: with nobody left to ask, a
    re-opened task would only wait forever."""
    if config.sample.contested_below <= 0 or not run.labels_path.exists():
        return []
    store = AnnotationStore(run.labels_path)
    try:
        answered = [a for a in store.annotations() if not a.skipped and a.choice is not None]
    finally:
        store.close()
    if not answered:
        return []
    consensus = consolidate(answered, config.curate.consensus, config.curate.seed).consensus
    choices: dict[int, list[str]] = {}
    people: dict[int, set[str]] = {}
    for annotation in answered:
        choices.setdefault(annotation.image_id, []).append(annotation.choice)
        people.setdefault(annotation.image_id, set()).add(annotation.annotator or "unknown")
    team = set().union(*people.values())
    contested = [Contested(image_id, agreement, tuple(sorted(who))) for image_id, who in people.items()
                 if (agreement := team_agreement(choices[image_id], consensus.verdict.get(image_id),
                                                 consensus.confidence.get(image_id, TIE)))
                 < config.sample.contested_below]
    askable = [c for c in contested if team - set(c.answered_by)]
    if len(askable) < len(contested):
        log.info("%d contested images have been answered by everyone on the team; not asked again",
                 len(contested) - len(askable))
    return sorted(askable, key=lambda c: (c.agreement, c.image_id))


def class_budget(class_size: int, config: SampleConfig) -> int:
    """Images to ask about for a class of ``class_size``: ``per_class`` or ``fraction`` (at least one)."""
    wanted = config.per_class if config.per_class is not None else math.ceil(config.fraction * class_size)
    return max(1, min(wanted, class_size))


def reasked_rows(arrays: AttentionArrays, config: SampleConfig, contested: list[Contested]) -> list[int]:
    """Rows in ``arrays`` of the contested images asked again: least agreed first, at most a class's budget."""
    rows: list[int] = []
    taken = {int(y): 0 for y in arrays.classes}
    for image in contested:
        if not arrays.has_image(image.image_id):
            continue  # no longer in the attention data (a changed dataset): nothing to ask about
        row = arrays.row_of(image.image_id)
        y = int(arrays.y[row])
        if taken[y] < class_budget(len(arrays.for_class(y)), config):
            rows.append(row)
            taken[y] += 1
    return rows


def select(arrays: AttentionArrays, config: SampleConfig, exclude: set[int],
           certainty: np.ndarray | None = None, reasked: list[int] | None = None) -> list[tuple[int, int, float]]:
    """(row in ``arrays``, cluster, distance) for every class, never an image id in ``exclude``.

    With ``certainty`` (a later round, after propagation), only the least certain images compete: the
    ``UNCERTAIN_POOL`` x budget least certain of each class, clustered so the new questions stay diverse. The
    ``reasked`` rows (:func:`reasked_rows`) use up their classes' budgets first.
    """
    excluded = np.isin(arrays.index, list(exclude))
    already = np.bincount(arrays.y[reasked or []].astype(int), minlength=int(arrays.y.max()) + 1)
    picks = []
    for y in arrays.classes:
        rows = np.flatnonzero((arrays.y == y) & ~excluded)
        budget = class_budget(len(arrays.for_class(y)), config) - int(already[int(y)])
        if len(rows) == 0 or budget < 1:
            continue
        if certainty is not None:
            rows = rows[np.argsort(certainty[rows], kind="stable")[: UNCERTAIN_POOL * budget]]
        points = arrays.representation_rows(config.space, rows)  # built as the clustering reads it
        for row, cluster, distance in pick_near_centroids(points, budget, config.seed):
            picks.append((int(rows[row]), cluster, distance))
    return picks


def validate(config: SampleConfig) -> None:
    if config.per_class is not None and config.per_class < 1:
        raise PipelineError(f"--per-class must be at least 1, got {config.per_class}")
    if config.per_class is None and not 0.0 < config.fraction <= 1.0:
        raise PipelineError(f"--fraction must be in (0, 1], got {config.fraction}")
    if config.round < 1:
        raise PipelineError(f"--round must be 1 or more, got {config.round}")
    if not 0.0 <= config.contested_below <= 1.0:
        raise PipelineError(f"--contested-below must be a confidence in [0, 1], got {config.contested_below}")


def earlier_picks(run: Run, round_: int) -> set[int]:
    """Image ids selected in rounds before ``round_``."""
    ids: set[int] = set()
    for earlier in (r for r in run.rounds() if r < round_):
        ids |= {int(r["image_id"]) for r in run.load_csv(run.selection_path(earlier), "sample")}
    return ids


def sample_run(run: Run, config: RunConfig, force: bool = False, progress: bool = True) -> list[dict[str, str]]:
    """Write ``selection_round{R}.csv`` and one overlay PNG per selected image; reuse them if current."""
    validate(config.sample)
    round_ = config.sample.round
    arrays = AttentionArrays.load(run.require(run.attention_path, "embed --run RUN"))
    exclude = earlier_picks(run, round_)
    certainty = None
    if round_ > 1 and run.propagation_path.exists():  # ask where the propagated answer is least sure
        propagation = Propagation.load(run.propagation_path)
        if propagation.matches(arrays):
            certainty = propagation.certainty
    contested = {c.image_id: c for c in contested_images(run, config)} if round_ > 1 else {}
    selection_path = run.selection_path(round_)
    stamp = fingerprint("sample", run.stage_fingerprint("embed"), config.sample, sorted(exclude),
                        None if certainty is None else certainty.round(6).tolist(),
                        [(c.image_id, round(c.agreement, 6), c.answered_by) for c in contested.values()])
    run.save_config(config)
    if not force and run.is_done(f"sample_round{round_}", stamp, [selection_path]):
        log.info("reusing %s (same attention and settings; --force re-selects)", selection_path)
        return run.load_csv(selection_path, "sample")
    image_set = load_dataset(config.data.root, run.manifest_path)
    reasked = reasked_rows(arrays, config.sample, list(contested.values()))
    picks = [(row, REASK_CLUSTER, 0.0) for row in reasked]
    picks += select(arrays, config.sample, exclude, certainty, reasked)
    rows = []
    for row, cluster, distance in tqdm(picks, desc="overlays", disable=not progress, unit="img"):
        sample = image_set.samples[int(arrays.index[row])]
        views = {kind: run.view_path(round_, sample.index, kind) for kind in VIEWS}
        write_overlays(image_set.root / sample.filename, arrays.cam[row], config.embed.threshold, views)
        overlay = views["overview"]
        again = contested.get(sample.index)
        rows.append([sample.index, sample.filename, sample.y, image_set.class_names[sample.y],
                     int(arrays.pred[row]), f"{float(arrays.confidence[row]):.4f}", round_, cluster,
                     f"{distance:.4f}", str(overlay.relative_to(run.root)), int(again is not None),
                     ";".join(again.answered_by) if again else ""])
    run.save_csv(selection_path, SELECTION_COLUMNS, rows)
    run.mark_done(f"sample_round{round_}", stamp)
    _log_summary(image_set.class_names, rows, len(arrays), len(reasked))
    return run.load_csv(selection_path, "sample")


def _log_summary(class_names: list[str], rows: list[list], total: int, reasked: int) -> None:
    counts = {name: 0 for name in class_names}
    for r in rows:
        counts[r[3]] += 1
    parts = ", ".join(f"{name}: {n}" for name, n in counts.items())
    again = f"; {reasked} of them contested, asked again first" if reasked else ""
    log.info("%d images to annotate (%.1f%% of %d) — %s%s", len(rows), 100 * len(rows) / total, total, parts, again)
