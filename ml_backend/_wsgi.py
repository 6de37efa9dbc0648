"""The HTTP side of the backend: Label Studio's ML backend protocol on Flask.

Routes as Label Studio 1.23 calls them: ``GET /health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``,
``GET|POST /versions``, plus ``GET /metrics`` for operators (request and error counters, background jobs
succeeded and failed, the last training's status). Optional basic auth (``BASIC_AUTH_USER`` /
``BASIC_AUTH_PASS``). Every bad request becomes a 4xx with a one-line JSON error; nothing a caller sends can
produce a 500. Run it with gunicorn (``ml_backend._wsgi:app`` with ``RUN_DIR`` set) or
``python -m ml_backend``; every route is safe on the server's concurrent request threads.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import sys
import threading
import time
from collections import Counter

from flask import Flask, Response, jsonify, request

from ml_backend.model import BadRequest, SlimAttentionBackend
from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # a predict request with a few base64 images of up to 20 MiB fits


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line on stderr: time, level, logger, message (and the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO") -> None:
    """The backend's log, and the pipeline stages it runs, as JSON lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def create_app(backend: SlimAttentionBackend, basic_auth: tuple[str, str] | None = None) -> Flask:
    """Label Studio's routes over ``backend``, which is set up (the run loaded) here if it is not yet."""
    backend.setup()
    app = Flask("ml_backend")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    counters: Counter = Counter()
    counters_lock = threading.Lock()
    started = time.time()

    def count(key: str) -> None:
        with counters_lock:
            counters[key] += 1

    @app.before_request
    def authenticate():
        if basic_auth is None or request.path == "/health":
            return None
        given = request.authorization
        if given is None or not (hmac.compare_digest(given.username or "", basic_auth[0])
                                 and hmac.compare_digest(given.password or "", basic_auth[1])):
            return Response('{"error": "basic auth required"}', 401, {"WWW-Authenticate": 'Basic realm="slim"'},
                            mimetype="application/json")
        return None

    def body() -> dict:
        payload = request.get_json(silent=True)
        if not isinstance(payload, dict):
            raise BadRequest("request body must be a JSON object")
        return payload

    @app.errorhandler(BadRequest)
    def bad_request(exc: BadRequest):
        count("errors_4xx")
        return jsonify({"error": str(exc)}), exc.status

    @app.errorhandler(PipelineError)
    def pipeline_error(exc: PipelineError):
        count("errors_4xx")
        return jsonify({"error": str(exc)}), 422

    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(413)
    def http_error(exc):
        count("errors_4xx")
        return jsonify({"error": exc.description}), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):  # a bug: log it, never crash, never leak internals
        count("errors_5xx")
        log.exception("unexpected error")
        return jsonify({"error": "internal error; see the backend log"}), 500

    @app.get("/health")
    @app.get("/")
    def health():
        """Always 200 while serving: Label Studio marks a backend disconnected on any error status (it reads
        nothing else), yet predictions still work when a background job failed; ``status`` says ``degraded``
        (with the reason) until the next job succeeds."""
        return jsonify({**backend.jobs.health(), "model_class": "SlimAttentionBackend",
                        "model_version": backend.version})

    @app.post("/setup")
    def setup():
        payload = body()
        count("setup")
        return jsonify(backend.register_project(str(payload.get("project", "")), _text(payload.get("schema"))))

    @app.post("/predict")
    def predict():
        payload = body()
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("'tasks' must be a non-empty list of task objects")
        count("predict_requests")
        with counters_lock:
            counters["predicted_tasks"] += len(tasks)
        return jsonify(backend.predict(tasks, project=_text(payload.get("project")),
                                       label_config=_text(payload.get("label_config"))))

    @app.post("/webhook")
    def webhook():
        payload = body()
        action = payload.get("action")
        if not isinstance(action, str):
            raise BadRequest("webhook body needs an 'action'")
        count(f"webhook_{action}")
        return jsonify(backend.fit(action, payload)), 201

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        return jsonify({"versions": [backend.version], "model_version": backend.version})

    @app.get("/metrics")
    def metrics():
        with counters_lock:
            snapshot = dict(counters)
        return jsonify({"uptime_s": round(time.time() - started, 1), "model_version": backend.version,
                        **snapshot, **backend.status()})

    return app


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def app_from_environment() -> Flask:
    """What gunicorn serves: ``RUN_DIR`` (or ``MODEL_DIR``), Label Studio and basic-auth settings from env."""
    run_dir = os.environ.get("RUN_DIR") or os.environ.get("MODEL_DIR")
    if not run_dir:
        raise SystemExit("set RUN_DIR to the run directory the backend serves")
    configure_logging()
    backend = SlimAttentionBackend(run_dir, os.environ.get("LABEL_STUDIO_URL"), os.environ.get("LABEL_STUDIO_API_KEY"))
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    try:
        return create_app(backend, (user, password) if user and password else None)
    except PipelineError as exc:  # e.g. a damaged labels.sqlite: gunicorn prints the one line, not a traceback
        raise SystemExit(f"error: {exc}") from None


if os.environ.get("RUN_DIR") or os.environ.get("MODEL_DIR"):
    app = app_from_environment()
