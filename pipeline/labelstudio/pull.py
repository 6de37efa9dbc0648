"""``pull``: mirror the annotations of the run's tasks into the run's database.

Incremental: the project's counts and a listing of the tasks updated since the last pull tell which tasks
changed since they were last mirrored (a light listing of every task when the counts say something else moved);
only those are fetched with their annotations (a first pull, which needs them all, asks once for everything).
Idempotent: a task is mirrored to exactly Label Studio's state (new, edited, deleted and skipped annotations
alike), so pulling twice leaves the same answers (a pull also records when it listed, for the next one). A task that vanished from Label Studio stops the pull with a clear
message unless ``--accept-deleted`` says to record that; its stored annotations are kept either way.

What a pull reports is counted against what the run's pulls have reported before, not against the stored rows:
an answer the ML backend's webhook stored first is *new* to the first pull that sees it, *updated* means changed
since a pull last saw it, and annotators are named the same way whoever stored the answer (by e-mail; rows a
webhook had to store under a bare user id are named by the next pull).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pipeline.core.config import option
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.labelstudio.client import (
    TASK_ANNOTATIONS,
    TASK_COUNTS,
    TASK_FULL,
    ProjectCounts,
    Settings,
    Studio,
)
from pipeline.labelstudio.schema import parse_annotation
from pipeline.slim.consensus import krippendorff_alpha, votes_of

log = logging.getLogger(__name__)
SHOWN_IDS = 5  # deleted task ids named in the error; the count says the rest
# share of never-mirrored tasks from which one full listing beats a light one plus a fetch of the changed
# tasks: the full listing costs about what fetching all tasks does, the light one a fifth of that on top
FULL_LISTING_SHARE = 0.5
# a task saved just before a pull's listing but committed just after it bears an ``updated_at`` earlier than the
# newest the listing showed: the next pull lists from this long before that time. Label Studio stamps an edited
# answer's task at the end of the request, milliseconds before it commits; its bulk actions, which can run for
# many seconds, add or delete answers, and the project's counts catch those whatever their time.
UPDATED_SINCE_MARGIN = timedelta(seconds=60)
LISTING_KEY_PREFIX = "listed_at/"  # store meta key of a project's last listing time, before the project id


@dataclass(frozen=True)
class PullOptions:
    """How ``pull`` treats what it finds; the fields are :func:`pull_run`'s keyword arguments."""

    accept_deleted: bool = option(False, "record tasks deleted in Label Studio as deleted instead of stopping")


@dataclass(frozen=True)
class Changes:
    """What a pull found: recorded tasks gone from Label Studio, those changed, the changed ones with their
    annotations, and when Label Studio was asked (its clock; the next pull lists what was updated since)."""

    gone: list[int]
    changed: list[int]
    fetched: list[dict]
    listed_at: datetime | None


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


def fetch_changes(studio: Studio, project_id: int, synced: dict[int, str | None], counts: dict[int, int],
                  listed_before: datetime | None) -> Changes:
    """What changed among the recorded tasks ``synced`` (task id -> ``updated_at`` last mirrored), ``counts``
    being their answers as last mirrored and ``listed_before`` when the previous pull began to list (its
    :attr:`Changes.listed_at`).

    Usually only the tasks updated since then are listed (:func:`recently_updated`), and only the changed ones
    are then fetched in full; a light listing of every task when the project's counts say something else moved.
    When most tasks were never mirrored (the first pull), nearly all of them would be fetched anyway: one full
    listing then both decides and delivers.
    """
    totals = studio.project_counts(project_id)  # before any listing: see recently_updated
    never = [task_id for task_id, synced_at in synced.items() if synced_at is None]
    if synced and len(never) >= FULL_LISTING_SHARE * len(synced):
        listing = {int(t["id"]): t for t in studio.list_tasks(project_id, fields=TASK_FULL)}
        gone, changed = changed_tasks(listing, synced, counts)
        return Changes(gone, changed, [listing[task_id] for task_id in changed], totals.counted_at)
    recent = recently_updated(studio, project_id, synced, counts, never, totals, listed_before)
    if recent is None:
        listing = {int(t["id"]): t for t in studio.list_tasks(project_id, fields=TASK_COUNTS)}
        gone, changed = changed_tasks(listing, synced, counts)
    else:
        gone, changed = [], changed_tasks(recent, {task_id: synced[task_id] for task_id in recent}, counts)[1]
    return Changes(gone, changed, list(studio.list_tasks(project_id, task_ids=changed, fields=TASK_ANNOTATIONS)),
                   totals.counted_at)


