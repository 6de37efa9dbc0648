"""``push-checks`` / ``pull-checks``: people check a sample of the generated (counterfactual) training images.

Each sampled image becomes a task of a project of its own ("<attention project title> counterfactual check",
config ``label_config/counterfactual.xml``): the picture and "Does this still show a <class>?", answered yes or
no. An image whose answers say no is never trained on (:func:`pipeline.slim.counterfactual.rejected_keys`); a
class with many rejections is warned about, because then the editor is failing on that class.

Everything that talks to Label Studio is :mod:`pipeline.labelstudio.push`'s and ``pull``'s machinery: the
retry policy, the project found again by title and description, pictures uploaded once into the companion media
project, tasks a killed push left unrecorded adopted by their run id, and the incremental mirror of a task's
answers. Images are identified by their ``key`` (the digest of their bytes), so an answer stays with exactly
the picture that was checked: pushing after a regeneration asks only about new keys, and answers about keys no
longer generated stay stored but affect nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Hashable
from dataclasses import dataclass

import label_config
from pipeline.core.config import option
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore, Check, CheckTask
from pipeline.labelstudio.client import Settings, Studio
from pipeline.labelstudio.pull import (
    fetch_changes,
    listed_before,
    nothing_pushed,
    remember_listing,
    remembered_project,
)
from pipeline.labelstudio.push import TITLE_LENGTH, ProjectKind, project_identity, pushing
from pipeline.labelstudio.schema import ControlNames, parse_annotation
from pipeline.slim.counterfactual import manifest

log = logging.getLogger(__name__)
# control names and answers in label_config/counterfactual.xml
VERDICT, YES, NO = "verdict", "yes", "no"
CHECK_NAMES = ControlNames(VERDICT, "image")  # where an answer goes: the verdict about the image
META_KEY = "check_project_id"  # where labels.sqlite remembers the check project (the attention one: project_id)
TITLE_SUFFIX = " counterfactual check"
# 5 % of the images: one in twenty is a few minutes of clicking for hundreds of generated images, and enough to
# see an editor that fails on a class
CHECK_SHARE = 0.05
# at least this many per class (or all it has): with fewer, one answer moves a class's rejection rate by more
# than 10 points, too coarse to compare with REJECTION_WARNING
MIN_PER_CLASS = 10
# more than a fifth of a class's checked images rejected: the editor (not an unlucky image) is at fault
REJECTION_WARNING = 0.20


@dataclass(frozen=True)
class CheckOptions:
    """What ``push-checks`` sends where; the fields are :func:`push_checks`' keyword arguments."""

    project_id: int | None = option(None, "use this existing check project (default: the run's own, created on "
                                          "first push-checks)", flag="--project", metavar="ID")
    new_project: bool = option(False, "create a new check project even if the run has one")
    sample: int | None = option(None, "images to check, stratified by class (default: 5 % of the generated "
                                      "images); at least 10 per class or all a class has", metavar="N")
    seed: int = option(0, "seed of the sample")


@dataclass(frozen=True)
class PullCheckOptions:
    """How ``pull-checks`` reports; the fields are :func:`pull_checks`' keyword arguments."""

    warn_above: float = option(REJECTION_WARNING, "warn about a class when more than this share of its checked "
                                                  "images is rejected", metavar="SHARE")


def check_project(run: Run, run_id: str) -> ProjectKind:
    """The run's check project: titled like its attention project plus " counterfactual check" (the attention
    title is shortened, never the suffix, so the two are told apart at a glance)."""
    title, _ = project_identity(run, run_id)
    return ProjectKind(META_KEY, title[:TITLE_LENGTH - len(TITLE_SUFFIX)] + TITLE_SUFFIX,
                       f"SLIM counterfactual check for run {run.root} (run id {run_id})",
                       label_config.load(label_config.COUNTERFACTUAL), VERDICT, (YES, NO))


