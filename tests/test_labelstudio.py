"""push / simulate-annotator / pull against a real Label Studio server (started once per session)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import sqlite3
import time
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

import label_config
from pipeline.cli import main
from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.data import load_dataset, load_mask
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.core.verdicts import verdict
from pipeline.labelstudio import client, pull
from pipeline.labelstudio.annotator import decide, simulate_annotator
from pipeline.labelstudio.client import Settings, Studio
from pipeline.labelstudio.pull import pull_run
from pipeline.labelstudio.push import push_run
from pipeline.labelstudio.schema import ANSWER, choice_result
from pipeline.labelstudio.server import free_port
from pipeline.slim.prelabel import attention_prior


def selection(run: Path) -> list[dict[str, str]]:
    with (run / "selection_round1.csv").open() as handle:
        return list(csv.DictReader(handle))


def project_of(run: Path) -> int:
    store = AnnotationStore(run / "labels.sqlite")
    try:
        return int(store.get_meta("project_id"))
    finally:
        store.close()


def stored(run: Path) -> list[tuple]:
    with closing(sqlite3.connect(run / "labels.sqlite")) as db, db:
        return db.execute("SELECT * FROM annotations ORDER BY annotation_id").fetchall()


def digest(path: Path) -> str:
    """The store's content, less when the last pull began to list (every pull records that, changed or not)."""
    with closing(sqlite3.connect(path)) as db, db:
        dump = "\n".join(line for line in db.iterdump() if f"'{pull.LISTING_KEY_PREFIX}" not in line)
    return hashlib.sha256(dump.encode()).hexdigest()


def expected_answers(run: Path) -> dict[int, str]:
    """What the mask rule says for each selected image, computed independently of Label Studio."""
    config = Run(run).load_config()
    image_set = load_dataset(config.data.root)
    arrays = AttentionArrays.load(run / "attention.npz")
    answers = {}
    for row in selection(run):
        image_id = int(row["image_id"])
        mask = load_mask(image_set.root / image_set.samples[image_id].mask_filename, 32)
        answers[image_id] = decide(arrays.cam[arrays.row_of(image_id)], mask, 0.8)[0]
    return answers


def test_push_creates_exactly_the_selection_with_predictions(sampled_run: Path, settings: Settings) -> None:
    summary = push_run(Run(sampled_run), settings, progress=False)
    assert summary["created"] == 8 and summary["already_present"] == 0
    studio = Studio(settings)
    project = studio.project(summary["project_id"])  # annotators get the threshold and the instructions
    assert "CAM ≥ 0.8" in project.label_config and label_config.THRESHOLD_MARK not in project.label_config
    assert project.show_instruction and "<b>spurious</b>" in project.expert_instruction
    tasks = list(studio.list_tasks(summary["project_id"],
                                   fields=("id", "data", "predictions", "result", "score", "model_version")))
    assert sorted(t["data"]["image_id"] for t in tasks) == sorted(int(r["image_id"]) for r in selection(sampled_run))
    arrays = AttentionArrays.load(sampled_run / "attention.npz")
    for task in tasks:
        assert task["data"]["class_name"] in ("disc", "triangle") and task["data"]["round"] == 1
        (prediction,) = task["predictions"]
        (item,) = prediction["result"]
        p_core = float(attention_prior(arrays.cam[[arrays.row_of(task["data"]["image_id"])]])[0])
        assert item["from_name"] == ANSWER and item["value"]["choices"] == [verdict(p_core)]
        assert prediction["score"] == pytest.approx(max(p_core, 1 - p_core), abs=1e-4)
        assert prediction["model_version"].startswith("slim-prior-")
        for key in ("image", "attention"):  # the pictures are served by Label Studio itself
            response = studio.get(task["data"][key])
            assert response.status_code == 200 and response.content[:4] == b"\x89PNG"


