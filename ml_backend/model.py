"""The SLIM attention backend: one model class in label-studio-ml's shape (``setup``, ``predict``, ``fit``).

Constructing it only remembers where the run is; :meth:`SlimAttentionBackend.setup` loads the checkpoint, the
attention data and the propagated scores once per process, so Label Studio's ``/setup`` call answers in
milliseconds. Predictions for tasks that ``pipeline push`` created come from the run's current propagated
attention-correctness (or, before any answer, the attention prior); an image the run has never seen gets its
attention computed on the fly and is placed among its nearest neighbours in the attention representation.
Answers that arrive by webhook go into the same database ``pull`` writes (keyed by Label Studio's annotation
id: no double counting; the store is safe for the server's request threads and for a ``pull`` running beside
it), and propagation is refreshed in the background.

Background work (propagation refreshes, ``START_TRAINING``'s curate + retrain) runs on one worker thread, one
job at a time; asking for a job that is already waiting adds nothing, so a burst of webhooks or of "Start
training" clicks while a training runs leads to at most one more run. Every job's outcome is recorded
(:class:`JobLog`): ``/metrics`` shows the counts and the last training's status, ``/health`` says
``degraded`` while the last job failed.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import ParseResult, parse_qs, urlparse

import httpx
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.decomposition import PCA
from sklearn.neighbors import KNeighborsRegressor

from pipeline.core.attention_arrays import AttentionArrays, representation_of
from pipeline.core.config import RunConfig, fingerprint
from pipeline.core.data import rgb_array
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.labelstudio.client import TASK_STATE, Settings, Studio
from pipeline.labelstudio.schema import ConfigError, ControlNames, control_names, parse_annotation, prediction
from pipeline.model.attention import attention_vectors
from pipeline.model.cam import AttentionExtractor, make_extractor
from pipeline.model.loaders import normalize
from pipeline.model.networks import Classifier, load_checkpoint
from pipeline.slim.prelabel import attention_prior
from pipeline.slim.propagate import Propagation, consolidate, save_propagation

log = logging.getLogger(__name__)
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # a task image larger than this is refused (413): no photo needs more
NEIGHBOURS = 10  # training images whose scores an unseen image inherits
VERSION_LENGTH = 12  # hex digits of the model version: unique per run state, short enough to read in the UI
USERS_REFRESH_S = 60.0  # how often an annotator Label Studio could not name is asked about again
REASON_CHARS = 300  # a failure's reason as /metrics and /health show it: one line an operator can read
# Above this many coordinates (training images x representation width), unseen images are placed among the training
# images on the representation's first PLACEMENT_DIMS principal axes: the full representation would not fit in RAM
# (21 GB for 1.28 M images at 2 x 2,048-d; 50 M float32 coordinates are 200 MB). Below it, in the full space.
FULL_SPACE_LIMIT = 50_000_000
PLACEMENT_DIMS = 32  # the width propagation's kernel already compares images at
PLACEMENT_FIT_ROWS = 20_000  # rows the axes are fitted on: the leading axes settle long before
PLACEMENT_CHUNK = 65_536  # training images projected at a time: memory holds one chunk of the full width


class BadRequest(ValueError):
    """A request the backend cannot serve; the message is safe to return to the caller (HTTP 4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def names_from(schema: str | None) -> ControlNames:
    """The project's control names, or a 400 for a config without a core/spurious choice."""
    try:
        return control_names(schema)
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None


def _now() -> str:
    """UTC, to the second: what an operator compares with the log's times."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def one_line(exc: BaseException) -> str:
    """A failure as one short line: a PipelineError's message says what to do; anything else is a bug, named
    by its type (the traceback is in the log)."""
    text = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
    return (text.strip().splitlines() or [type(exc).__name__])[0][:REASON_CHARS]


@dataclass(frozen=True)
class TrainingStatus:
    """The last ``START_TRAINING``: idle (none yet), running, succeeded or failed (with the reason)."""

    status: str = "idle"
    reason: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    runs: int = 0  # trainings started since the backend started


class JobLog:
    """Outcomes of the background jobs, so that a failure is seen in ``/metrics`` and ``/health``, not only
    in the log. Written by the worker thread, read by request threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.succeeded = 0
        self.failed = 0
        self.last_failure: str | None = None  # set while the most recent job failed
        self.training = TrainingStatus()

    def started(self, training: bool) -> None:
        with self._lock:
            if training:
                self.training = TrainingStatus("running", None, _now(), None, self.training.runs + 1)

    def finished(self, training: bool, failure: str | None) -> None:
        with self._lock:
            self.failed += failure is not None
            self.succeeded += failure is None
            self.last_failure = failure
            if training:
                self.training = replace(self.training, status="failed" if failure else "succeeded",
                                        reason=failure, finished_at=_now())

    def snapshot(self) -> dict:
        """What ``/metrics`` adds: job counts, the last failure, the training status."""
        with self._lock:
            return {"background_jobs_succeeded": self.succeeded, "background_jobs_failed": self.failed,
                    "last_job_failure": self.last_failure, "training": asdict(self.training)}

    def health(self) -> dict:
        """``degraded`` (with the reason) while the last job failed; ``UP`` again after the next success."""
        with self._lock:
            if self.last_failure is None:
                return {"status": "UP"}
            return {"status": "degraded", "reason": self.last_failure}


@dataclass(frozen=True)
class Placement:
    """The space an unseen image is compared with the training images in: the attention representation itself,
    or, above ``FULL_SPACE_LIMIT``, its leading principal axes (``axes``), built class-agnostically in chunks."""

    points: np.ndarray  # one row per training image
    axes: PCA | None = None

    @classmethod
    def of(cls, arrays: AttentionArrays) -> Placement:
        width = arrays.f_att.shape[1] + arrays.f_rev.shape[1]
        if len(arrays) * width <= FULL_SPACE_LIMIT:
            return cls(arrays.representation())
        fit_rows = np.sort(np.random.default_rng(0).choice(len(arrays), PLACEMENT_FIT_ROWS, replace=False))
        axes = PCA(n_components=PLACEMENT_DIMS, random_state=0).fit(arrays.representation(rows=fit_rows))
        chunks = (np.arange(start, min(start + PLACEMENT_CHUNK, len(arrays)))
                  for start in range(0, len(arrays), PLACEMENT_CHUNK))
        points = np.concatenate([axes.transform(arrays.representation(rows=rows)) for rows in chunks])
        log.info("unseen images are placed on %d principal axes of %d training images' attention", PLACEMENT_DIMS,
                 len(arrays))
        return cls(points.astype(np.float32), axes)

    def project(self, point: np.ndarray) -> np.ndarray:
        """``point`` (representation rows) in this space."""
        return point if self.axes is None else self.axes.transform(point).astype(np.float32)


class SlimAttentionBackend:
    """Serves pre-annotations for a run and learns from the answers Label Studio sends.

    ``SlimAttentionBackend(run_dir)`` is cheap; call :meth:`setup` once before serving.
    """

    def __init__(self, run_dir: str | Path, label_studio_url: str | None = None, api_key: str | None = None):
        self.run = Run(run_dir)
        self.label_studio_url = label_studio_url.rstrip("/") if label_studio_url else None
        self._api_key = api_key
        self._studio: Studio | None = None
        self._studio_lock = threading.Lock()  # request threads share one client, connected once
        self._users: dict[int, str] = {}  # Label Studio user id -> email, to name annotators as pull does
        self._users_missed: dict[int, float] = {}  # user id -> when Label Studio last could not name it
        self._users_lock = threading.Lock()
        self.projects: dict[str, ControlNames] = {}
        self.lock = threading.Lock()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slim-learn")
        self.pending: Future | None = None
        self.queued: list[Callable[[], None]] = []
        self.jobs = JobLog()
        self.config: RunConfig | None = None
        self.model: Classifier | None = None
        self.meta: dict = {}
        self.extractor: AttentionExtractor | None = None
        self.arrays: AttentionArrays | None = None
        self.placement: Placement | None = None  # where unseen images meet the training images
        self.scores: np.ndarray | None = None  # P(core) per training image: propagated, else the prior
        self.knn: KNeighborsRegressor | None = None
        self.model_version = ""
        self.store: AnnotationStore | None = None
        self.run_id: str | None = None

    def setup(self) -> SlimAttentionBackend:
        """Load the run once: config, checkpoint, attention data, scores and the annotation store.

        Calling it again does nothing, so whoever serves the backend may call it without knowing whether it ran.
        """
        if self.arrays is not None:
            return self
        self.config = self.run.load_config()
        self.model, self.meta = load_checkpoint(self.run.require(self.run.checkpoint_path, "train"))
        self.extractor = make_extractor(self.model, "gradcam")
        self.arrays = AttentionArrays.load(self.run.require(self.run.attention_path, "embed --run RUN"))
        self.placement = Placement.of(self.arrays)
        self.store = AnnotationStore(self.run.labels_path)
        self.run_id = self.store.get_meta("run_id")
        self._load_scores()
        return self

    # --- state ------------------------------------------------------------------------------------------
    def _load_scores(self) -> None:
        """Propagated scores if the run has them, else the attention prior; and the version they define."""
        scores = attention_prior(self.arrays.cam)
        source = "prior"
        if self.run.propagation_path.exists():
            propagation = Propagation.load(self.run.propagation_path)
            if propagation.matches(self.arrays):
                scores, source = propagation.score, "propagated"
        checkpoint = self.run.slim_checkpoint_path if self.run.slim_checkpoint_path.exists() else None
        with self.lock:
            self.scores = scores
            self.knn = KNeighborsRegressor(n_neighbors=min(NEIGHBOURS, len(scores))).fit(self.placement.points, scores)
            self.model_version = "slim-" + fingerprint(self.run.stage_fingerprint("embed"), source,
                                                       np.round(scores, 4).tolist(), str(checkpoint))[:VERSION_LENGTH]

    @property
    def version(self) -> str:
        with self.lock:
            return self.model_version

    # --- protocol ---------------------------------------------------------------------------------------
    def register_project(self, project: str, schema: str | None) -> dict:
        """Label Studio's ``/setup``: remember the project's control names; answer with the model version."""
        self.projects[str(project)] = names_from(schema)
        return {"model_version": self.version}

    def predict(self, tasks: list[dict], project: str | None = None, label_config: str | None = None) -> dict:
        names = names_from(label_config) if label_config else self.projects.get(str(project), ControlNames())
        version = self.version
        results = [prediction(self._p_core(task), version, names) for task in tasks]
        return {"results": results, "model_version": version}

    def fit(self, event: str, data: dict) -> dict:
        """Store answers from webhooks; refresh propagation (or curate + retrain) in the background."""
        if event in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            annotation, task = data.get("annotation"), data.get("task")
            if not isinstance(annotation, dict) or not isinstance(task, dict) or "id" not in annotation:
                raise BadRequest(f"{event} needs 'annotation' and 'task' objects")
            image_id = self._known_image(task)
            if image_id is None:
                return {"status": "ignored", "reason": "task is not one of this run's images"}
            self.store.upsert_annotation(parse_annotation(annotation, int(task["id"]), image_id,
                                                          self._users_for(annotation)))
            self._schedule(self._repropagate)
        elif event == "ANNOTATIONS_DELETED":
            deleted = data.get("annotations") or []
            if not isinstance(deleted, list):
                raise BadRequest(f"{event} needs an 'annotations' list")
            ids = [a.get("id") for a in deleted if isinstance(a, dict)]
            self.store.delete_annotations(int(i) for i in ids if isinstance(i, int))
            self._schedule(self._repropagate)
        elif event == "START_TRAINING":
            return {"status": "ok", "event": event, "coalesced": not self._schedule(self._train)}
        return {"status": "ok", "event": event}

    def _users_for(self, annotation: dict) -> dict[int, str]:
        """The annotator's name as ``pull`` gives it (the e-mail), so that a webhook stores exactly the row
        ``pull`` stores for the same answer: the two writers never undo each other.

        Label Studio is asked once per user id (one small request with a short timeout: it waits only a second
        for the webhook's answer) and the name is cached. A user it cannot name now (no Label Studio settings,
        no answer in time, no such user) is stored under the bare id -- what ``pull`` stores for a user it cannot
        name -- and asked about again after ``USERS_REFRESH_S``; the next pull names such rows."""
        author = annotation.get("completed_by")
        if not isinstance(author, int) or isinstance(author, bool) or not self.label_studio_url or not self._api_key:
            return {}
        with self._users_lock:  # one lookup per user, however many of their webhooks arrive at once
            name = self._users.get(author)
            missed = self._users_missed.get(author)
            if name is None and (missed is None or time.monotonic() - missed >= USERS_REFRESH_S):
                try:
                    name = self._client().user_name(author)
                except (PipelineError, httpx.HTTPError) as exc:
                    log.warning("could not name annotator %d (%s); the next pull will", author, one_line(exc))
                if name:
                    self._users[author] = name
                else:
                    self._users_missed[author] = time.monotonic()
        return {author: name} if name else {}

    def _client(self) -> Studio:
        """The one Label Studio client of the backend, connected on first use by whichever thread needs it."""
        with self._studio_lock:
            if self._studio is None:
                self._studio = Studio(Settings(self.label_studio_url, self._api_key)).connect()
            return self._studio

    # --- learning ---------------------------------------------------------------------------------------
    def _schedule(self, job: Callable[[], None]) -> bool:
        """Queue ``job`` for the background worker; False when it is already waiting (the one queued run will
        see everything the caller stored, so a second one would repeat it)."""
        with self.lock:
            queued = job not in self.queued
            if queued:
                self.queued.append(job)
            if self.pending is None:
                self.pending = self.worker.submit(self._drain)
        return queued

    def _drain(self) -> None:
        """Run queued jobs until none is left; a failing job is recorded and logged, never fatal to the
        server."""
        while True:
            with self.lock:
                if not self.queued:
                    self.pending = None
                    return
                job = self.queued.pop(0)
            self._run_job(job)

    def _run_job(self, job: Callable[[], None]) -> None:
        """Run one job and record its outcome; the server keeps serving whatever the job raises."""
        training = job == self._train
        self.jobs.started(training)
        failure = None
        try:
            job()
        except PipelineError as exc:  # e.g. no usable answer yet: what to do is in the message
            failure = one_line(exc)
            log.warning("background job %s failed: %s", job.__name__, failure)
        except Exception as exc:  # a bug or a broken run: keep serving, show it in /metrics and /health
            failure = one_line(exc)
            log.exception("background job %s failed", job.__name__)
        self.jobs.finished(training, failure)

    def status(self) -> dict:
        """The background work as ``/metrics`` reports it, with whether a training waits to run."""
        snapshot = self.jobs.snapshot()
        with self.lock:
            snapshot["training"]["queued"] = self._train in self.queued
        return snapshot

    def _repropagate(self) -> None:
        answers = consolidate(self.store.annotations(), self.config.curate.consensus)
        if not answers.labels:
            return
        save_propagation(self.run, self.arrays, answers)
        self._load_scores()
        log.info("propagation refreshed from %d answers; model version %s", len(answers.labels), self.version)
        self._publish_open_tasks()

    def _publish_open_tasks(self) -> None:
        """Give the run's tasks nobody has answered yet a prediction of the current version and make it the
        project's: annotators (where predictions are shown) and API readers see the newest guess at once.

        Needs Label Studio settings and a pushed run; tasks that already have this version's prediction are
        left alone, so a repeated refresh adds nothing.
        """
        project = self.store.get_meta("project_id")
        if not project or not self.label_studio_url or not self._api_key:
            return
        studio, version = self._client(), self.version
        open_tasks = [t for t in studio.list_tasks(int(project), fields=(*TASK_STATE, "predictions", "model_version"))
                      if not t.get("total_annotations") and self._known_image(t) is not None
                      and all(p.get("model_version") != version for p in t.get("predictions") or [])]
        predictions = [{**prediction(self._p_core(task), version), "task": int(task["id"])} for task in open_tasks]
        studio.publish_predictions(int(project), predictions, version)
        log.info("project %s: %d open tasks given predictions of version %s", project, len(predictions), version)

    def _train(self) -> None:
        """Curate + retrain on the answers stored so far; a PipelineError (say, no usable answer yet) makes
        the training ``failed`` with its message as the reason: the person who pressed the button sees why."""
        from pipeline.slim.curate import curate_run
        from pipeline.slim.retrain import retrain_run

        curate_run(self.run, self.config)
        retrain_run(self.run, self.config, progress=False)
        self._load_scores()
        log.info("curate + retrain done; model version %s", self.version)
        self._publish_open_tasks()

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until background work is done (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.pending is None:
                    return
            time.sleep(0.05)
        raise TimeoutError("background learning did not finish in time")

    # --- predictions ------------------------------------------------------------------------------------
    def _known_image(self, task: dict) -> int | None:
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        image_id = data.get("image_id")
        if isinstance(image_id, int) and self.arrays.has_image(image_id) and (
                data.get("run_id") in (None, self.run_id)):
            return image_id
        return None

    def _p_core(self, task: dict) -> float:
        if not isinstance(task, dict):
            raise BadRequest("each task must be a JSON object")
        image_id = self._known_image(task)
        with self.lock:
            if image_id is not None:
                return float(self.scores[self.arrays.row_of(image_id)])
        image = self._fetch_image(task)
        return self._place_unseen(image)

    def _place_unseen(self, image: Image.Image) -> float:
        """Attention of a new image, scored by its nearest training images in the attention representation."""
        size = self.meta["image_size"]
        tensor = normalize(rgb_array(image, size))[None]
        with torch.no_grad():
            logits = self.model(tensor)
        batch = self.extractor(tensor, logits.argmax(1))
        attended, ignored = attention_vectors(batch)
        point = self.placement.project(representation_of(attended.numpy(), ignored.numpy()))
        with self.lock:
            return float(np.clip(self.knn.predict(point)[0], 0.0, 1.0))

    def _fetch_image(self, task: dict) -> Image.Image:
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        value = data.get("image") or data.get("attention")
        if not isinstance(value, str) or not value:
            raise BadRequest("task has no image: expected data.image (a URL, a data URI, or a run file)")
        return _decode(self._image_bytes(value))

    def _image_bytes(self, value: str) -> bytes:
        if value.startswith("data:"):
            match = re.match(r"data:image/[\w.+-]+;base64,(.*)$", value, re.DOTALL)
            if not match:
                raise BadRequest("data URIs must be base64-encoded images")
            if len(match.group(1)) > MAX_IMAGE_BYTES * 4 // 3 + 4:
                raise BadRequest("image is larger than 20 MiB", 413)
            try:
                return base64.b64decode(match.group(1), validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest("data URI is not valid base64") from None
        parsed = urlparse(value)
        if parsed.path.startswith("/data/local-files/") and not parsed.netloc:
            return self._run_file(parse_qs(parsed.query).get("d", [""])[0])
        if parsed.scheme in ("http", "https") or value.startswith("/"):
            return self._from_label_studio(value, parsed)
        raise BadRequest("image must be a Label Studio URL, a data URI or a local-files path")

    def _run_file(self, relative: str) -> bytes:
        """A local-files path, served only from inside the run directory (no traversal out of it)."""
        candidates = [Path("/") / relative, self.run.root / relative]
        for candidate in candidates:
            resolved = candidate.resolve()
            if resolved.is_relative_to(self.run.root) and resolved.is_file():
                if resolved.stat().st_size > MAX_IMAGE_BYTES:
                    raise BadRequest("image is larger than 20 MiB", 413)
                return resolved.read_bytes()
        raise BadRequest("local file is outside the run directory or missing", 403)

    def _from_label_studio(self, value: str, parsed: ParseResult) -> bytes:
        """Only the configured Label Studio host is ever contacted (no SSRF), through the SDK's client (both
        token kinds)."""
        if not self.label_studio_url or not self._api_key:
            raise BadRequest("cannot fetch images: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for the backend", 422)
        base = urlparse(self.label_studio_url)
        if parsed.netloc and (parsed.scheme, parsed.netloc) != (base.scheme, base.netloc):
            raise BadRequest("image URL is not on the configured Label Studio host", 403)
        try:
            response = self._client().get(parsed.path, params=parse_qs(parsed.query),
                                          action="fetch a task's image")
        except (PipelineError, httpx.HTTPError) as exc:
            raise BadRequest(f"could not fetch the task's image from Label Studio ({exc})", 422) from None
        if response.status_code != 200:
            raise BadRequest(f"Label Studio answered {response.status_code} for the task's image", 422)
        return response.content


def _decode(blob: bytes) -> Image.Image:
    if len(blob) > MAX_IMAGE_BYTES:
        raise BadRequest("image is larger than 20 MiB", 413)
    try:
        image = Image.open(io.BytesIO(blob))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError):
        raise BadRequest("task image is not a readable image", 415) from None
    return image