@dataclass(frozen=True)
class CheckTasks:
    """The check project's tasks: the ``check_tasks`` table, one task per image key."""

    store: AnnotationStore
    project_id: int
    field: str = "key"

    def known(self) -> set[int]:
        return {t.task_id for t in self.store.check_tasks(self.project_id)}

    def present(self) -> set[Hashable]:
        return {t.key for t in self.store.check_tasks(self.project_id)}

    def record(self, made: list[tuple[int, dict]]) -> None:
        self.store.add_check_tasks(CheckTask(task_id, self.project_id, data["key"], data["class_name"])
                                   for task_id, data in made)


def rank(key: str, seed: int) -> str:
    """A key's place in the seeded random order: a digest of the seed and the key alone, so an image keeps its
    place when others are regenerated and the sample after a regeneration keeps every image still generated."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def sample_rows(rows: list[dict[str, str]], size: int | None, seed: int) -> list[dict[str, str]]:
    """The images to check: ``size`` (default :data:`CHECK_SHARE` of all) spread over the classes in proportion
    to their sizes, rounded up, at least :data:`MIN_PER_CLASS` per class or all it has; within a class the first
    in :func:`rank` order."""
    if size is not None and size < 1:
        raise PipelineError(f"--sample must be at least 1, got {size}")
    wanted = size or math.ceil(CHECK_SHARE * len(rows))
    chosen = []
    for y in sorted({int(r["y"]) for r in rows}):
        members = sorted((r for r in rows if int(r["y"]) == y), key=lambda r: rank(r["key"], seed))
        quota = max(MIN_PER_CLASS, math.ceil(wanted * len(members) / len(rows)))
        chosen += members[:quota]
    return chosen


def class_names(run: Run) -> list[str]:
    return json.loads((run.counterfactual_dir / "dataset.json").read_text())["class_names"]


def check_payload(row: dict[str, str], url: str, names: list[str], run_id: str) -> dict:
    """One task: the picture, the question, and what the pipeline needs back (the key, the claimed class)."""
    name = names[int(row["y"])]
    return {"data": {"image": url, "question": f"Does this still show a {name}?", "key": row["key"],
                     "class_name": name, "y": int(row["y"]), "donor": int(row["donor"]), "run_id": run_id}}


def push_checks(run: Run, settings: Settings, project_id: int | None = None, new_project: bool = False,
                sample: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Push the sampled counterfactuals that have no check task yet; returns counts."""
    rows = manifest(run)
    chosen = sample_rows(rows, sample, seed)
    names = class_names(run)
    with pushing(run, settings, lambda run_id: check_project(run, run_id), CheckTasks, project_id,
                 new_project) as push:
        present = push.book.present()
        todo = [r for r in chosen if r["key"] not in present]
        paths = [run.counterfactual_dir / r["img_filename"] for r in todo]
        urls = push.stage(paths, progress=progress)
        tasks = [check_payload(r, urls[path.name], names, push.run_id) for r, path in zip(todo, paths)]
        created = push.import_tasks(tasks, progress)
    project, adopted = push.project_id, push.adopted
    summary = {"project_id": project, "sampled": len(chosen), "created": created,
               "already_present": len(chosen) - len(todo), "adopted": adopted}
    log.info("check project %d: %d of %d generated images sampled, %d tasks created, %d already there%s; open %s",
             project, len(chosen), len(rows), created, summary["already_present"],
             f" ({adopted} recovered from an interrupted push)" if adopted else "", push.studio.project_url(project))
    return summary


def parse_check(raw: dict, task_id: int, key: str, users: dict[int, str]) -> Check:
    """A Label Studio annotation of a check task as a stored :class:`Check`.

    Who answered, when, and whether it was skipped are read exactly as for attention answers
    (:func:`~pipeline.labelstudio.schema.parse_annotation`; its image id is not used here); the verdict is the
    ``verdict`` choice. An answer with neither yes nor no counts as skipped.
    """
    base = parse_annotation(raw, task_id, -1, users)
    picked = [item["value"]["choices"][0] for item in raw.get("result") or []
              if item.get("from_name") == VERDICT and (item.get("value") or {}).get("choices")]
    accepted = None if base.skipped or not picked or picked[0] not in (YES, NO) else picked[0] == YES
    return Check(base.annotation_id, task_id, key, accepted, base.annotator, base.updated_at)