def test_push_twice_adds_no_task_and_no_upload(sampled_run: Path, settings: Settings) -> None:
    first = push_run(Run(sampled_run), settings, progress=False)
    uploads = AnnotationStore(sampled_run / "labels.sqlite").uploads(first["project_id"])
    second = push_run(Run(sampled_run), settings, progress=False)
    assert second["created"] == 0 and second["already_present"] == 8
    assert AnnotationStore(sampled_run / "labels.sqlite").uploads(first["project_id"]) == uploads
    assert len(list(Studio(settings).list_tasks(first["project_id"]))) == 8


def test_push_asks_several_annotators_on_a_share_of_the_tasks(sampled_run: Path, settings: Settings) -> None:
    """--annotations-per-task 3 --overlap-share 0.5: Label Studio's own overlap settings, so half the tasks wait
    for three distinct annotators; pushing again with other settings re-deals them (and --predictions show
    lets annotators see the model's guess), and bad values are refused."""
    summary = push_run(Run(sampled_run), settings, annotations_per_task=3, overlap_share=0.5, progress=False)
    studio = Studio(settings)
    project = studio.project(summary["project_id"])
    assert (project.maximum_annotations, project.overlap_cohort_percentage) == (3, 50)
    assert project.show_collab_predictions is False  # by default annotators do not see the model's guess
    overlaps = sorted(t["overlap"] for t in studio.list_tasks(summary["project_id"], fields=("id", "overlap")))
    assert overlaps == [1] * 4 + [3] * 4
    push_run(Run(sampled_run), settings, annotations_per_task=2, predictions="show", progress=False)
    assert studio.project(summary["project_id"]).show_collab_predictions is True
    tasks = list(studio.list_tasks(summary["project_id"], fields=("id", "overlap")))
    assert {t["overlap"] for t in tasks} == {2}
    for choice in ("core", "spurious"):  # two answers on one task: pull counts one image, two answers
        studio.submit_annotation(tasks[0]["id"], summary["project_id"], choice_result(choice), 3.0)
    pulled = pull_run(Run(sampled_run), settings)
    assert (pulled["annotated_images"], pulled["annotations"], pulled["images_answered_more_than_once"]) == (1, 2, 1)
    assert pulled["alpha"] is None  # both answers are one person's: no agreement between people to measure yet
    for bad, message in (({"annotations_per_task": 0}, "--annotations-per-task must be at least 1"),
                         ({"overlap_share": 1.5}, r"--overlap-share must be in \(0, 1\]"),
                         ({"predictions": "maybe"}, "unknown --predictions 'maybe'; choose hide or show")):
        with pytest.raises(PipelineError, match=message):
            push_run(Run(sampled_run), settings, progress=False, **bad)


def test_push_recovers_tasks_it_imported_but_never_recorded(sampled_run: Path, settings: Settings) -> None:
    first = push_run(Run(sampled_run), settings, progress=False)
    with closing(sqlite3.connect(sampled_run / "labels.sqlite")) as db, db:  # as if killed right after the import
        db.execute("DELETE FROM tasks")
    again = push_run(Run(sampled_run), settings, progress=False)
    assert again["created"] == 0 and again["adopted"] == 8
    assert len(list(Studio(settings).list_tasks(first["project_id"]))) == 8


def test_simulated_answers_are_pulled_exactly_and_pull_is_idempotent(sampled_run: Path, settings: Settings) -> None:
    run = Run(sampled_run)
    push_run(run, settings, progress=False)
    counts = simulate_annotator(run, settings, progress=False)
    assert counts["core"] + counts["spurious"] == 8 and counts["flipped"] == 0
    summary = pull_run(run, settings)
    assert summary["added"] == 8 and summary["annotated_tasks"] == 8
    pulled = {a.image_id: a.choice for a in AnnotationStore(run.labels_path).annotations()}
    assert pulled == expected_answers(sampled_run)
    assert all(a.annotator == "admin@slim.local" and 2 <= a.lead_time <= 8
               for a in AnnotationStore(run.labels_path).annotations())
    before = digest(run.labels_path)
    again = pull_run(run, settings)
    assert again["changed_tasks"] == 0 and digest(run.labels_path) == before
    assert simulate_annotator(run, settings, progress=False)["core"] == 0  # nothing left open


