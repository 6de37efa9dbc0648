"""Fault scenarios of the ML backend and its annotation store (``benchmarks/faults.py`` runs them).

- ``backend_concurrent``: a burst of concurrent mixed requests (predictions for known tasks and for an image
  the run has never seen, webhooks creating / updating / deleting answers, several on the same task,
  ``/versions``, ``/metrics``, ``/health``) against the real backend over real HTTP (werkzeug's threaded
  server on 127.0.0.1, as Label Studio reaches it). Counts 5xx answers and the answers whose last state is not
  what ``labels.sqlite`` holds afterwards.
- ``corrupt_store``: ``labels.sqlite`` truncated or overwritten with garbage; opening it (directly and through
  ``python -m pipeline pull``) must stop with a one-line error naming the file, with its bytes untouched.

The webhook helpers (:func:`webhook_plan`, :func:`send_units`, :func:`stored_choices`) are shared with the
tests, which check the same properties on the tiny run.

    python benchmarks/faults_backend.py --work bench-out/faults-backend
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import random
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from faultkit import ScenarioResult
from PIL import Image
from runs import attention_run
from werkzeug.serving import WSGIRequestHandler, make_server

from ml_backend._wsgi import create_app
from ml_backend.model import SlimAttentionBackend
from pipeline.cli import main as cli_main
from pipeline.core.config import RunConfig
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.store import Annotation, AnnotationStore, TaskRecord
from pipeline.core.synth import SynthSpec
from pipeline.labelstudio.schema import choice_result
from pipeline.labelstudio.server import free_port

QUICK_SPEC = SynthSpec(n_train=160, n_val=40, n_test=40, image_size=32, seed=3)  # the tests' tiny dataset
REQUESTS = {True: 60, False: 200}  # requests per burst: quick (tests) / full (the suite)
CONCURRENCY = {True: 16, False: 50}  # client threads: above the backend's 8 gunicorn threads in both
WEBHOOK_SHARE = 0.5  # half the burst are webhooks: the writes are what can be lost
ANNOTATIONS_PER_TASK = 3  # several answers on one task: their rows share the task's index entries
KNOWN_BATCH = 5  # tasks per predict request for images of the run (Label Studio batches them)
REQUEST_TIMEOUT_S = 120.0  # an unseen image's attention on 2 busy CPU cores takes well under this
CHOICES = ("core", "spurious", "unsure")


class QuietHandler(WSGIRequestHandler):
    """werkzeug's handler without its access-log line: a burst would print hundreds of them."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