def server_time(stamp: str) -> datetime:
    """A time Label Studio wrote (ISO 8601; its server runs in UTC, so a time without a zone is UTC)."""
    moment = datetime.fromisoformat(stamp)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def recently_updated(studio: Studio, project_id: int, synced: dict[int, str | None], counts: dict[int, int],
                     never: list[int], totals: ProjectCounts, listed_before: datetime | None) -> dict[int, dict] | None:
    """The recorded tasks that can have changed since they were last mirrored (task id -> light listing), or
    None when the project's counts (``totals``) say that something else changed too, so every task must be listed.

    Listing every task costs Label Studio ~0.7 ms a task (a third of a JSON export) even when nothing changed.
    But every change to a task's answers moves its ``updated_at``, except a deletion, which lowers the project's
    count of answers, and a deleted task lowers its count of tasks. So it is enough to list the tasks updated
    since the previous pull began to list (``listed_before``; else since the newest ``updated_at`` mirrored),
    less :data:`UPDATED_SINCE_MARGIN`, and those never mirrored; and to check that the project's counts equal the
    mirror's with those tasks' listed counts in place of their stored ones. The counts are read before the
    listing: an answer given during it makes them disagree (every task is then listed), and one deleted during
    it is caught by the next pull's counts.
    """
    try:
        since = listed_before or max(server_time(s) for s in synced.values() if s is not None)
    except ValueError:  # nothing mirrored yet, or a time this code cannot read: check every task
        return None
    listed = {int(t["id"]): t for t in studio.list_tasks(project_id, fields=TASK_COUNTS,
                                                         updated_since=since - UPDATED_SINCE_MARGIN)}
    unlisted = [task_id for task_id in never if task_id not in listed]
    listed.update({int(t["id"]): t for t in studio.list_tasks(project_id, task_ids=unlisted, fields=TASK_COUNTS)})
    recent = {task_id: task for task_id, task in listed.items() if task_id in synced}
    answers = sum(counts.get(task_id, 0) for task_id in synced if task_id not in recent) + sum(
        task["total_annotations"] + task["cancelled_annotations"] for task in recent.values())
    return recent if (totals.tasks, totals.answers) == (len(synced), answers) else None


def listing_key(project_id: int) -> str:
    """Where the store keeps when the last pull of ``project_id`` began to list (its server's clock)."""
    return f"{LISTING_KEY_PREFIX}{project_id}"


def listed_before(store: AnnotationStore, project_id: int) -> datetime | None:
    """When the last pull of ``project_id`` that was stored began to list; None before the first."""
    stamp = store.get_meta(listing_key(project_id))
    return None if stamp is None else server_time(stamp)


def remember_listing(store: AnnotationStore, project_id: int, changes: Changes, db) -> None:
    """Keep when this pull listed, in the transaction that stores what it found: a pull that fails stores
    neither, so the next one lists from the last time that was stored."""
    if changes.listed_at is not None:
        store.set_meta(listing_key(project_id), changes.listed_at.isoformat(), db)


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
        found = fetch_changes(studio, project_id, {t: r.synced_at for t, r in known.items()}, store.pulled_counts(),
                              listed_before(store, project_id))
        gone, changed, fetched = found.gone, found.changed, found.fetched
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
            remember_listing(store, project_id, found, db)
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
