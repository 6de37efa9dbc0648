"""Disagreement drives the next round, against a real Label Studio and a simulated team of three users.

Round 1 asks two of three people per task; one of them answers the opposite of the truth. ``sample --round 2``
puts the split images first, ``push`` reopens their tasks for one more answer, and Label Studio's own label
stream then offers each reopened task only to the one person who has not answered it.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.cli import main
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.labelstudio.annotator import TEAM, assemble_team, simulate_annotator, team_path
from pipeline.labelstudio.client import Settings, Studio
from pipeline.labelstudio.pull import pull_run
from pipeline.labelstudio.push import push_run

TEAM_SIZE = 3


def answered_by(studio: Studio, project: int) -> dict[int, list[int]]:
    """Task id -> the user ids that answered it, as Label Studio records them."""
    return {int(t["id"]): sorted(t["annotators"]) for t in studio.list_tasks(project, fields=("id", "annotators"))}


def next_task_for(settings: Settings, token: str, project: int) -> int | None:
    """The task Label Studio's label stream would give this user now (None: nothing left for them)."""
    with Studio(Settings(settings.url, token, settings.retry)) as member:
        response = member.http.get(f"/api/projects/{project}/next/")
    return int(response.json()["id"]) if response.status_code == 200 else None


def test_split_images_are_asked_again_of_the_person_who_has_not_answered(sampled_run: Path,
                                                                       settings: Settings) -> None:
    run = Run(sampled_run)
    project = push_run(run, settings, annotations_per_task=2, progress=False)["project_id"]
    simulate_annotator(run, settings, annotators=TEAM_SIZE, noise=[0.0, 0.0, 1.0], progress=False)
    pull_run(run, settings)
    with Studio(settings) as studio:
        members = assemble_team(studio, TEAM, TEAM_SIZE, team_path(run))
        before = answered_by(studio, project)
    contrary = members[2].user_id
    split = {task for task, users in before.items() if contrary in users}  # the truth against its opposite
    assert 0 < len(split) < len(before)

    assert main(["sample", "--run", str(sampled_run), "--per-class", "4", "--round", "2", "--quiet"]) == 0
    with (sampled_run / "selection_round2.csv").open() as handle:
        second = list(csv.DictReader(handle))
    reasked = [r for r in second if r["reask"] == "1"]
    assert second[:len(reasked)] == reasked  # contested first, the split ones (agreement 1/2) before the rest
    task_of = {t.image_id: t.task_id for t in AnnotationStore(run.labels_path).tasks(project)}
    reopen = [task_of[int(r["image_id"])] for r in reasked]
    assert set(reopen[:len(split)]) == split

    pushed = push_run(run, settings, annotations_per_task=2, progress=False)
    assert pushed["reopened"] == len(reopen)
    assert push_run(run, settings, annotations_per_task=2, progress=False)["reopened"] == 0  # idempotent

    # Label Studio deals a reopened task to nobody who answered it: the contrary member (who answered every split
    # task) is offered none of them; each of the other two gets one they have not seen
    offered = {member.user_id: next_task_for(settings, member.token, project) for member in members}
    assert offered[contrary] not in split
    for member in members:
        if offered[member.user_id] in reopen:
            assert member.user_id not in before[offered[member.user_id]]
    assert any(task in split for task in offered.values())

    simulate_annotator(run, settings, annotators=TEAM_SIZE, noise=[0.0, 0.0, 1.0], progress=False)
    with Studio(settings) as studio:
        after = answered_by(studio, project)
    for task, users in after.items():
        if task in reopen:  # one more answer, from the member who had not answered: all three, once each
            assert sorted(users) == sorted(member.user_id for member in members)
        elif task in before:
            assert users == before[task]
    summary = pull_run(run, settings)
    assert summary["images_answered_more_than_once"] >= len(before)