def past_the_server_second() -> None:
    """Sleep into the next whole second. A pull lists from the time its previous one began, read from the server's
    ``Date`` header, which has whole seconds: answers saved in the same second as that pull began would be listed
    again by the next one, which is safe but not what a test of the listing can count on."""
    time.sleep(1.05 - time.time() % 1)


def test_pull_lists_only_what_moved_and_the_counts_catch_a_deletion(sampled_run: Path, settings: Settings,
                                                                    monkeypatch) -> None:
    """With no margin, a pull after which nothing changed lists only what was updated since the previous pull
    began (no task here); an edit or a deletion lists the task it moved; and when the project's counts differ
    from the mirror's (an answer deleted without moving its task's ``updated_at``), the recent tasks are not
    trusted: every task is listed."""
    run = Run(sampled_run)
    push_run(run, settings, progress=False)
    simulate_annotator(run, settings, progress=False)
    past_the_server_second()
    pull_run(run, settings)
    monkeypatch.setattr(pull, "UPDATED_SINCE_MARGIN", timedelta(0))
    listed: list[int] = []
    list_tasks = Studio.list_tasks

    def counting(self, *args, **kwargs):
        for task in list_tasks(self, *args, **kwargs):
            listed.append(int(task["id"]))
            yield task

    monkeypatch.setattr(Studio, "list_tasks", counting)
    assert pull_run(run, settings)["changed_tasks"] == 0
    assert len(set(listed)) < 8
    annotations = {a.task_id: a.annotation_id for a in AnnotationStore(run.labels_path).annotations()}
    studio = Studio(settings)
    edited, removed = sorted(annotations)[:2]
    studio.update_annotation(annotations[edited], choice_result("unsure"))
    listed.clear()
    summary = pull_run(run, settings)
    assert (summary["updated"], summary["changed_tasks"]) == (1, 1), summary
    assert edited in listed and len(set(listed)) < 8, (edited, listed)
    studio.delete_annotation(annotations[removed])
    assert pull_run(run, settings)["removed"] == 1
    assert removed not in {a.task_id for a in AnnotationStore(run.labels_path).annotations()}
    store = AnnotationStore(run.labels_path)
    synced, counts = {t.task_id: t.synced_at for t in store.tasks()}, store.pulled_counts()
    with Studio(settings) as studio:
        project = project_of(sampled_run)
        totals = studio.project_counts(project)
        assert pull.recently_updated(studio, project, synced, counts, [], totals, None) is not None
        # an answer gone from a task that was not updated (how the mirror would differ after such a deletion)
        one_more = {**counts, next(t for t in synced if t not in (edited, removed)): 2}
        assert pull.recently_updated(studio, project, synced, one_more, [], totals, None) is None


def test_listing_by_ids_asks_in_chunks_and_misses_none(sampled_run: Path, settings: Settings, monkeypatch) -> None:
    """Thousands of changed tasks are asked for a chunk of ids at a time (a request line has a size limit)."""
    project = push_run(Run(sampled_run), settings, progress=False)["project_id"]
    monkeypatch.setattr(client, "IDS_PER_QUERY", 3)
    with Studio(settings) as studio:
        ids = sorted(int(t["id"]) for t in studio.list_tasks(project, fields=("id",)))
        assert sorted(int(t["id"]) for t in studio.list_tasks(project, task_ids=ids[1:], fields=("id",))) == ids[1:]
        assert list(studio.list_tasks(project, task_ids=[], fields=("id",))) == []


