"""push-checks / pull-checks against a real Label Studio: people check generated images, rejected ones are never
trained on."""

from __future__ import annotations

import csv
import logging
import math
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
from PIL import Image
from test_labelstudio import digest

from pipeline.cli import main
from pipeline.core.config import RetrainConfig
from pipeline.core.data import load_dataset, load_mask, load_rgb
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.labelstudio.client import Settings, Studio
from pipeline.labelstudio.schema import choice_result
from pipeline.labelstudio.verify import CHECK_NAMES, pull_checks, push_checks, sample_rows
from pipeline.slim.counterfactual import load_counterfactuals


def manifest(run: Path) -> list[dict[str, str]]:
    with (run / "counterfactuals" / "metadata.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def expected_sample_size(rows: list[dict[str, str]]) -> int:
    """5 % of all, spread over the classes by size (rounded up), at least 10 per class or all it has."""
    wanted = math.ceil(0.05 * len(rows))
    sizes = [sum(int(r["y"]) == y for r in rows) for y in {int(r["y"]) for r in rows}]
    return sum(min(n, max(10, math.ceil(wanted * n / len(rows)))) for n in sizes)


def check_tasks(run: Path) -> dict[str, int]:
    """key -> task id, as recorded."""
    store = AnnotationStore(run / "labels.sqlite")
    try:
        return {t.key: t.task_id for t in store.check_tasks()}
    finally:
        store.close()


def test_push_checks_creates_the_sample_once_with_the_pictures(generated: Path, settings: Settings) -> None:
    rows = manifest(generated)
    first = push_checks(Run(generated), settings, progress=False)
    assert first["created"] == first["sampled"] == expected_sample_size(rows)
    studio = Studio(settings)
    project = studio.project(first["project_id"])
    assert project.title.endswith(" counterfactual check") and project.title.startswith("SLIM run ")
    tasks = list(studio.list_tasks(first["project_id"]))
    by_key = {r["key"]: r for r in rows}
    assert sorted(t["data"]["key"] for t in tasks) == sorted(check_tasks(generated))
    names = ["disc", "triangle"]
    for task in tasks[:3]:  # the question names the class; the picture served is exactly the generated file
        row = by_key[task["data"]["key"]]
        assert task["data"]["question"] == f"Does this still show a {names[int(row['y'])]}?"
        served = studio.get(task["data"]["image"])
        assert served.status_code == 200
        assert served.content == (generated / "counterfactuals" / row["img_filename"]).read_bytes()

    uploads = AnnotationStore(generated / "labels.sqlite").uploads(first["project_id"])
    again = push_checks(Run(generated), settings, progress=False)
    assert (again["created"], again["already_present"]) == (0, first["sampled"])
    assert AnnotationStore(generated / "labels.sqlite").uploads(first["project_id"]) == uploads
    with closing(sqlite3.connect(generated / "labels.sqlite")) as db, db:  # as if killed right after the import
        db.execute("DELETE FROM check_tasks")
    recovered = push_checks(Run(generated), settings, progress=False)
    assert (recovered["created"], recovered["adopted"]) == (0, first["sampled"])
    assert len(list(studio.list_tasks(first["project_id"]))) == first["sampled"]


def test_a_no_is_pulled_and_leaves_training_until_it_is_edited_to_yes(generated: Path, settings: Settings,
                                                                      caplog) -> None:
    run_ = Run(generated)
    config = run_.load_config()
    pushed = push_checks(run_, settings, progress=False)
    keys = check_tasks(generated)
    rows = {r["key"]: r for r in manifest(generated)}
    rejected = next(k for k in keys if rows[k]["y"] == "0")
    accepted = next(k for k in keys if rows[k]["y"] == "1")
    client = Studio(settings).client  # as an annotator in the labeling UI would: the SDK's annotation calls
    no = client.annotations.create(id=keys[rejected], result=choice_result("no", CHECK_NAMES), lead_time=3.0)
    client.annotations.create(id=keys[accepted], result=choice_result("yes", CHECK_NAMES), lead_time=2.0)

    caplog.set_level(logging.INFO, logger="pipeline")
    summary = pull_checks(run_, settings)
    assert (summary["checked"], summary["accepted"], summary["rejected"]) == (2, 1, 1)
    assert summary["pending"] == pushed["sampled"] - 2 and summary["added"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("class disc: 1 of 1 checked images rejected (100%)") for m in warnings)
    assert not any("class triangle" in m for m in warnings)
    training = load_counterfactuals(run_, config)
    assert rejected not in training.keys and accepted in training.keys
    assert (len(training), training.rejected) == (len(rows) - 1, 1)

    before = digest(generated / "labels.sqlite")
    again = pull_checks(run_, settings)
    assert again["changed_tasks"] == 0 and digest(generated / "labels.sqlite") == before
    assert {k: again[k] for k in ("checked", "accepted", "rejected", "pending")} == \
        {k: summary[k] for k in ("checked", "accepted", "rejected", "pending")}

    client.annotations.update(id=no.id, result=choice_result("yes", CHECK_NAMES))
    edited = pull_checks(run_, settings)
    assert (edited["updated"], edited["rejected"], edited["accepted"]) == (1, 0, 2)
    training = load_counterfactuals(run_, config)
    assert rejected in training.keys and (len(training), training.rejected) == (len(rows), 0)
    client.annotations.delete(id=no.id)
    assert pull_checks(run_, settings)["removed"] == 1


def test_after_a_regeneration_only_new_keys_are_pushed(generated: Path, settings: Settings) -> None:
    first = push_checks(Run(generated), settings, progress=False)
    before = set(check_tasks(generated))
    regenerated = str(2 * RetrainConfig.counterfactual_share)  # more images than the default made: new keys
    assert main(["counterfactuals", "--run", str(generated), "--counterfactual-share", regenerated, "--quiet"]) == 0
    sample = {r["key"] for r in sample_rows(manifest(generated), None, 0)}
    again = push_checks(Run(generated), settings, progress=False)
    assert again["project_id"] == first["project_id"]
    assert (again["created"], again["already_present"]) == (len(sample - before), len(sample & before))
    assert again["created"] > 0 and set(check_tasks(generated)) == before | sample


def test_simulated_annotator_answers_the_checks_by_the_masks(generated: Path, settings: Settings) -> None:
    run_ = Run(generated)
    pushed = push_checks(run_, settings, progress=False)
    attention_answers = AnnotationStore(run_.labels_path).annotations()  # the fixture's boxed answers
    rows = {r["key"]: r for r in manifest(generated)}
    broken = generated / "counterfactuals" / rows[next(iter(check_tasks(generated)))]["img_filename"]
    picture = np.asarray(Image.open(broken)).copy()
    picture[:, :] = picture[0, 0]  # an edit that lost the object: one flat colour
    Image.fromarray(picture).save(broken)
    flags = ["--run", str(generated), "--url", settings.url, "--api-key", settings.api_key, "--quiet"]
    assert main(["simulate-annotator", "--checks", *flags]) == 0
    assert main(["pull-checks", *flags]) == 0
    image_set = load_dataset(run_.load_config().data.root)
    expected = {}
    for key in check_tasks(generated):  # recomputed here: the share of the donor's object left untouched
        donor = image_set.samples[int(rows[key]["donor"])]
        made = load_rgb(generated / "counterfactuals" / rows[key]["img_filename"], 32)
        original = load_rgb(image_set.root / donor.filename, 32)
        mask = load_mask(image_set.root / donor.mask_filename, 32)
        kept = (np.abs(made - original).max(axis=2) <= 1 / 255)[mask].mean()
        expected[key] = bool(kept >= 0.5)
    store = AnnotationStore(run_.labels_path)
    assert store.counterfactual_checks() == expected and len(expected) == pushed["sampled"]
    assert set(expected.values()) == {True, False}  # intact edits and the broken one: the rule tested both ways
    assert store.annotations() == attention_answers  # never mixed with the attention answers
