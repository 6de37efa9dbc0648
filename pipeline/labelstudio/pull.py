"""``pull``: mirror the annotations of the run's tasks into the run's database.

Incremental: one light listing of the project's tasks (ids, ``updated_at``, annotation counts) tells which
tasks changed since they were last mirrored; only those are fetched with their annotations (a first pull, which
needs them all, asks once for everything). Idempotent: a
task is mirrored to exactly Label Studio's state (new, edited, deleted and skipped annotations alike), so
pulling twice leaves the same database. A task that vanished from Label Studio stops the pull with a clear
message unless ``--accept-deleted`` says to record that; its stored annotations are kept either way.

What a pull reports is counted against what the run's pulls have reported before, not against the stored rows:
an answer the ML backend's webhook stored first is *new* to the first pull that sees it, *updated* means changed
since a pull last saw it, and annotators are named the same way whoever stored the answer (by e-mail; rows a
webhook had to store under a bare user id are named by the next pull).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.core.config import option
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.labelstudio.client import TASK_ANNOTATIONS, TASK_COUNTS, TASK_FULL, Settings, Studio
from pipeline.labelstudio.schema import parse_annotation
from pipeline.slim.consensus import krippendorff_alpha, votes_of

log = logging.getLogger(__name__)
SHOWN_IDS = 5  # deleted task ids named in the error; the count says the rest
# share of never-mirrored tasks from which one full listing beats a light one plus a fetch of the changed
# tasks: the full listing costs about what fetching all tasks does, the light one a fifth of that on top
FULL_LISTING_SHARE = 0.5


@dataclass(frozen=True)
class PullOptions:
    """How ``pull`` treats what it finds; the fields are :func:`pull_run`'s keyword arguments."""

    accept_deleted: bool = option(False, "record tasks deleted in Label Studio as deleted instead of stopping")


def nothing_pushed(run: Run, command: str) -> PipelineError:
    """The error of a pull before the first ``command`` (push or push-checks)."""
    return PipelineError(f"nothing pushed from {run.root} yet; run `python -m pipeline {command} --run {run.root}`")


def remembered_project(run: Run, store: AnnotationStore, meta_key: str, command: str) -> int:
    """The project the run's ``command`` made (its id under ``meta_key``)."""
    project = store.get_meta(meta_key)
    if project is None:
        raise nothing_pushed(run, command)
    return int(project)


def changed_tasks(listing: dict[int, dict], synced: dict[int, str | None],
                  counts: dict[int, int]) -> tuple[list[int], list[int]]:
    """(gone, changed) among the recorded tasks ``synced`` (task id -> ``updated_at`` last mirrored): those
    missing from Label Studio's ``listing`` (task id -> task), and those whose ``updated_at`` moved or whose
    number of annotations (``counts``: as the last pull of the task saw them, skipped included) differs --
    deleting an annotation does not always move ``updated_at``."""
    gone = sorted(set(synced) - set(listing))
    changed = [
        task_id for task_id, synced_at in synced.items()
        if task_id in listing and (
            listing[task_id]["updated_at"] != synced_at
            or counts.get(task_id, 0) != listing[task_id]["total_annotations"]
            + listing[task_id]["cancelled_annotations"]
        )
    ]
    return gone, changed


def fetch_changes(studio: Studio, project_id: int, synced: dict[int, str | None],
                  counts: dict[int, int]) -> tuple[list[int], list[int], list[dict]]:
    """(gone, changed, the changed tasks with their annotations) for the recorded tasks ``synced``.

    Usually one light listing (ids, times, counts) decides and only the changed tasks are then fetched in full.
    When most tasks were never mirrored (the first pull), nearly all of them would be fetched anyway: one full
    listing then both decides and delivers, instead of a light listing followed by a full one.
    """
    never = sum(synced_at is None for synced_at in synced.values())
    if synced and never >= FULL_LISTING_SHARE * len(synced):
        listing = {int(t["id"]): t for t in studio.list_tasks(project_id, fields=TASK_FULL)}
        gone, changed = changed_tasks(listing, synced, counts)
        return gone, changed, [listing[task_id] for task_id in changed]
    listing = {int(t["id"]): t for t in studio.list_tasks(project_id, fields=TASK_COUNTS)}
    gone, changed = changed_tasks(listing, synced, counts)
    return gone, changed, list(studio.list_tasks(project_id, task_ids=changed, fields=TASK_ANNOTATIONS))