def test_noise_flips_the_asked_fraction(sampled_run: Path, settings: Settings) -> None:
    run = Run(sampled_run)
    push_run(run, settings, progress=False)
    counts = simulate_annotator(run, settings, noise=1.0, progress=False)
    assert counts["flipped"] == 8
    pull_run(run, settings)
    pulled = {a.image_id: a.choice for a in AnnotationStore(run.labels_path).annotations()}
    flip = {"core": "spurious", "spurious": "core"}
    assert pulled == {k: flip[v] for k, v in expected_answers(sampled_run).items()}


def test_edited_deleted_and_skipped_annotations_are_mirrored(sampled_run: Path, settings: Settings) -> None:
    run = Run(sampled_run)
    push_run(run, settings, progress=False)
    studio = Studio(settings)
    project = project_of(sampled_run)
    task_ids = [t.task_id for t in AnnotationStore(run.labels_path).tasks(project)]
    edited = studio.submit_annotation(task_ids[0], project, choice_result("core"), 4.0)
    removed = studio.submit_annotation(task_ids[1], project, choice_result("spurious"), 4.0)
    box = {"from_name": "object", "to_name": "image", "type": "rectanglelabels",
           "value": {"x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0, "rotation": 0,
                     "rectanglelabels": ["core object"]}}
    note = {"from_name": "note", "to_name": "image", "type": "textarea", "value": {"text": ["tail only"]}}
    studio.submit_annotation(task_ids[2], project, choice_result("core") + [box, note], 4.0)
    studio.client.annotations.create(id=task_ids[3], project=project, result=[], was_cancelled=True)
    assert pull_run(run, settings)["added"] == 4

    studio.update_annotation(edited, choice_result("unsure"))
    studio.delete_annotation(removed)
    summary = pull_run(run, settings)
    assert (summary["added"], summary["updated"], summary["removed"]) == (0, 1, 1)
    by_task = {a.task_id: a for a in AnnotationStore(run.labels_path).annotations()}
    assert by_task[task_ids[0]].choice == "unsure"
    assert task_ids[1] not in by_task
    assert by_task[task_ids[2]].boxes == [{"x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0, "rotation": 0}]
    assert by_task[task_ids[2]].note == "tail only"
    assert by_task[task_ids[3]].skipped and by_task[task_ids[3]].choice is None
    assert summary["choices"] == {"core": 1, "spurious": 0, "unsure": 1} and summary["skipped"] == 1


def test_deleted_task_stops_pull_until_accepted_and_push_recreates_it(sampled_run: Path, settings: Settings) -> None:
    run = Run(sampled_run)
    push_run(run, settings, progress=False)
    simulate_annotator(run, settings, progress=False)
    pull_run(run, settings)
    project = project_of(sampled_run)
    victim = AnnotationStore(run.labels_path).tasks(project)[0]
    Studio(settings).delete_task(victim.task_id)
    before = digest(run.labels_path)
    with pytest.raises(PipelineError, match=r"1 task\(s\) of this run were deleted"):
        pull_run(run, settings)
    assert digest(run.labels_path) == before
    summary = pull_run(run, settings, accept_deleted=True)
    assert summary["deleted_tasks"] == 1 and summary["tasks"] == 7
    assert any(a.task_id == victim.task_id for a in AnnotationStore(run.labels_path).annotations())  # kept
    assert push_run(run, settings, progress=False)["created"] == 1


def test_deleted_project_is_a_clear_error_and_changes_nothing(sampled_run: Path, settings: Settings, capsys) -> None:
    run = Run(sampled_run)
    push_run(run, settings, progress=False)
    Studio(settings).client.projects.delete(id=project_of(sampled_run))
    before = digest(run.labels_path)
    code = main(["pull", "--run", str(sampled_run), "--url", settings.url, "--api-key", settings.api_key])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist in Label Studio" in err and err.count("\n") == 1
    assert digest(run.labels_path) == before


def test_wrong_keys_and_stopped_server_give_one_clear_line(sampled_run: Path, settings: Settings, capsys) -> None:
    cases = [
        (settings.url, "not-the-token-1234", "rejected the legacy API token"),
        (settings.url, "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl", "rejected the personal access token"),
        (f"http://127.0.0.1:{free_port(1)}", settings.api_key, "cannot reach Label Studio"),
    ]
    for url, key, message in cases:
        code = main(["push", "--run", str(sampled_run), "--url", url, "--api-key", key, "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1
        assert key not in err
    assert not (sampled_run / "labels.sqlite").exists() or not AnnotationStore(sampled_run / "labels.sqlite").tasks()


def test_personal_access_token_works(sampled_run: Path, settings: Settings) -> None:
    client = Studio(settings).client
    client.jwt_settings.update(api_token_ttl_days=30, api_tokens_enabled=True, legacy_api_tokens_enabled=True)
    token = client.tokens.create().token
    assert token.startswith("eyJ")
    assert push_run(Run(sampled_run), Settings(settings.url, token), progress=False)["created"] == 8


def test_missing_settings_and_foreign_project_are_refused(sampled_run: Path, settings: Settings, monkeypatch) -> None:
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(PipelineError, match="no Label Studio URL"):
        Settings.resolve(None, None)
    with pytest.raises(PipelineError, match="no Label Studio API key"):
        Settings.resolve("http://localhost:8080", None)
    assert "hidden" in repr(Settings.resolve("http://h:1", "secret-key")) and "secret" not in repr(
        Settings.resolve("http://h:1", "secret-key"))
    studio = Studio(settings)
    foreign = studio.create_project("someone else's", "", config='<View><Text name="t" value="$t"/>'
                                    '<Choices name="c" toName="t"><Choice value="a"/></Choices></View>')
    with pytest.raises(PipelineError, match="does not use the SLIM labeling config"):
        push_run(Run(sampled_run), settings, project_id=foreign, progress=False)


def test_local_files_storage_serves_the_pictures(sampled_run: Path, settings: Settings, tmp_path_factory) -> None:
    summary = push_run(Run(sampled_run), settings, storage="local-files",
                       document_root=tmp_path_factory.getbasetemp(), progress=False)
    studio = Studio(settings)
    task = next(iter(studio.list_tasks(summary["project_id"])))
    assert task["data"]["image"].startswith("/data/local-files/?d=")
    response = studio.get(task["data"]["image"])
    assert response.status_code == 200 and response.content[:4] == b"\x89PNG"
    with pytest.raises(PipelineError, match="is not below --document-root"):
        push_run(Run(sampled_run), settings, storage="local-files", document_root="/nonexistent",
                 new_project=True, progress=False)


def test_demo_runs_the_loop_against_the_configured_server(tmp_path: Path, settings: Settings, monkeypatch,
                                                          caplog) -> None:
    """With LABEL_STUDIO_URL set, the demo uses that server: synth to report, every task answered."""
    from pipeline.core.config import RunConfig
    from pipeline.core.synth import SynthSpec
    from pipeline.demo import run_demo

    monkeypatch.setenv("LABEL_STUDIO_URL", settings.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", settings.api_key)
    caplog.set_level(logging.INFO, logger="pipeline")
    config = RunConfig()
    config.train.epochs, config.embed.embedding, config.sample.per_class = 1, "pca", 3
    run = run_demo(tmp_path / "data", tmp_path / "run", progress=False, config=config,
                   spec=SynthSpec(n_train=80, n_val=20, n_test=20, image_size=32))
    summary = AnnotationStore(run.labels_path).summary()
    assert summary["tasks"] == summary["annotated_tasks"] == 6
    logged = {record.name: record.getMessage() for record in caplog.records}
    assert "6 tasks created" in logged["pipeline.labelstudio.push"]
    assert logged["pipeline.labelstudio.pull"].startswith("6 tasks, 6 images annotated; 6 answers")
    assert not run.labelstudio_dir.exists()  # no local server was started
    metrics = json.loads(run.metrics_path.read_text())
    assert metrics["annotated"] == 6 and {"erm", "slim", "curation"} <= set(metrics)
    assert run.report_path.exists()


def p_core(prediction: dict) -> float:
    """P(core) behind a prediction: its score is the confidence of the verdict it shows."""
    return prediction["score"] if prediction["result"][0]["value"]["choices"] == ["core"] else 1 - prediction["score"]


def test_ml_backend_end_to_end(sampled_run: Path, settings: Settings) -> None:
    """Label Studio connects to the backend, stores its predictions, and sends it answers by webhook."""
    import threading

    from werkzeug.serving import make_server

    from ml_backend._wsgi import create_app
    from ml_backend.model import SlimAttentionBackend

    run = Run(sampled_run)
    project = push_run(run, settings, predictions="show", progress=False)["project_id"]  # the backend's guesses
    backend = SlimAttentionBackend(sampled_run, settings.url, settings.api_key).setup()
    server = make_server("127.0.0.1", free_port(9090), create_app(backend), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        studio = Studio(settings)
        studio.client.ml.create(url=f"http://127.0.0.1:{server.server_port}", project=project, title="slim")
        studio.client.actions.create(id="retrieve_tasks_predictions", project=project,
                                     selected_items={"all": True, "excluded": []})
        tasks = list(studio.list_tasks(project, fields=("id", "data", "predictions", "result", "score",
                                                        "model_version")))
        expected = backend.predict([{"data": t["data"]} for t in tasks])["results"]
        for task, want in zip(tasks, expected):
            ours = [p for p in task["predictions"] if p["model_version"] == backend.version]
            assert len(ours) == 1, task["predictions"]
            assert ours[0]["result"][0]["value"] == want["result"][0]["value"]
            assert ours[0]["score"] == pytest.approx(want["score"], abs=1e-4)
        # an answer submitted in Label Studio reaches the backend by webhook and moves its predictions
        first = tasks[0]
        same_class = [t for t in tasks[1:] if t["data"]["class_name"] == first["data"]["class_name"]]
        arrays, points = backend.arrays, backend.placement.points
        row = arrays.row_of(first["data"]["image_id"])
        neighbour = min(same_class, key=lambda t: float(np.linalg.norm(
            points[arrays.row_of(t["data"]["image_id"])] - points[row])))
        neighbour_before = p_core(backend.predict([{"data": neighbour["data"]}])["results"][0])
        before = backend.version
        studio.submit_annotation(first["id"], project, choice_result("spurious"), 3.0)
        deadline = time.time() + 30
        while not AnnotationStore(run.labels_path).annotations() and time.time() < deadline:
            time.sleep(0.2)
        backend.wait_idle()
        (stored,) = AnnotationStore(run.labels_path).annotations()
        assert stored.image_id == first["data"]["image_id"] and stored.choice == "spurious"
        assert backend.version != before
        again = backend.predict([{"data": neighbour["data"]}])["results"][0]
        assert again["result"][0]["value"]["choices"] == ["spurious"]
        assert p_core(again) < min(neighbour_before, 0.5)
        # live: the next task opened through the API already carries the new guess, as the project's version
        (opened,) = studio.list_tasks(project, [neighbour["id"]], fields=("id", "predictions", "model_version",
                                                                          "result", "score"))
        (live,) = [p for p in opened["predictions"] if p["model_version"] == backend.version]
        assert live["result"][0]["value"]["choices"] == ["spurious"]
        assert live["score"] == pytest.approx(again["score"], abs=1e-4)
        assert studio.project(project).model_version == backend.version
        answered = next(iter(studio.list_tasks(project, [first["id"]], fields=("id", "predictions",
                                                                                  "model_version"))))
        assert all(p["model_version"] != backend.version for p in answered["predictions"])  # only open tasks
    finally:
        server.shutdown()