def check_summary(store: AnnotationStore, project_id: int, rows: list[dict[str, str]]) -> dict:
    """Counts over the project's images still generated: checked (a verdict), accepted, rejected, pending (no
    answer yet), and per class; ``stale``: tasks of images no longer generated (their answers change nothing)."""
    generated = {r["key"] for r in rows}
    tasks = store.check_tasks(project_id)
    claimed = {t.key: t.class_name for t in tasks if t.key in generated}
    verdicts = store.counterfactual_checks()
    per_class: dict[str, dict[str, int]] = {}
    for key, name in sorted(claimed.items(), key=lambda item: item[1]):
        counts = per_class.setdefault(name, {"checked": 0, "rejected": 0})
        if key in verdicts:
            counts["checked"] += 1
            counts["rejected"] += not verdicts[key]
    checked = sum(c["checked"] for c in per_class.values())
    rejected = sum(c["rejected"] for c in per_class.values())
    return {"tasks": len(tasks), "checked": checked, "accepted": checked - rejected, "rejected": rejected,
            "pending": len(claimed) - checked, "stale": len({t.key for t in tasks} - generated),
            "per_class": per_class}


def pull_checks(run: Run, settings: Settings, warn_above: float = REJECTION_WARNING) -> dict:
    """Mirror the check tasks' answers into ``labels.sqlite``; returns the counts it logs.

    Incremental and idempotent like ``pull``. A check task deleted in Label Studio takes its answers with it
    (a check is mirrored, not archived); ``push-checks`` asks about the image again while it is sampled.
    """
    if not 0.0 <= warn_above <= 1.0:
        raise PipelineError(f"--warn-above must be a share in [0, 1], got {warn_above}")
    if not run.labels_path.exists():  # checked first: opening the store would create the file
        raise nothing_pushed(run, "push-checks")
    rows = manifest(run)
    store = AnnotationStore(run.labels_path)
    studio = Studio(settings)
    try:
        project_id = remembered_project(run, store, META_KEY, "push-checks")
        studio.connect()
        studio.project(project_id)
        known = {t.task_id: t for t in store.check_tasks(project_id)}
        found = fetch_changes(studio, project_id, {t: r.synced_at for t, r in known.items()}, store.check_counts(),
                              listed_before(store, project_id))
        gone, fetched = found.gone, found.fetched
        users = studio.users() if fetched else {}
        totals = {"added": 0, "updated": 0, "removed": 0}
        with store.transaction() as db:  # all changed tasks or none
            store.forget_check_tasks(gone, db)
            for task in fetched:
                task_id = int(task["id"])
                checks = [parse_check(a, task_id, known[task_id].key, users) for a in task.get("annotations") or []]
                for name, value in store.sync_checks(task_id, checks, task["updated_at"], db).items():
                    totals[name] += value
            remember_listing(store, project_id, found, db)
        summary = {**check_summary(store, project_id, rows), "changed_tasks": len(fetched),
                   "deleted_tasks": len(gone), **totals}
    finally:
        store.close()
        studio.close()
    if gone:
        log.warning("%d check task(s) were deleted in Label Studio; their answers are dropped (push-checks asks "
                    "again about images still sampled)", len(gone))
    log.info(f"{summary['tasks']} check tasks: {summary['checked']} checked ({summary['accepted']} accepted, "
             f"{summary['rejected']} rejected), {summary['pending']} pending"
             + (f", {summary['stale']} of images no longer generated" if summary["stale"] else "")
             + f"; this pull: {totals['added']} new, {totals['updated']} updated, {totals['removed']} removed")
    log_rejections(summary["per_class"], warn_above)
    return summary


def log_rejections(per_class: dict[str, dict[str, int]], warn_above: float) -> None:
    """Each class's rejection rate; a warning where it exceeds ``warn_above`` (the editor fails on that class)."""
    for name, counts in per_class.items():
        if not counts["checked"]:
            continue
        rate = counts["rejected"] / counts["checked"]
        message = f"class {name}: {counts['rejected']} of {counts['checked']} checked images rejected ({rate:.0%})"
        if rate > warn_above:
            log.warning(f"{message}, more than {warn_above:.0%}: the generator is doing something wrong for this "
                        "class; look at its rejected images before training on its counterfactuals")
        else:
            log.info(message)