def pull_run(run: Run, settings: Settings, accept_deleted: bool = False) -> dict:
    """Mirror changed tasks' annotations; returns the summary it prints."""
    if not run.labels_path.exists():  # checked first: opening the store would create the file
        raise nothing_pushed(run, "push")
    store = AnnotationStore(run.labels_path)
    studio = Studio(settings)
    try:
        project_id = remembered_project(run, store, "project_id", "push")
        studio.connect()
        studio.project(project_id)
        known = {t.task_id: t for t in store.tasks(project_id)}
        # read before Label Studio is asked: a task the ML backend's webhooks write meanwhile differs from this
        before = store.annotation_rows(known)
        gone, changed, fetched = fetch_changes(studio, project_id, {t: r.synced_at for t, r in known.items()},
                                               store.pulled_counts())
        if gone and not accept_deleted:
            shown = ", ".join(map(str, gone[:SHOWN_IDS])) + (" ..." if len(gone) > SHOWN_IDS else "")
            raise PipelineError(
                f"{len(gone)} task(s) of this run were deleted in Label Studio (ids {shown}); stored annotations "
                "are kept — re-run pull with --accept-deleted to record the deletion (push then re-creates them)"
            )
        # annotators are named by e-mail; rows stored under a bare user id (a webhook that could not ask Label
        # Studio) are named too, whichever task they belong to
        users = studio.users() if fetched or store.unnamed_annotators() else {}
        totals = {"added": 0, "updated": 0, "removed": 0}
        if gone:
            store.mark_tasks_deleted(gone)
        with store.transaction() as db:  # all changed tasks or none
            # the ML backend's webhooks write too; a task they wrote while this pull was fetching holds news the
            # fetch may predate: keep what they wrote, and let the next pull mirror that task afresh
            touched = {t for t, rows in store.annotation_rows(changed, db).items() if rows != before[t]}
            store.forget_sync(touched, db)
            for task in fetched:
                task_id = int(task["id"])
                if task_id in touched:
                    continue
                annotations = [parse_annotation(a, task_id, known[task_id].image_id, users)
                               for a in task.get("annotations") or []]
                for key, value in store.sync_task_annotations(task_id, annotations, task["updated_at"], db).items():
                    totals[key] += value
            named = store.rename_annotators({name: users[int(name)] for name in store.unnamed_annotators()
                                             if int(name) in users}, db)
        summary = {**store.summary(), "changed_tasks": len(fetched), "deleted_tasks": len(gone),
                   "deferred_tasks": len(touched), "annotators_named": named, **totals}
        if summary["images_answered_more_than_once"]:
            summary["alpha"] = krippendorff_alpha(votes_of(store.annotations()))
    finally:
        store.close()
        studio.close()
    choices = summary["choices"]
    overlap = summary["images_answered_more_than_once"]
    agreement = "" if not overlap else (f", {overlap} answered more than once, Krippendorff's alpha "
                                        + ("n/a" if summary["alpha"] is None else f"{summary['alpha']:.2f}"))
    log.info(f"{summary['tasks']} tasks, {summary['annotated_images']} images annotated{agreement}; "
             f"{summary['annotations']} answers (core {choices['core']}, spurious {choices['spurious']}, unsure "
             f"{choices['unsure']}; skipped {summary['skipped']}); annotators: "
             f"{', '.join(summary['annotators']) or 'none'}; "
             f"this pull: {totals['added']} new, {totals['updated']} updated, {totals['removed']} removed"
             + (f"; {len(touched)} task(s) written by the ML backend meanwhile, mirrored by the next pull"
                if touched else "")
             + (f"; {named} answer(s) stored under a user id now named by e-mail" if named else ""))
    return summary
