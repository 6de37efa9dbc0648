"""The ML backend over Flask's test client: Label Studio's captured requests, learning, safety, fuzzing; and
over real HTTP: concurrent webhooks, webhooks beside a running pull, failing and coalesced background jobs."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import label_config
from ml_backend import model as backend_model
from ml_backend._wsgi import create_app
from ml_backend.model import NEIGHBOURS, SlimAttentionBackend
from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.data import load_dataset
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.slim.propagate import Propagation

PAYLOADS = Path(__file__).resolve().parent / "fixtures" / "labelstudio-payloads"  # see its README
RUN_ID = "testrun00001"


def payload(name: str) -> dict:
    return json.loads((PAYLOADS / name).read_text())["json"]


@pytest.fixture()
def backend_run(trained_run: Path, tmp_path: Path) -> Path:
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    store = AnnotationStore(run / "labels.sqlite")
    with store.transaction() as db:
        store.set_meta("run_id", RUN_ID, db)
    store.close()
    return run


@pytest.fixture()
def backend(backend_run: Path) -> SlimAttentionBackend:
    return SlimAttentionBackend(backend_run).setup()


@pytest.fixture()
def client(backend: SlimAttentionBackend):
    return create_app(backend).test_client()


def known_task(backend: SlimAttentionBackend, row: int, task_id: int = 1000) -> dict:
    image_id = int(backend.arrays.index[row])
    return {"id": task_id + row, "data": {"image_id": image_id, "run_id": RUN_ID, "image": "/data/upload/1/x.png"}}


def png_data_uri(size: int = 32) -> str:
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_captured_handshake_and_unseen_image_predictions(client) -> None:
    assert client.get("/health").status_code == 200
    started = time.perf_counter()
    first = client.post("/setup", json=payload("002_setup.json"))
    assert first.status_code == 200 and time.perf_counter() - started < 1.0
    again = client.post("/setup", json=payload("004_setup.json"))
    assert first.get_json()["model_version"] == again.get_json()["model_version"]  # stable, not random
    response = client.post("/predict", json=payload("007_predict.json"))
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == 2  # one per task, base64 images never seen by the run
    for result in results:
        (item,) = result["result"]
        assert (item["from_name"], item["to_name"]) == ("attention", "image")  # names from that config
        assert item["value"]["choices"][0] in ("core", "spurious") and 0.5 <= result["score"] <= 1


@pytest.mark.parametrize("name", ["008_predict.json", "009_predict.json", "012_predict.json"])
def test_every_captured_predict_is_answered(client, name: str) -> None:
    body = payload(name)
    response = client.post("/predict", json=body)
    assert response.status_code == 200 and len(response.get_json()["results"]) == len(body["tasks"])


def test_captured_webhooks_and_versions(client) -> None:
    for name in ("013_webhook_PROJECT_UPDATED.json", "014_webhook_ANNOTATION_CREATED.json",
                 "015_webhook_ANNOTATION_UPDATED.json", "020_webhook_ANNOTATIONS_DELETED.json"):
        assert client.post("/webhook", json=payload(name)).status_code == 201, name
    assert client.get("/versions").status_code == 200 and client.post("/versions").status_code == 200
    metrics = client.get("/metrics").get_json()
    assert metrics["webhook_ANNOTATION_CREATED"] == 1 and "errors_5xx" not in metrics


def test_known_tasks_use_the_run_prior_with_our_config_names(client, backend) -> None:
    tasks = [known_task(backend, row) for row in range(5)]
    response = client.post("/predict", json={"tasks": tasks, "label_config": label_config.load()})
    results = response.get_json()["results"]
    from pipeline.slim.prelabel import attention_prior

    prior = attention_prior(backend.arrays.cam[:5])
    for result, p_core in zip(results, prior):
        (item,) = result["result"]
        assert (item["from_name"], item["to_name"]) == ("answer", "attention")
        assert item["value"]["choices"][0] == ("core" if p_core >= 0.5 else "spurious")
        assert result["score"] == pytest.approx(max(p_core, 1 - p_core), abs=1e-4)


def test_answers_by_webhook_are_stored_once_and_move_the_next_prediction(client, backend, backend_run) -> None:
    before_version = backend.version
    rows = np.flatnonzero(backend.arrays.y == 0)[:4]
    for n, row in enumerate(rows):
        task = known_task(backend, int(row))
        annotation = {"id": 500 + n, "result": [{"from_name": "answer", "to_name": "attention", "type": "choices",
                                                "value": {"choices": ["spurious"]}}],
                      "completed_by": 1, "was_cancelled": False, "task": task["id"]}
        for _ in range(2):  # delivered twice: stored once
            response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": annotation,
                                                     "task": task, "project": {"id": 1}})
            assert response.status_code == 201
    backend.wait_idle()
    stored = AnnotationStore(backend_run / "labels.sqlite").annotations()
    assert len(stored) == 4 and {a.choice for a in stored} == {"spurious"}
    assert (backend_run / "propagation.npz").exists() and backend.version != before_version
    # the nearest unanswered neighbour of an answered image (same class) is now predicted spurious
    same_class = np.flatnonzero(backend.arrays.y == 0)
    candidates = np.setdiff1d(same_class, rows)
    distances = np.linalg.norm(backend.placement.points[candidates] - backend.placement.points[rows[0]], axis=1)
    neighbour = int(candidates[np.argmin(distances)])
    result = client.post("/predict", json={"tasks": [known_task(backend, neighbour)]}).get_json()["results"][0]
    assert result["result"][0]["value"]["choices"] == ["spurious"]
    deleted = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 500}],
                                            "project": {"id": 1}})
    assert deleted.status_code == 201
    backend.wait_idle()
    assert len(AnnotationStore(backend_run / "labels.sqlite").annotations()) == 3


def test_start_training_curates_retrains_and_serves_a_new_version(client, backend, backend_run) -> None:
    store = AnnotationStore(backend_run / "labels.sqlite")
    from pipeline.core.store import Annotation

    for n, row in enumerate(range(0, 60, 6)):
        store.upsert_annotation(Annotation(900 + n, 900 + n, int(backend.arrays.index[row]), "x",
                                           "core" if n % 2 else "spurious"))
    store.close()
    version = backend.version
    assert client.post("/webhook", json=payload("016_webhook_START_TRAINING.json")).status_code == 201
    backend.wait_idle(timeout=120)
    assert (backend_run / "slim_model.pt").exists() and backend.version != version
    training = client.get("/metrics").get_json()["training"]
    assert training["status"] == "succeeded" and training["runs"] == 1 and training["finished_at"]


def test_basic_auth(backend) -> None:
    client = create_app(backend, ("user", "secret")).test_client()
    assert client.get("/health").status_code == 200  # Label Studio's probe stays open
    assert client.post("/setup", json={"project": "1", "schema": None}).status_code == 401
    auth = {"Authorization": "Basic " + base64.b64encode(b"user:secret").decode()}
    assert client.post("/setup", json={"project": "1"}, headers=auth).status_code == 200


@pytest.mark.parametrize("image, status", [
    ("http://169.254.169.254/latest/meta-data", 422),  # no Label Studio configured: nothing is fetched
    ("/data/local-files/?d=../../../../etc/passwd", 403),
    ("data:image/png;base64,bm90IGFuIGltYWdl", 415),
    ("data:text/html;base64,PGI+", 400),
    ("file:///etc/passwd", 400),
])
def test_images_come_only_from_label_studio_or_the_run(client, image: str, status: int) -> None:
    response = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": image}}]})
    assert response.status_code == status and "error" in response.get_json()


def test_other_hosts_are_refused_even_with_label_studio_configured(backend_run: Path) -> None:
    backend = SlimAttentionBackend(backend_run, "http://127.0.0.1:1", "key-not-shown")
    client = create_app(backend).test_client()
    response = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "http://example.org/a.png"}}]})
    assert response.status_code == 403 and "key-not-shown" not in response.get_data(as_text=True)


@pytest.mark.parametrize("full_space", [True, False], ids=["full-space", "principal-axes"])
def test_unseen_image_data_uri_is_placed_among_neighbours(backend_run: Path, monkeypatch, full_space: bool) -> None:
    """A picture sent without an image id gets its attention computed and inherits its neighbours' verdict.

    Two training pictures are sent as data URIs; the propagated scores say core exactly on the first one's
    nearest neighbours in the attention representation, spurious everywhere else (so on the far one's). The
    same holds where a large run places images on the representation's principal axes instead.
    """
    if not full_space:
        monkeypatch.setattr(backend_model, "FULL_SPACE_LIMIT", 0)
        monkeypatch.setattr(backend_model, "PLACEMENT_FIT_ROWS", 100)
    arrays = AttentionArrays.load(backend_run / "attention.npz")
    points = arrays.representation()
    candidates = np.flatnonzero(arrays.pred == arrays.y)  # the backend takes the CAM of the predicted class
    near_row = int(candidates[0])
    distances = np.linalg.norm(points - points[near_row], axis=1)
    far_row = int(candidates[np.argmax(distances[candidates])])
    scores = np.zeros(len(arrays))
    scores[np.argsort(distances)[:NEIGHBOURS]] = 1.0
    Propagation(arrays.index, scores, np.ones(len(arrays)), np.zeros(len(arrays), bool)).save(
        backend_run / "propagation.npz")
    client = create_app(SlimAttentionBackend(backend_run)).test_client()
    image_set = load_dataset(Run(backend_run).load_config().data.root)
    files = {sample.index: image_set.root / sample.filename for sample in image_set.samples}

    def picture(row: int) -> str:
        return "data:image/png;base64," + base64.b64encode(files[int(arrays.index[row])].read_bytes()).decode()

    tasks = [{"id": n, "data": {"image": picture(row)}} for n, row in enumerate((near_row, far_row))]
    response = client.post("/predict", json={"tasks": tasks})
    assert response.status_code == 200
    near, far = response.get_json()["results"]
    assert near["result"][0]["value"]["choices"] == ["core"] and near["score"] >= 0.8
    assert far["result"][0]["value"]["choices"] == ["spurious"] and far["score"] >= 0.8


@pytest.mark.parametrize("path, body, status", [
    ("/predict", b"{not json", 400),
    ("/predict", b"[]", 400),
    ("/predict", b'{"tasks": []}', 400),
    ("/predict", b'{"tasks": [1]}', 400),
    ("/setup", b'{"project": "1", "schema": "<View><Broken"}', 400),
    ("/setup", b'{"project": "1", "schema": "<View><Text name=\\"t\\" value=\\"$t\\"/></View>"}', 400),
    ("/webhook", b'{"action": "ANNOTATION_CREATED"}', 400),
    ("/webhook", b'{}', 400),
    ("/nowhere", b"{}", 404),
])
def test_malformed_requests_get_a_clear_4xx(client, path: str, body: bytes, status: int) -> None:
    response = client.post(path, data=body, content_type="application/json")
    assert response.status_code == status and response.get_json()["error"]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children,
                                                                                      max_size=4), max_leaves=20)
TASK = st.fixed_dictionaries({"id": st.integers() | st.text(max_size=5),
                              "data": st.dictionaries(st.sampled_from(["image", "image_id", "run_id", "x"]),
                                                      JSON, max_size=3) | JSON})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/predict", "/setup", "/webhook"]),
       body=JSON | st.fixed_dictionaries({"tasks": st.lists(TASK, max_size=3)})
       | st.fixed_dictionaries({"action": st.sampled_from(["ANNOTATION_CREATED", "ANNOTATIONS_DELETED",
                                                             "ANNOTATION_UPDATED", "PROJECT_UPDATED"]),
                                "annotation": JSON, "task": JSON, "annotations": JSON}))
def test_fuzzed_bodies_never_cause_a_server_error(client, path: str, body) -> None:
    response = client.post(path, json=body)
    assert response.status_code < 500, response.get_data(as_text=True)


def test_a_deletion_without_an_annotations_list_is_a_bad_request(client) -> None:
    """Found by the fuzzing above: ``"annotations": true`` was iterated and answered 500."""
    for not_a_list in (True, 3, {"id": 1}, "1"):
        response = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": not_a_list})
        assert response.status_code == 400 and "needs an 'annotations' list" in response.get_json()["error"]


def test_oversized_images_and_bodies_are_refused(client, monkeypatch) -> None:
    import ml_backend.model

    monkeypatch.setattr(ml_backend.model, "MAX_IMAGE_BYTES", 1000)
    response = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": png_data_uri(64)}}]})
    assert response.status_code == 413 and "larger than" in response.get_json()["error"]
    huge = b'{"tasks": [' + b" " * (65 * 1024 * 1024) + b"]}"
    assert client.post("/predict", data=huge, content_type="application/json").status_code == 413


def test_backend_logs_json_lines_on_stderr(client, backend, capsys) -> None:
    """Operators parse the backend's log: every line one JSON object, background learning included."""
    from ml_backend._wsgi import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO")
        task = known_task(backend, 0)
        annotation = {"id": 77, "result": [{"from_name": "answer", "to_name": "attention", "type": "choices",
                                            "value": {"choices": ["core"]}}], "task": task["id"]}
        assert client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": annotation,
                                             "task": task, "project": {"id": 1}}).status_code == 201
        backend.wait_idle()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert entries and all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    assert any(entry["logger"] == "ml_backend.model" and "propagation refreshed from 1 answers" in entry["message"]
               for entry in entries)


