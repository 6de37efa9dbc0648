"""Throughput of ``push`` and ``pull`` against a real local Label Studio, beside Label Studio's own limits.

Builds a run on the synthetic default with ``--tasks`` training images and selects all of them (a quick
1-epoch model: only the number of tasks matters here), starts one fresh local Label Studio with local-files
serving below the work folder, then times, in this order:

* Label Studio's own bulk import: the very task JSON ``push`` sends (data, prediction; no pictures) posted in
  one request to a fresh project with the same labeling config (``bulk_import_s``): the baseline for push;
* ``push --storage local-files`` from an empty ``labels.sqlite`` (project, storage, task import);
* ``push`` with uploads, the default, again from an empty ``labels.sqlite`` (project, companion project,
  upload of both pictures of every task, task import);
* every task of the uploaded project annotated at once by Label Studio's own "predictions to annotations"
  action: real annotations, with the result the simulated annotator submits (one choice of ``answer`` on
  ``attention``), in seconds instead of ``--tasks`` / 10 s of one-by-one answers;
* the first ``pull`` of all annotations and a second, no-change ``pull`` right after it (it lists again every
  task updated since the first pull began, less ``pull.UPDATED_SINCE_MARGIN``: all of them); then, once that
  margin has passed since the annotations, one more pull, and the no-change pull after it, which is the steady
  state: the cost of a pull after which nothing changed;
* Label Studio's JSON export of that project (``export_s``): the baseline for pull.

The resident set of this process is sampled during each push and pull: its growth shows whether memory stays
flat from 1,000 to 10,000 tasks. Ratios against the baselines (throughput over throughput) and whether they
meet their goals go into the JSON.

    python benchmarks/labelstudio.py --out bench-out/labelstudio.json                        # 1,000 tasks
    python benchmarks/labelstudio.py --tasks 10000 --out bench-out/labelstudio-10k.json
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import logging
import resource
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from machine import describe
from runs import attention_run

import label_config
from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json
from pipeline.core.run import Run
from pipeline.core.synth import SynthSpec
from pipeline.labelstudio import pull as pull_module
from pipeline.labelstudio.client import Settings, Studio
from pipeline.labelstudio.pull import pull_run
from pipeline.labelstudio.push import (
    latest_round,
    local_file_urls,
    picture_urls,
    push_run,
    task_payloads,
    task_views,
)
from pipeline.labelstudio.server import LocalLabelStudio
from pipeline.slim.sample import sample_run

log = logging.getLogger("benchmarks.labelstudio")
# one request carries all tasks (the baseline) or all annotated tasks (the export): minutes on a slow machine
BASELINE_TIMEOUT_S = 1800.0
MEMORY_SAMPLE_S = 0.02  # resident-set sampling period: far shorter than any phase, far cheaper than a request
MB = 2 ** 20
GOALS = {  # ratio name -> (goal, True when the ratio must reach it, False when it must stay below it)
    "push_local_files_vs_bulk_import": (0.8, True),
    "push_upload_vs_bulk_import": (0.5, True),
    "pull_vs_export": (0.8, True),
    "pull_noop_vs_export": (0.2, False),
    "pull_noop_settled_vs_export": (0.2, False),
}


def build_run(work: Path, tasks: int) -> Run:
    """A 1-epoch run with ``tasks`` training images, every one of them selected for annotation."""
    run = attention_run(work / "run", work / "data", SynthSpec(n_train=tasks, n_val=20, n_test=20), epochs=1)
    config = run.load_config()
    config.sample.fraction = 1.0
    config.sample.per_class = None  # as `sample --fraction` does: the fraction replaces a per-class count
    try:
        sample_run(run, config, progress=False)
    except PipelineError as exc:
        raise SystemExit(f"pipeline failed: {exc}") from exc
    return run


def resident_bytes() -> int:
    """This process's resident set now (Linux ``/proc``): unlike ``ru_maxrss`` it can be read per phase."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


@dataclass
class Phase:
    """One timed step: its result, wall time and the resident set at its start and at its highest."""

    result: Any = None
    seconds: float = 0.0
    rss_start: int = 0
    rss_peak: int = 0

    def memory(self) -> dict[str, float]:
        """The resident set in MB: at the start, at the peak, and the growth between them (the step's own)."""
        return {"start_mb": round(self.rss_start / MB, 1), "peak_mb": round(self.rss_peak / MB, 1),
                "growth_mb": round((self.rss_peak - self.rss_start) / MB, 1)}