@contextlib.contextmanager
def serve(backend: SlimAttentionBackend) -> Iterator[str]:
    """The backend's Flask app on a threaded werkzeug server on 127.0.0.1; yields its base URL."""
    server = make_server("127.0.0.1", free_port(9090), create_app(backend), threaded=True,
                         request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass(frozen=True)
class Request:
    """One HTTP request of a burst and the status a correct backend answers it with."""

    kind: str
    method: str
    path: str
    body: dict | None = None
    expected: int = 200


@dataclass(frozen=True)
class WebhookPlan:
    """Webhook sequences, one per annotation (sent in order), and each annotation's final choice (None:
    deleted). Different annotations race; one annotation's events never do, so the final state is defined."""

    sequences: list[list[Request]]
    final: dict[int, str | None]


def annotation_event(action: str, annotation_id: int, task: dict, choice: str) -> Request:
    """A created / updated webhook in Label Studio 1.23's shape (see tests/fixtures/labelstudio-payloads)."""
    stamp = f"2026-01-01T00:00:{annotation_id % 60:02d}.000000Z"
    annotation = {"id": annotation_id, "result": choice_result(choice), "completed_by": 1,
                  "was_cancelled": False, "task": task["id"], "created_at": stamp, "updated_at": stamp,
                  "lead_time": 2.5}
    return Request(action.lower(), "POST", "/webhook",
                   {"action": action, "annotation": annotation, "task": task, "project": {"id": 1}}, 201)


def webhook_plan(tasks: list[dict], events: int, rng: random.Random, first_id: int = 1) -> WebhookPlan:
    """About ``events`` webhooks over ``ANNOTATIONS_PER_TASK`` annotations per task: each created, then
    updated zero to two times, and every fourth deleted at the end."""
    sequences, final = [], {}
    annotation_id = first_id
    while sum(map(len, sequences)) < events:
        task = tasks[(annotation_id - first_id) // ANNOTATIONS_PER_TASK % len(tasks)]
        choice = rng.choice(CHOICES)
        sequence = [annotation_event("ANNOTATION_CREATED", annotation_id, task, choice)]
        for _ in range(rng.randint(0, 2)):
            choice = rng.choice(CHOICES)
            sequence.append(annotation_event("ANNOTATION_UPDATED", annotation_id, task, choice))
        final[annotation_id] = choice
        if rng.random() < 0.25:
            body = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": annotation_id}],
                    "project": {"id": 1}}
            sequence.append(Request("annotations_deleted", "POST", "/webhook", body, 201))
            final[annotation_id] = None
        sequences.append(sequence)
        annotation_id += 1
    return WebhookPlan(sequences, final)


def send_units(url: str, units: list[list[Request]], threads: int) -> list[tuple[Request, int, float]]:
    """Send each unit's requests in order on one of ``threads`` client threads, units racing each other;
    returns (request, status, seconds) per request. A transport failure counts as status 0."""
    def send(unit: list[Request]) -> list[tuple[Request, int, float]]:
        answers = []
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
            for request in unit:
                start = time.perf_counter()
                try:
                    status = client.request(request.method, request.path, json=request.body).status_code
                except httpx.HTTPError:
                    status = 0
                answers.append((request, status, time.perf_counter() - start))
        return answers

    with ThreadPoolExecutor(threads) as pool:
        return [answer for answers in pool.map(send, units) for answer in answers]


def stored_choices(labels: Path) -> dict[int, str | None]:
    """Every stored annotation's choice, read with plain sqlite3 (not through the code under test)."""
    with contextlib.closing(sqlite3.connect(labels)) as db:
        return dict(db.execute("SELECT annotation_id, choice FROM annotations").fetchall())


def compare(final: dict[int, str | None], stored: dict[int, str | None]) -> dict[str, int]:
    """Answers missing or stale in the store (lost), and deleted ones still there (resurrected)."""
    lost = sum(1 for a, choice in final.items() if choice is not None and stored.get(a, "missing") != choice)
    resurrected = sum(1 for a, choice in final.items() if choice is None and a in stored)
    return {"lost": lost, "resurrected": resurrected}


def png_data_uri(size: int, seed: int) -> str:
    """A picture the run has never seen, as Label Studio sends uploaded images in a task."""
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def prepare_run(work: Path, quick: bool, run: Path | None) -> Path:
    """A private copy of ``run`` when given (the tests pass their tiny trained run), else a 1-epoch run: the
    tests' tiny dataset when quick, the synthetic default (``backend_predict``'s run) otherwise."""
    if run is not None:
        target = work / "run"
        shutil.rmtree(target, ignore_errors=True)
        return Path(shutil.copytree(run, target))
    if quick:
        return attention_run(work / "run", work / "data", QUICK_SPEC, epochs=1).root
    from backend_predict import build_run

    return build_run(work)


def burst(backend: SlimAttentionBackend, requests: int, rng: random.Random
          ) -> tuple[list[list[Request]], WebhookPlan]:
    """The mixed burst: webhook sequences plus single predict / versions / metrics / health requests."""
    run_id = backend.run_id
    rows = list(range(len(backend.arrays)))
    rng.shuffle(rows)
    tasks = [{"id": 10_000 + n, "data": {"image_id": int(backend.arrays.index[row]), "run_id": run_id}}
             for n, row in enumerate(rows[:max(1, requests // 10)])]
    plan = webhook_plan(tasks, int(requests * WEBHOOK_SHARE), rng)
    unseen = png_data_uri(int(backend.meta["image_size"]), rng.randrange(2**16))
    others = requests - sum(map(len, plan.sequences))
    singles = []
    for n in range(others):
        kind = ("predict_known", "predict_unseen", "versions", "metrics", "health", "predict_known")[n % 6]
        if kind == "predict_known":
            batch = rng.sample(tasks, min(KNOWN_BATCH, len(tasks)))
            singles.append(Request(kind, "POST", "/predict", {"tasks": batch}))
        elif kind == "predict_unseen":
            task = {"id": n, "data": {"image": unseen}}
            singles.append(Request(kind, "POST", "/predict", {"tasks": [task]}))
        else:
            singles.append(Request(kind, "GET", f"/{kind}"))
    units = plan.sequences + [[request] for request in singles]
    rng.shuffle(units)
    return units, plan


def scenario_backend_concurrent(work: Path, seed: int = 0, quick: bool = True, run: Path | None = None
                                ) -> ScenarioResult:
    """``REQUESTS[quick]`` concurrent mixed requests; every one answered as expected, no answer lost."""
    rng = random.Random(seed)
    run_dir = prepare_run(Path(work), quick, run)
    backend = SlimAttentionBackend(run_dir).setup()
    units, plan = burst(backend, REQUESTS[quick], rng)
    with serve(backend) as url:
        start = time.perf_counter()
        answers = send_units(url, units, CONCURRENCY[quick])
        wall_s = time.perf_counter() - start
        backend.wait_idle(timeout=REQUEST_TIMEOUT_S)
        after = {path: httpx.get(url + path, timeout=REQUEST_TIMEOUT_S).json()
                 for path in ("/metrics", "/health")}
    stored = compare(plan.final, stored_choices(run_dir / "labels.sqlite"))
    answered = sum(status == request.expected for request, status, _ in answers)
    statuses = Counter(f"{request.kind} {status}" for request, status, _ in answers)
    return ScenarioResult(
        "backend_concurrent", faults_injected=len(answers), faults_survived=answered - stored["resurrected"],
        annotations_lost=stored["lost"], backend_5xx=sum(status >= 500 for _, status, _ in answers),
        detail={"requests": len(answers), "client_threads": CONCURRENCY[quick], "wall_s": round(wall_s, 2),
                "max_latency_s": round(max(seconds for *_, seconds in answers), 2),
                "annotations_expected": sum(choice is not None for choice in plan.final.values()),
                "deleted_resurrected": stored["resurrected"], "statuses": dict(sorted(statuses.items())),
                "background_jobs_failed": after["/metrics"].get("background_jobs_failed"),
                "health_after": after["/health"]["status"]})


def filled_store(path: Path, answers: int) -> bytes:
    """A valid labels.sqlite with ``answers`` answers (several pages), all in the main file; its bytes."""
    store = AnnotationStore(path)
    store.add_tasks(TaskRecord(t, 1, t, 1) for t in range(answers))
    with store.transaction() as db:
        for n in range(answers):
            db.execute("INSERT INTO annotations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       Annotation(n, n, n, "a@b", CHOICES[n % 3]).row())
    store.close()  # the last connection checkpoints the WAL into the file and removes it
    return path.read_bytes()


def damaged(data: bytes, how: str, rng: random.Random) -> bytes:
    if how == "truncated":
        return data[:len(data) // 2]
    if how == "garbage":
        return rng.randbytes(len(data))
    return rng.randbytes(100) + data[100:]  # a header overwritten: the file is not recognised at all


def open_store(run: Run) -> str | None:
    """Open the run's store as every command does; None when it opened (the damage went unnoticed)."""
    AnnotationStore(run.labels_path).close()
    return None


def cli_pull_error(run: Run) -> str | None:
    """What ``python -m pipeline pull`` prints on stderr (its one-line error), or None when it succeeded."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = cli_main(["pull", "--run", str(run.root), "--url", "http://127.0.0.1:9", "--api-key",
                           "unused", "--quiet"])
    if status == 0:
        return None
    lines = stderr.getvalue().strip().splitlines()
    return lines[0].removeprefix("error: ") if len(lines) == 1 else stderr.getvalue()


OPENERS = {"store": open_store, "cli_pull": cli_pull_error}


def refused_cleanly(opener, run: Run, data: bytes) -> tuple[bool, str]:
    """(survived, message): opening raises a one-line error naming the file, and the file is unchanged."""
    try:
        message = opener(run)
    except PipelineError as exc:
        message = str(exc)
    path = run.labels_path
    ok = message is not None and "\n" not in message and str(path) in message and path.read_bytes() == data
    return ok and not any(path.parent.glob(path.name + "-*")), message or "opened without an error"


def scenario_corrupt_store(work: Path, seed: int = 0, quick: bool = True) -> ScenarioResult:
    """Truncated, garbage and header-smashed labels.sqlite, opened by the store and by ``pull``."""
    rng = random.Random(seed)
    result = ScenarioResult("corrupt_store")
    for how in ("truncated", "garbage", "header"):
        for name, opener in OPENERS.items():
            run = Run(Path(work) / f"{how}-{name}")
            shutil.rmtree(run.root, ignore_errors=True)
            run.root.mkdir(parents=True)
            run.save_config(RunConfig())
            data = damaged(filled_store(run.labels_path, 50 if quick else 5000), how, rng)
            run.labels_path.write_bytes(data)
            survived, message = refused_cleanly(opener, run, data)
            result.faults_injected += 1
            result.faults_survived += survived
            result.detail[f"{how}/{name}"] = message
    return result


SCENARIOS = {"backend_concurrent": scenario_backend_concurrent, "corrupt_store": scenario_corrupt_store}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-out/faults-backend", help="runs and damaged files go here")
    parser.add_argument("--quick", action="store_true", help="the small versions the tests run")
    args = parser.parse_args()
    for name, scenario in SCENARIOS.items():
        print(json.dumps(scenario(Path(args.work) / name, quick=args.quick).to_dict(), indent=2))


if __name__ == "__main__":
    main()