# --- concurrency and failures ------------------------------------------------------------------------------
CONCURRENT_WEBHOOKS = 50  # what the issue asks for; more than gunicorn's 8 threads by far


def test_concurrent_webhooks_leave_exactly_the_expected_answers(backend, backend_run) -> None:
    """50 webhooks at once (created, updated, deleted; three answers per task): each annotation's events are
    sent in order, different annotations race. Every one succeeds and the store holds each final state."""
    import random

    import faults_backend
    import httpx

    tasks = [known_task(backend, row) for row in range(6)]
    plan = faults_backend.webhook_plan(tasks, CONCURRENT_WEBHOOKS, random.Random(4))
    with faults_backend.serve(backend) as url:
        answers = faults_backend.send_units(url, plan.sequences, threads=len(plan.sequences))
        backend.wait_idle()
        metrics = httpx.get(url + "/metrics").json()
    assert len(answers) >= CONCURRENT_WEBHOOKS and {status for _, status, _ in answers} == {201}
    assert {r.kind for r, _, _ in answers} == {"annotation_created", "annotation_updated", "annotations_deleted"}
    expected = {a: choice for a, choice in plan.final.items() if choice is not None}
    assert faults_backend.stored_choices(backend_run / "labels.sqlite") == expected
    assert metrics["background_jobs_failed"] == 0 and "errors_5xx" not in metrics