@contextmanager
def watched(phase: Phase) -> Iterator[Phase]:
    """Time the block and sample the resident set in a thread meanwhile (a thread: the peak of a pull is inside
    its own calls, where nothing else could look)."""
    done = threading.Event()
    phase.rss_start = phase.rss_peak = resident_bytes()

    def sample() -> None:
        while not done.wait(MEMORY_SAMPLE_S):
            phase.rss_peak = max(phase.rss_peak, resident_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        yield phase
    finally:
        phase.seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        phase.rss_peak = max(phase.rss_peak, resident_bytes())


def settle_memory() -> None:
    """Collect garbage and hand glibc's free heap back to the system, so that a phase starts from what is live:
    otherwise memory an earlier phase freed but kept would absorb (and hide) this phase's growth."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        ctypes.CDLL(libc).malloc_trim(0)


def measure(fn: Callable[[], Any]) -> Phase:
    """``fn()`` as a :class:`Phase`, started from a settled heap."""
    settle_memory()
    with watched(Phase()) as phase:
        phase.result = fn()
    return phase


def forget_pushes(run: Run) -> None:
    """An empty ``labels.sqlite`` (with its WAL files): the next push starts as a first push does, with a new run
    id, so it makes a project of its own."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{run.labels_path}{suffix}").unlink(missing_ok=True)


def checked(response: httpx.Response, what: str) -> httpx.Response:
    """The response of a baseline request, or a stop naming what failed."""
    if response.status_code >= 400:
        raise SystemExit(f"{what} failed: HTTP {response.status_code} {response.text[:300]}")
    return response


def bulk_import(studio: Studio, run: Run, document_root: Path) -> tuple[int, float]:
    """Label Studio's own limit for push: the task JSON a local-files push sends, in one import request to a
    fresh project with the same config; (tasks created, seconds of that request)."""
    round_ = latest_round(run)
    rows = run.load_csv(run.selection_path(round_), "sample --run RUN")
    views = task_views(run, round_, rows)
    urls = local_file_urls([path for pictures in views.values() for path in pictures], document_root)
    tasks = task_payloads(run, AttentionArrays.load(run.attention_path), round_, rows, "baseline",
                          picture_urls(views, urls))
    project = studio.create_project("SLIM bulk import baseline", "benchmarks/labelstudio.py",
                                    config=label_config.load(label_config.ATTENTION))
    start = time.perf_counter()
    response = checked(studio.http.post(f"/api/projects/{project}/import", json=tasks, timeout=BASELINE_TIMEOUT_S),
                       "bulk import")
    seconds = time.perf_counter() - start
    created = int(response.json()["task_count"])
    if created != len(tasks):
        raise SystemExit(f"bulk import created {created} of {len(tasks)} tasks")
    return created, seconds


def annotate_in_bulk(studio: Studio, project_id: int) -> int:
    """Turn every task's prediction into an annotation with Label Studio's own Data Manager action (one request,
    server-side bulk insert); returns the annotations Label Studio then counts."""
    checked(studio.http.post("/api/dm/actions", params={"id": "predictions_to_annotations", "project": project_id},
                             json={"selectedItems": {"all": True, "excluded": []}}, timeout=BASELINE_TIMEOUT_S),
            "predictions to annotations")
    return int(studio.project(project_id).total_annotations_number)


def export_json(studio: Studio, project_id: int) -> tuple[int, float, int]:
    """Label Studio's own limit for pull: its JSON export of the project; (tasks, seconds, bytes)."""
    start = time.perf_counter()
    response = checked(studio.http.get(f"/api/projects/{project_id}/export", params={"exportType": "JSON"},
                                       timeout=BASELINE_TIMEOUT_S), "JSON export")
    seconds = time.perf_counter() - start
    return len(response.json()), seconds, len(response.content)


def ratios(bulk_s: float, local: Phase, upload: Phase, pull: Phase, noop: Phase, settled: Phase,
           export_s: float) -> dict[str, float]:
    """Throughput ratios against Label Studio's own requests (same work, so a ratio of times), and the no-change
    pull's time as a share of the export's."""
    return {"push_local_files_vs_bulk_import": round(bulk_s / local.seconds, 3),
            "push_upload_vs_bulk_import": round(bulk_s / upload.seconds, 3),
            "pull_vs_export": round(export_s / pull.seconds, 3),
            "pull_noop_vs_export": round(noop.seconds / export_s, 3),
            "pull_noop_settled_vs_export": round(settled.seconds / export_s, 3)}


