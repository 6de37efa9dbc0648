"""simulate-annotator as a team: distinct Label Studio users with their own tokens, overlap respected, boxes.

The Label Studio tests share the session's server (``labelstudio`` in conftest); the dealing, noise and box
geometry are checked without one.
"""

from __future__ import annotations

import json
import logging
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.core.data import load_dataset, load_mask
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.labelstudio.annotator import (
    LEAD_TIME_LIMITS_S,
    TEAM,
    deal,
    mask_box,
    member_email,
    noise_per_annotator,
    simulate_annotator,
    team_path,
)
from pipeline.labelstudio.client import Settings, Studio
from pipeline.labelstudio.pull import pull_run
from pipeline.labelstudio.push import push_run


def open_task(task_id: int, overlap: int = 2, annotators: tuple[int, ...] = (), skipped: int = 0) -> dict:
    return {"id": task_id, "overlap": overlap, "annotators": list(annotators), "data": {"image_id": 100 + task_id},
            "total_annotations": len(annotators) - skipped, "cancelled_annotations": skipped}


def test_dealing_spreads_evenly_never_asks_twice_and_is_seeded() -> None:
    tasks = [open_task(i) for i in range(12)]
    dealt = deal(tasks, [5, 6, 7], seed=0, entropy=lambda data: data["image_id"])
    assert all(len(set(users)) == 2 for users in dealt.values()) and len(dealt) == 12
    assert set(Counter(u for users in dealt.values() for u in users).values()) == {8}  # 24 answers, 3 people
    assert dealt == deal(tasks, [5, 6, 7], seed=0, entropy=lambda data: data["image_id"])
    assert dealt != deal(tasks, [5, 6, 7], seed=1, entropy=lambda data: data["image_id"])
    # what is there counts: a full task, a half-answered one (never its annotator again), a skip, overlap 1
    partial = [open_task(0, annotators=(5, 6)), open_task(1, annotators=(5,)), open_task(2, annotators=(9,), skipped=1),
               open_task(3, overlap=1), open_task(4, overlap=3, annotators=(6,))]
    dealt = deal(partial, [5, 6, 7], seed=0, entropy=lambda data: data["image_id"])
    assert 0 not in dealt and len(dealt[1]) == 1 and 5 not in dealt[1]
    assert len(dealt[2]) == 1 and len(dealt[3]) == 1 and sorted(dealt[4]) == [5, 7]


def test_noise_counts_and_boxes_are_checked() -> None:
    assert noise_per_annotator(0.1, 3) == [0.1] * 3 and noise_per_annotator([0.0, 0.5], 2) == [0.0, 0.5]
    for noise, k, message in (([0.1, 0.2], 3, "--noise has 2 values for 3 annotators"),
                              ([1.5], 1, r"--noise must be fractions in \[0, 1\]"),
                              ([0.0], 0, "--annotators must be at least 1")):
        with pytest.raises(PipelineError, match=message):
            noise_per_annotator(noise, k)
    mask = np.zeros((32, 32), bool)
    mask[4:10, 20:30] = True
    assert mask_box(mask) == {"x": 62.5, "y": 12.5, "width": 31.25, "height": 18.75}
    rng = np.random.default_rng(0)
    for _ in range(200):  # jittered boxes move, but stay in the image and at least a pixel in size
        box = mask_box(mask, 0.5, rng)
        assert 0 <= box["x"] and box["x"] + box["width"] <= 100 + 1e-9 and box["width"] >= 100 / 32 - 1e-9
        assert 0 <= box["y"] and box["y"] + box["height"] <= 100 + 1e-9 and box["height"] >= 100 / 32 - 1e-9
    assert mask_box(mask, 0.05, np.random.default_rng(1)) != mask_box(mask)