def test_pull_while_webhooks_arrive_gives_the_sequential_result(sampled_run: Path, settings, tmp_path) -> None:
    """Two pulls and every answer's webhooks (twice each, eight threads) at the same time: no error, no
    double count, and -- once the tasks the webhooks wrote during the last pull are mirrored by the next, as
    pull promises -- the database a lone pull makes, row for row (the webhook names the annotator as pull
    does)."""
    import threading

    import faults_backend

    from pipeline.labelstudio.annotator import simulate_annotator
    from pipeline.labelstudio.client import TASK_ANNOTATIONS, Studio
    from pipeline.labelstudio.pull import pull_run
    from pipeline.labelstudio.push import push_run
    from pipeline.labelstudio.schema import choice_result

    run = Run(sampled_run)
    project = push_run(run, settings, progress=False)["project_id"]
    simulate_annotator(run, settings, progress=False)
    with Studio(settings) as studio:
        first, second = [t["id"] for t in studio.list_tasks(project)][:2]
        extra = [studio.submit_annotation(first, project, choice_result(c), 1.5) for c in ("core", "unsure")]
        studio.update_annotation(extra[0], choice_result("spurious"))
        gone = studio.submit_annotation(second, project, choice_result("core"), 1.5)
        studio.delete_annotation(gone)
        listing = list(studio.list_tasks(project, fields=(*TASK_ANNOTATIONS, "data")))
    reference = Run(shutil.copytree(sampled_run, tmp_path / "reference"))
    pull_run(reference, settings)

    def event(action: str, annotation: dict, task: dict) -> faults_backend.Request:
        body = {"action": action, "annotation": annotation, "task": task, "project": {"id": project}}
        return faults_backend.Request(action, "POST", "/webhook", body, 201)

    units = [[event(action, annotation, task) for action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")] * 2
             for task in listing for annotation in task["annotations"]]
    units.append([faults_backend.Request("annotations_deleted", "POST", "/webhook", {
        "action": "ANNOTATIONS_DELETED", "annotations": [{"id": gone}], "project": {"id": project}}, 201)])
    backend = SlimAttentionBackend(sampled_run, settings.url, settings.api_key).setup()
    errors: list[BaseException] = []
    pulling: list[float] = []
    sending: list[float] = []
    summaries: list[dict] = []

    def pull_twice() -> None:
        pulling.append(time.monotonic())
        try:
            for _ in range(2):
                summaries.append(pull_run(run, settings))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        pulling.append(time.monotonic())

    with faults_backend.serve(backend) as url:
        puller = threading.Thread(target=pull_twice)
        puller.start()
        sending.append(time.monotonic())
        answers = faults_backend.send_units(url, units, threads=8)
        sending.append(time.monotonic())
        puller.join(timeout=120)
        backend.wait_idle()
    assert errors == [] and {status for _, status, _ in answers} == {201}
    assert len(units) == 11  # 8 simulated answers + 2 extra on one task, and the deleted one
    assert pulling[0] < sending[1] and sending[0] < pulling[1]  # the pulls and the webhooks did overlap
    # a task a webhook wrote while the last pull was fetching is left to the next pull, and only those tasks
    settle = pull_run(run, settings)
    assert settle["changed_tasks"] == summaries[-1]["deferred_tasks"] and settle["deferred_tasks"] == 0
    assert annotation_rows(run.root) == annotation_rows(reference.root)
    assert task_rows(run.root) == task_rows(reference.root)
    again = pull_run(run, settings)  # nothing left to mirror: every row already is Label Studio's
    assert (again["changed_tasks"], again["added"], again["updated"], again["removed"]) == (0, 0, 0, 0)
    assert again["annotations"] == 10


def annotation_rows(run: Path) -> list[tuple]:
    with closing(sqlite3.connect(run / "labels.sqlite")) as db:
        return db.execute("SELECT * FROM annotations ORDER BY annotation_id").fetchall()


def task_rows(run: Path) -> list[tuple]:
    with closing(sqlite3.connect(run / "labels.sqlite")) as db:
        return db.execute("SELECT * FROM tasks ORDER BY task_id").fetchall()


def annotation_webhook(backend: SlimAttentionBackend, annotation_id: int, choice: str) -> dict:
    task = known_task(backend, annotation_id % 20)
    annotation = {"id": annotation_id, "result": [{"from_name": "answer", "to_name": "attention",
                                                   "type": "choices", "value": {"choices": [choice]}}],
                  "task": task["id"]}
    return {"action": "ANNOTATION_CREATED", "annotation": annotation, "task": task, "project": {"id": 1}}


def test_failing_background_jobs_show_in_metrics_and_health(client, backend, backend_run) -> None:
    """Real failures: training with no answer yet, and a propagation whose file cannot be written. Health
    stays 200 (Label Studio reads only the status code) but says degraded until a job succeeds again."""
    assert client.get("/health").get_json()["status"] == "UP"
    assert client.get("/metrics").get_json()["training"]["status"] == "idle"
    assert client.post("/webhook", json=payload("016_webhook_START_TRAINING.json")).status_code == 201
    backend.wait_idle(timeout=120)
    metrics = client.get("/metrics").get_json()
    training = metrics["training"]
    assert training["status"] == "failed" and "answer" in training["reason"]
    assert "\n" not in training["reason"]
    assert training["started_at"] <= training["finished_at"] and metrics["background_jobs_failed"] == 1
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json()["status"] == "degraded"
    assert health.get_json()["reason"] == training["reason"]

    (backend_run / "propagation.npz").mkdir()  # the propagation cannot be written over a folder
    assert client.post("/webhook", json=annotation_webhook(backend, 1, "core")).status_code == 201
    backend.wait_idle()
    metrics = client.get("/metrics").get_json()
    assert metrics["background_jobs_failed"] == 2 and metrics["background_jobs_succeeded"] == 0
    assert client.get("/health").get_json()["status"] == "degraded"
    stored_ids = [a.annotation_id for a in AnnotationStore(backend_run / "labels.sqlite").annotations()]
    assert stored_ids == [1]  # the answer is kept though its propagation failed

    (backend_run / "propagation.npz").rmdir()
    assert client.post("/webhook", json=annotation_webhook(backend, 2, "spurious")).status_code == 201
    backend.wait_idle()
    metrics = client.get("/metrics").get_json()
    assert metrics["background_jobs_succeeded"] == 1 and metrics["last_job_failure"] is None
    assert client.get("/health").get_json() == {"status": "UP", "model_class": "SlimAttentionBackend",
                                                "model_version": backend.version}
    assert metrics["training"]["status"] == "failed"  # the last training did fail: only a new one changes it


def test_start_training_during_a_training_is_coalesced(client, backend, backend_run) -> None:
    """Five presses of "Start training" while one runs: one more run afterwards, not four."""
    for n, row in enumerate(range(0, 60, 6)):
        body = annotation_webhook(backend, 900 + n, "core" if n % 2 else "spurious")
        body["task"] = known_task(backend, row)
        assert client.post("/webhook", json=body).status_code == 201
    backend.wait_idle()
    start = payload("016_webhook_START_TRAINING.json")
    assert client.post("/webhook", json=start).get_json()["coalesced"] is False
    deadline = time.monotonic() + 60
    while client.get("/metrics").get_json()["training"]["status"] != "running":
        assert time.monotonic() < deadline, "the training never started"
        time.sleep(0.005)
    coalesced = [client.post("/webhook", json=start).get_json()["coalesced"] for _ in range(4)]
    assert coalesced == [False, True, True, True]  # one queued behind the running one, three folded into it
    assert client.get("/metrics").get_json()["training"]["queued"] is True
    backend.wait_idle(timeout=240)
    metrics = client.get("/metrics").get_json()
    assert metrics["training"]["runs"] == 2 and metrics["training"]["status"] == "succeeded"
    assert metrics["background_jobs_failed"] == 0 and metrics["training"]["queued"] is False


def test_answer_stored_by_webhook_while_pull_fetches_is_kept(sampled_run: Path, settings) -> None:
    """The race window exactly: an annotator answers (Label Studio sends the webhook, the backend stores it)
    after pull's listing left the server and before pull writes. Pull must not delete that answer because its
    listing predates it; the next pull mirrors the task, with nothing counted twice."""
    from faultproxy import FaultProxy

    from pipeline.labelstudio.client import Settings, Studio
    from pipeline.labelstudio.pull import pull_run
    from pipeline.labelstudio.push import push_run
    from pipeline.labelstudio.schema import choice_result

    run = Run(sampled_run)
    project = push_run(run, settings, progress=False)["project_id"]
    backend = SlimAttentionBackend(sampled_run, settings.url, settings.api_key).setup()
    studio = Studio(settings).connect()
    task = next(iter(studio.list_tasks(project)))
    studio.submit_annotation(task["id"], project, choice_result("core"), 2.0)
    late: list[int] = []

    def annotator_answers_meanwhile(request_line: str) -> bool:
        if not late and "completed_by" in request_line:  # the listing of annotations, not of counts
            late.append(studio.submit_annotation(task["id"], project, choice_result("spurious"), 2.0))
            raw = studio.client.annotations.get(id=late[0]).model_dump(mode="json")
            backend.fit("ANNOTATION_CREATED", {"annotation": raw, "task": task})
        return False  # the listing itself goes through unharmed

    with FaultProxy(int(settings.url.rsplit(":", 1)[1]), on_response=annotator_answers_meanwhile) as proxy:
        first = pull_run(run, Settings(proxy.url, settings.api_key))
    backend.wait_idle()
    assert late, "the hook should have fired on pull's annotation listing"
    assert late[0] in {a.annotation_id for a in backend.store.annotations()}, "pull deleted the webhook's answer"
    assert first["deferred_tasks"] == 1
    second = pull_run(run, settings)
    studio.close()
    assert second["annotations"] == 2 and second["choices"]["core"] == 1 and second["choices"]["spurious"] == 1
    assert second["deferred_tasks"] == 0
    assert pull_run(run, settings)["changed_tasks"] == 0


def test_webhook_names_each_annotator_once_and_falls_back_to_the_id_as_pull_does(backend_run: Path,
                                                                                 monkeypatch) -> None:
    """Label Studio is asked once per user id (the webhook answers within Label Studio's one-second timeout); a
    user it cannot name is stored under the bare id, as pull stores such a user, and asked about again only after
    a while."""
    from pipeline.core.errors import PipelineError
    from pipeline.labelstudio.client import Studio

    asked: list[int] = []

    def user_name(self, user_id: int, timeout_s: float = 0.5) -> str:
        asked.append(user_id)
        if user_id == 8:
            raise PipelineError("cannot reach Label Studio at http://127.0.0.1:1 while trying to name user 8")
        return "a@x"

    monkeypatch.setattr(Studio, "connect", lambda self: self)  # no server: the naming is what is tested here
    monkeypatch.setattr(Studio, "user_name", user_name)
    backend = SlimAttentionBackend(backend_run, "http://127.0.0.1:1", "key").setup()
    client = create_app(backend).test_client()
    for n, author in enumerate((7, 7, 8, 7, 8)):
        body = annotation_webhook(backend, 600 + n, "core")
        body["annotation"]["completed_by"] = author
        assert client.post("/webhook", json=body).status_code == 201
    backend.wait_idle()
    assert asked == [7, 8]
    assert [a.annotator for a in backend.store.annotations()] == ["a@x", "a@x", "8", "a@x", "8"]
    monkeypatch.setattr(backend_model, "USERS_REFRESH_S", 0.0)
    body = annotation_webhook(backend, 700, "core")
    body["annotation"]["completed_by"] = 8
    assert client.post("/webhook", json=body).status_code == 201
    backend.wait_idle()
    assert asked == [7, 8, 8]


def test_an_answer_the_webhook_stored_first_is_new_to_pull_and_named_alike(sampled_run: Path, settings,
                                                                           monkeypatch) -> None:
    """Real webhooks (the backend connected to the project as its model): the backend stores each answer under
    the annotator's e-mail, asking Label Studio once; the next pull reports the answers as new, not updated, and
    finds the rows as it would write them. A row an older backend stored under the user id is named by pull."""
    import faults_backend

    from pipeline.labelstudio.client import Studio
    from pipeline.labelstudio.pull import pull_run
    from pipeline.labelstudio.push import push_run
    from pipeline.labelstudio.schema import choice_result

    run = Run(sampled_run)
    project = push_run(run, settings, progress=False)["project_id"]
    backend = SlimAttentionBackend(sampled_run, settings.url, settings.api_key).setup()
    asked: list[int] = []
    name_user = Studio.user_name
    monkeypatch.setattr(Studio, "user_name", lambda self, user_id, **kw: asked.append(user_id) or name_user(
        self, user_id, **kw))
    with faults_backend.serve(backend) as url, Studio(settings) as studio:
        studio.client.ml.create(url=url, project=project, title="slim")
        tasks = [t["id"] for t in studio.list_tasks(project)][:2]
        for task, choice in zip(tasks, ("core", "spurious")):
            studio.submit_annotation(task, project, choice_result(choice), 2.0)
        deadline = time.monotonic() + 30
        while len(backend.store.annotations()) < 2:
            assert time.monotonic() < deadline, "the webhooks never arrived"
            time.sleep(0.1)
        backend.wait_idle()
    assert {a.annotator for a in backend.store.annotations()} == {"admin@slim.local"}
    assert asked == [1]  # one small request for the one annotator, however many answers
    by_webhook = annotation_rows(run.root)
    pulled = pull_run(run, settings)
    assert (pulled["added"], pulled["updated"], pulled["removed"]) == (2, 0, 0)
    assert annotation_rows(run.root) == by_webhook  # the same rows: annotator, times, answer
    again = pull_run(run, settings)
    assert (again["changed_tasks"], again["added"], again["updated"], again["removed"]) == (0, 0, 0, 0)

    with closing(sqlite3.connect(run.labels_path)) as db, db:  # as an older backend stored it: the bare id
        db.execute("UPDATE annotations SET annotator = '1' WHERE annotation_id = (SELECT MIN(annotation_id) "
                   "FROM annotations)")
    repaired = pull_run(run, settings)
    assert repaired["annotators_named"] == 1 and (repaired["added"], repaired["updated"]) == (0, 0)
    assert annotation_rows(run.root) == by_webhook
