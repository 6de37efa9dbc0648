"""The SLIM attention backend: one model class in label-studio-ml's shape (``setup``, ``predict``, ``fit``).

Everything heavy — the checkpoint, the attention arrays, the propagated scores — is loaded once per process,
so ``/setup`` answers in milliseconds. Predictions for tasks that ``pipeline push`` created come from the
run's current propagated attention-correctness (or, before any answer, the attention prior); an image the
run has never seen gets its attention computed on the fly and is placed among its nearest neighbours in the
attention representation. Answers that arrive by webhook go into the same database ``pull`` writes (keyed by
Label Studio's annotation id: no double counting), and propagation is refreshed in the background.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.neighbors import KNeighborsRegressor

from pipeline.cam import make_extractor
from pipeline.config import fingerprint
from pipeline.data import normalize
from pipeline.embed import attention_vectors
from pipeline.errors import PipelineError
from pipeline.labelstudio import ANSWER, ATTENTION_VIEW, Settings, Studio, parse_annotation
from pipeline.models import load_checkpoint
from pipeline.prelabel import attention_prior
from pipeline.propagate import consolidate, propagate, save_propagation
from pipeline.run import Run
from pipeline.sample import attention_representation
from pipeline.store import AnnotationStore

log = logging.getLogger("ml_backend")
MAX_IMAGE_BYTES = 20 * 1024 * 1024
NEIGHBOURS = 10


class BadRequest(ValueError):
    """A request the backend cannot serve; the message is safe to return to the caller (HTTP 4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ControlNames:
    """Where a prediction goes in a project's labeling config."""

    from_name: str = ANSWER
    to_name: str = ATTENTION_VIEW


def control_names(schema: str | None) -> ControlNames:
    """The Choices control offering core/spurious, and the object it labels, read from the config XML."""
    if not schema:
        return ControlNames()
    try:
        root = ET.fromstring(schema)
    except ET.ParseError as exc:
        raise BadRequest(f"label config is not valid XML: {exc}") from None
    for choices in root.iter("Choices"):
        values = {c.get("value") for c in choices.iter("Choice")}
        if {"core", "spurious"} <= values and choices.get("name") and choices.get("toName"):
            return ControlNames(choices.get("name"), choices.get("toName").split(",")[0])
    raise BadRequest("label config has no Choices control with the values core and spurious")


class SlimAttentionBackend:
    """Serves pre-annotations for a run and learns from the answers Label Studio sends."""

    def __init__(self, run_dir: str | Path, label_studio_url: str | None = None, api_key: str | None = None):
        self.run = Run(run_dir)
        self.config = self.run.load_config()
        self.model, self.meta = load_checkpoint(self.run.require(self.run.checkpoint_path, "train"))
        self.extractor = make_extractor(self.model, "gradcam")
        self.arrays = self.run.load_arrays(self.run.attention_path, "embed --run RUN")
        self.row_of = {int(i): r for r, i in enumerate(self.arrays["index"])}
        self.points = attention_representation(self.arrays, "vectors")
        self.label_studio_url = label_studio_url.rstrip("/") if label_studio_url else None
        self._api_key = api_key
        self._studio: Studio | None = None
        self.store = AnnotationStore(self.run.labels_path)
        self.run_id = self.store.get_meta("run_id")
        self.projects: dict[str, ControlNames] = {}
        self.lock = threading.Lock()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slim-learn")
        self.pending = None
        self.queued: list = []
        self._load_scores()

    # --- state ------------------------------------------------------------------------------------------
    def _load_scores(self) -> None:
        """Propagated scores if the run has them, else the attention prior; and the version they define."""
        scores = attention_prior(self.arrays["cam"])
        source = "prior"
        if self.run.propagation_path.exists():
            propagation = self.run.load_arrays(self.run.propagation_path, "curate")
            if np.array_equal(propagation["index"], self.arrays["index"]):
                scores, source = propagation["score"], "propagated"
        checkpoint = self.run.slim_checkpoint_path if self.run.slim_checkpoint_path.exists() else None
        with self.lock:
            self.scores = scores
            self.knn = KNeighborsRegressor(n_neighbors=min(NEIGHBOURS, len(scores))).fit(self.points, scores)
            self.model_version = "slim-" + fingerprint(self.run.stage_fingerprint("embed"), source,
                                                       np.round(scores, 4).tolist(), str(checkpoint))[:12]

    @property
    def version(self) -> str:
        with self.lock:
            return self.model_version

    # --- protocol ---------------------------------------------------------------------------------------
    def setup(self, project: str, schema: str | None) -> dict:
        self.projects[str(project)] = control_names(schema)
        return {"model_version": self.version}

    def predict(self, tasks: list[dict], project: str | None = None, label_config: str | None = None) -> dict:
        names = control_names(label_config) if label_config else self.projects.get(str(project), ControlNames())
        version = self.version
        results = []
        for task in tasks:
            p_core = self._p_core(task)
            choice = "core" if p_core >= 0.5 else "spurious"
            results.append({"model_version": version, "score": round(float(max(p_core, 1 - p_core)), 4),
                            "result": [{"from_name": names.from_name, "to_name": names.to_name,
                                        "type": "choices", "value": {"choices": [choice]}}]})
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
            self.store.upsert_annotation(parse_annotation(annotation, int(task["id"]), image_id, {}))
            self._schedule(self._repropagate)
        elif event == "ANNOTATIONS_DELETED":
            ids = [a.get("id") for a in data.get("annotations") or [] if isinstance(a, dict)]
            self.store.delete_annotations(int(i) for i in ids if isinstance(i, int))
            self._schedule(self._repropagate)
        elif event == "START_TRAINING":
            self._schedule(self._train)
        return {"status": "ok", "event": event}

    # --- learning ---------------------------------------------------------------------------------------
    def _schedule(self, job) -> None:
        """Queue ``job`` for the background worker; the same job asked for several times runs once."""
        with self.lock:
            if job not in self.queued:
                self.queued.append(job)
            if self.pending is None:
                self.pending = self.worker.submit(self._drain)

    def _drain(self) -> None:
        """Run queued jobs until none is left; a failing job is logged, never fatal to the server."""
        while True:
            with self.lock:
                if not self.queued:
                    self.pending = None
                    return
                job = self.queued.pop(0)
            try:
                job()
            except Exception:
                log.exception("background job %s failed", getattr(job, "__name__", job))

    def _repropagate(self) -> None:
        answers = consolidate(self.store.annotations())
        if not answers.labels:
            return
        scores, certainty = propagate(self.arrays, answers)
        save_propagation(self.run, self.arrays, scores, certainty, answers)
        self._load_scores()
        log.info("propagation refreshed from %d answers; model version %s", len(answers.labels), self.version)

    def _train(self) -> None:
        from pipeline.curate import curate_run
        from pipeline.retrain import retrain_run

        try:
            curate_run(self.run, self.config)
            retrain_run(self.run, self.config, progress=False)
        except PipelineError as exc:
            log.warning("training skipped: %s", exc)
            return
        self._load_scores()
        log.info("curate + retrain done; model version %s", self.version)

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
        if isinstance(image_id, int) and image_id in self.row_of and (
                data.get("run_id") in (None, self.run_id)):
            return image_id
        return None

    def _p_core(self, task: dict) -> float:
        if not isinstance(task, dict):
            raise BadRequest("each task must be a JSON object")
        image_id = self._known_image(task)
        with self.lock:
            if image_id is not None:
                return float(self.scores[self.row_of[image_id]])
        image = self._fetch_image(task)
        return self._place_unseen(image)

    def _place_unseen(self, image: Image.Image) -> float:
        """Attention of a new image, scored by its nearest training images in the attention representation."""
        size = self.meta["image_size"]
        rgb = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255.0
        tensor = normalize(rgb)[None]
        with torch.no_grad():
            logits = self.model(tensor)
        batch = self.extractor(tensor, logits.argmax(1))
        attended, ignored = attention_vectors(batch)
        unit = [v / max(float(np.linalg.norm(v)), 1e-12) for v in (attended[0].numpy(), ignored[0].numpy())]
        with self.lock:
            return float(np.clip(self.knn.predict(np.hstack(unit)[None])[0], 0.0, 1.0))

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

    def _from_label_studio(self, value: str, parsed) -> bytes:
        """Only the configured Label Studio host is ever contacted (no SSRF), through the SDK's client (both
        token kinds)."""
        if not self.label_studio_url or not self._api_key:
            raise BadRequest("cannot fetch images: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for the backend", 422)
        base = urlparse(self.label_studio_url)
        if parsed.netloc and (parsed.scheme, parsed.netloc) != (base.scheme, base.netloc):
            raise BadRequest("image URL is not on the configured Label Studio host", 403)
        path = parsed.path.lstrip("/") + (f"?{parsed.query}" if parsed.query else "")
        try:
            if self._studio is None:
                self._studio = Studio(Settings(self.label_studio_url, self._api_key))
            response = self._studio.client._client_wrapper.httpx_client.request(path, method="GET")
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