def goals_met(measured: dict[str, float]) -> dict[str, bool]:
    """Each ratio against its goal in :data:`GOALS`, named as ``ratio >= goal`` or ``ratio <= goal``."""
    return {f"{name} {'>=' if at_least else '<='} {goal}": (measured[name] >= goal if at_least
                                                              else measured[name] <= goal)
            for name, (goal, at_least) in GOALS.items()}


def per_s(count: int, seconds: float) -> float:
    """A throughput as the result file shows it (one decimal)."""
    return round(count / seconds, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000, help="tasks to push and annotations to pull")
    parser.add_argument("--work", help="run and server data go here (default: bench-out/labelstudio-TASKS)")
    parser.add_argument("--out", default="bench-out/labelstudio.json", help="JSON result file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # this benchmark's steps; the stages' own reports would bury them
    work = Path(args.work or f"bench-out/labelstudio-{args.tasks}")
    run = build_run(work, args.tasks)
    files_root = work.resolve()  # Label Studio's local-files document root: the run lies below it
    server_dir = work / "server"
    shutil.rmtree(server_dir, ignore_errors=True)
    forget_pushes(run)
    with LocalLabelStudio(server_dir, files_root=files_root) as login:
        settings = Settings(login.url, login.token)
        with Studio(settings) as studio:
            bulk_tasks, bulk_s = bulk_import(studio, run, files_root)
        log.info("bulk import: %d tasks in %.1f s", bulk_tasks, bulk_s)
        local = measure(lambda: push_run(run, settings, storage="local-files", document_root=files_root,
                                         progress=False))
        log.info("push --storage local-files: %.1f s", local.seconds)
        forget_pushes(run)
        upload = measure(lambda: push_run(run, settings, progress=False))
        log.info("push (uploads): %.1f s", upload.seconds)
        with Studio(settings) as studio:
            annotated = measure(lambda: annotate_in_bulk(studio, upload.result["project_id"]))
        settles_at = time.monotonic() + pull_module.UPDATED_SINCE_MARGIN.total_seconds()
        log.info("%d annotations made in %.1f s", annotated.result, annotated.seconds)
        pull = measure(lambda: pull_run(run, settings))
        log.info("pull: %.1f s", pull.seconds)
        noop = measure(lambda: pull_run(run, settings))
        log.info("no-change pull: %.1f s", noop.seconds)
        time.sleep(max(0.0, settles_at - time.monotonic()))
        pull_run(run, settings)  # the first to begin more than the margin after the annotations
        settled = measure(lambda: pull_run(run, settings))
        log.info("no-change pull once the last change is older than the margin: %.1f s", settled.seconds)
        with Studio(settings) as studio:
            exported, export_s, export_bytes = export_json(studio, upload.result["project_id"])
        log.info("export: %d tasks in %.1f s", exported, export_s)
    measured = ratios(bulk_s, local, upload, pull, noop, settled, export_s)
    result = {
        "tasks": upload.result["created"],
        "bulk_import_s": round(bulk_s, 2), "bulk_import_tasks_per_s": per_s(bulk_tasks, bulk_s),
        "push_local_files_s": round(local.seconds, 2),
        "push_local_files_tasks_per_s": per_s(local.result["created"], local.seconds),
        "push_s": round(upload.seconds, 2), "push_tasks_per_s": per_s(upload.result["created"], upload.seconds),
        "annotations_made": annotated.result, "annotate_bulk_s": round(annotated.seconds, 2),
        "annotations_pulled": pull.result["added"], "pull_s": round(pull.seconds, 2),
        "pull_annotations_per_s": per_s(pull.result["added"], pull.seconds),
        "pull_noop_s": round(noop.seconds, 2), "pull_noop_changed_tasks": noop.result["changed_tasks"],
        "pull_noop_settled_s": round(settled.seconds, 2),
        "pull_noop_settled_changed_tasks": settled.result["changed_tasks"],
        "export_tasks": exported, "export_s": round(export_s, 2), "export_mb": round(export_bytes / MB, 1),
        "memory": {"push_local_files": local.memory(), "push": upload.memory(), "pull": pull.memory(),
                   "pull_noop": noop.memory(), "pull_noop_settled": settled.memory()},
        "ratios": measured,
        "label_studio": "local 1.23.2, SQLite, 127.0.0.1 (pipeline.labelstudio.server)",
        "machine": describe(),
    }
    result["targets_met"] = {**goals_met(measured), "push_tasks_per_s >= 100": result["push_tasks_per_s"] >= 100,
                             "pull_annotations_per_s >= 500": result["pull_annotations_per_s"] >= 500}
    atomic_write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