def test_mismatched_noise_is_one_line(trained_run: Path, capsys) -> None:
    code = main(["simulate-annotator", "--run", str(trained_run), "--url", "http://127.0.0.1:9", "--api-key",
                 "unused-key-123", "--annotators", "3", "--noise", "0", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--noise has 2 values for 3 annotators" in err


def answers_in_label_studio(settings: Settings, project: int) -> dict[int, list[int]]:
    """Task id -> the user ids of its annotations, as Label Studio holds them."""
    with Studio(settings) as studio:
        tasks = studio.list_tasks(project, fields=("id", "annotations", "completed_by"))
        return {int(t["id"]): [a["completed_by"] for a in t["annotations"]] for t in tasks}


def test_team_answers_as_distinct_users_as_often_as_asked(sampled_run: Path, settings: Settings, caplog) -> None:
    run = Run(sampled_run)
    project = push_run(run, settings, annotations_per_task=2, progress=False)["project_id"]
    caplog.set_level(logging.DEBUG)
    counts = simulate_annotator(run, settings, annotators=3, noise=[0.0, 0.0, 1.0], progress=False)
    assert counts["core"] + counts["spurious"] == 16 and counts["boxes"] == 16  # each boxes, as instructed

    answered = answers_in_label_studio(settings, project)
    assert len(answered) == 8 and all(len(users) == 2 == len(set(users)) for users in answered.values())
    users = Counter(u for us in answered.values() for u in us)
    assert len(users) == 3 and set(users.values()) <= {5, 6}  # three people, equal shares
    with Studio(settings) as studio:
        admin, emails = studio.user.id, studio.users()
    careful, steady, contrary = (member_email(TEAM, k) for k in (1, 2, 3))
    assert admin not in users and {emails[u] for u in users} == {careful, steady, contrary}

    # their logins: private, one token per user, never in the log
    path = team_path(run)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    team = json.loads(path.read_text())["servers"][settings.url]
    tokens = {member["token"] for member in team.values()}
    assert len(tokens) == 3 and settings.api_key not in tokens
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert not any(secret in logged for member in team.values() for secret in (member["token"], member["password"]))

    # a re-run adds nothing, also when the team file is gone (the users are logged into again, not duplicated)
    path.unlink()
    again = simulate_annotator(run, settings, annotators=3, noise=[0.0, 0.0, 1.0], progress=False)
    assert again["core"] + again["spurious"] == 0 and answers_in_label_studio(settings, project) == answered
    with Studio(settings) as studio:
        assert len(studio.users()) == len(emails)

    summary = pull_run(run, settings)
    assert summary["added"] == 16 and summary["images_answered_more_than_once"] == 8
    stored = AnnotationStore(run.labels_path).annotations()
    pace = {name: [a.lead_time for a in stored if a.annotator == name] for name in team}
    assert all(LEAD_TIME_LIMITS_S[0] <= t <= LEAD_TIME_LIMITS_S[1] for times in pace.values() for t in times)
    assert main(["propagate", "--run", str(sampled_run), "--quiet"]) == 0
    quality = json.loads(run.metrics_path.read_text())["annotation"]["annotators"]
    accuracy = {name: quality[name]["estimated_accuracy"] for name in team}
    assert min(accuracy, key=accuracy.get) == contrary, accuracy
    assert accuracy[contrary] < 0.5 < min(accuracy[careful], accuracy[steady]), accuracy


def test_boxes_are_drawn_from_the_masks_as_the_instructions_ask(sampled_run: Path, settings: Settings) -> None:
    run = Run(sampled_run)
    push_run(run, settings, progress=False)
    counts = simulate_annotator(run, settings, progress=False)
    assert counts["boxes"] == 8
    pull_run(run, settings)
    image_set = load_dataset(run.load_config().data.root)
    for annotation in AnnotationStore(run.labels_path).annotations():
        mask = load_mask(image_set.root / image_set.samples[annotation.image_id].mask_filename, 32)
        assert annotation.boxes == [{**mask_box(mask), "rotation": 0}]
