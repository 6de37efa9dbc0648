"""Fault scenarios between the tool and Label Studio (``benchmarks/faults.py`` runs them).

- ``push_ls_killed``: Label Studio SIGKILLed in the middle of ``push`` at exact points -- right after it
  created the project, stored a batch of pictures, or imported the tasks, each time before the tool heard
  the answer (so the tool's bookkeeping is behind the server's state) -- then restarted on the same data
  folder and port. The push stops with its one-line error; the next push must complete with no duplicate
  task, picture or project.
- ``pull_ls_killed``: Label Studio SIGKILLed while ``pull`` reads the task listings, then restarted; the
  store must be untouched by the failed pull and the next pull must leave exactly the database an
  undisturbed pull leaves.
- ``lost_answers``: every step of push that is not idempotent by itself (creating the project and the
  pictures' project, uploading, importing) and pull's annotation listing lose their first answer, the server
  having done the work; the retries must find what was done instead of doing it twice, within the one push
  and the one pull.
- ``flaky_network``: push and pull through :class:`faultproxy.FaultProxy`, which delays, truncates, resets
  or answers 502 for a share of the requests; they must finish within their retry budget with the same
  database and the same tasks as a clean run (or stop with the one-line error, after which a clean re-run
  completes).

The exact kill points come from the proxy's ``on_response`` hook: the server is killed when its answer to the
chosen request starts to arrive, that is after it did the work, and the answer never reaches the tool. The
tool talks to the server through the proxy; everything stays on 127.0.0.1.

    python benchmarks/faults_network.py --work bench-out/faults-network
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from faultkit import ScenarioResult
from faultproxy import FaultPlan, FaultProxy
from runs import attention_run

from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.core.synth import SynthSpec
from pipeline.labelstudio.annotator import simulate_annotator
from pipeline.labelstudio.client import STORED_NAME, RetryPolicy, Settings, Studio
from pipeline.labelstudio.pull import pull_run
from pipeline.labelstudio.push import project_identity, push_run
from pipeline.labelstudio.server import LocalLabelStudio, free_port
from pipeline.slim.sample import sample_run

QUICK_SPEC = SynthSpec(n_train=160, n_val=40, n_test=40, image_size=32, seed=3)  # the tests' tiny dataset
FULL_SPEC = SynthSpec(n_train=400, n_val=40, n_test=40, image_size=32, seed=3)
PER_CLASS = {True: 4, False: 100}  # tasks per class: 8 (tests) / 200, i.e. 400 pictures in 4 upload batches
SERVER_PORT = 18480  # preferred port of a scenario's own server: below Linux's ephemeral range, so no outgoing
# connection can take it while the server is down between a kill and its restart
# The killed server stays down until the scenario restarts it, so the default 30 s budget would only be waited
# out; this one still retries (the code path is the same) and gives up in about a second.
KILL_RETRY = RetryPolicy(attempts=3, base_delay_s=0.2, max_delay_s=0.5, budget_s=2.0)
FLAKY_SHARE = 0.3  # share of requests that meet a fault: far worse than a bad link, so every path is taken
FLAKY_SEEDS = {True: 1, False: 4}  # independent fault schedules per scenario run
ANNOTATOR_NOISE = 0.25  # some answers flipped, so that a mix of core and spurious is mirrored

UPLOAD = r"^POST /api/projects/\d+/import\?commit_to_project=false "
IMPORT = r"^POST /api/projects/\d+/import\?return_task_ids=true "
CREATE_PROJECT = r"^POST /api/projects/ "
TASK_LISTING = r"^GET /api/tasks/\?"
ANNOTATION_LISTING = r"^GET /api/tasks/\?.*include=id%2Cupdated_at%2Cannotations"
# (what the server had just done when it was killed, request pattern, which occurrence)
PUSH_KILLS = {
    True: [("created the project", CREATE_PROJECT, 1), ("stored the pictures", UPLOAD, 1),
           ("imported the tasks", IMPORT, 1)],
    False: [("created the project", CREATE_PROJECT, 1), ("created the pictures' project", CREATE_PROJECT, 2),
            ("stored the first picture batch", UPLOAD, 1), ("stored the second picture batch", UPLOAD, 2),
            ("imported the tasks", IMPORT, 1)],
}
# one lost answer per pattern, in the order push meets them: the project, the pictures' project, the pictures,
# the tasks
LOST_ANSWERS = (CREATE_PROJECT, CREATE_PROJECT, UPLOAD, IMPORT)
PULL_KILLS = {
    True: [("answered the annotation listing", ANNOTATION_LISTING, 1)],
    False: [("answered the task listing", TASK_LISTING, 1), ("listed the users", r"^GET /api/users/", 1),
            ("answered the annotation listing", ANNOTATION_LISTING, 1)],
}


# --- set-up -----------------------------------------------------------------------------------------
def source_run(work: Path, quick: bool, run: Path | None) -> Path:
    """The sampled run every case copies: ``run`` when given (the tests' tiny one), else one built here."""
    if run is not None:
        return run
    built = attention_run(work / "base-run", work / "data", QUICK_SPEC if quick else FULL_SPEC, epochs=1)
    config = built.load_config()
    config.sample.per_class = PER_CLASS[quick]
    sample_run(built, config, progress=False)
    return built.root


def copy_run(source: Path, target: Path, history: bool = False) -> Run:
    """A copy of the run; without ``history`` it has no Label Studio state (its own run id and project)."""
    shutil.rmtree(target, ignore_errors=True)
    skip = ("label-studio",) if history else ("labels.sqlite*", "label-studio")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*skip))
    return Run(target)


@contextmanager
def label_studio(work: Path, server: LocalLabelStudio | None) -> Iterator[LocalLabelStudio]:
    """``server`` when given, else a fresh local one on a fixed port (it is killed and restarted there)."""
    if server is not None:
        yield server
        return
    own = LocalLabelStudio(work / "label-studio", port=free_port(SERVER_PORT))
    own.start()
    try:
        yield own
    finally:
        own.stop()


def settings_of(server: LocalLabelStudio, url: str | None = None, retry: RetryPolicy | None = None) -> Settings:
    login = server.credentials
    return Settings(url or login.url, login.token, retry or RetryPolicy())


def kill(server: LocalLabelStudio) -> None:
    """SIGKILL the server's whole process group: no clean-up, as a crash, an OOM kill or a pulled plug."""
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()


@dataclass
class KillAt:
    """Proxy hook: kill the server when its answer to the ``occurrence``-th request matching ``pattern``
    starts to arrive, and drop that answer (the work is done, the tool never hears of it)."""

    server: LocalLabelStudio
    pattern: str
    occurrence: int = 1
    seen: int = 0
    fired: bool = False

    def __call__(self, request_line: str) -> bool:
        if self.fired or not re.search(self.pattern, request_line):
            return False
        self.seen += 1
        if self.seen < self.occurrence:
            return False
        kill(self.server)
        self.fired = True
        return True


@dataclass
class DropAnswers:
    """Proxy hook: drop the first answer to a request matching each of ``patterns`` (a pattern listed twice
    drops two); the server keeps what it did, the tool never hears of it."""

    patterns: list[str]
    dropped: list[str] = field(default_factory=list)

    def __call__(self, request_line: str) -> bool:
        for pattern in self.patterns:
            if re.search(pattern, request_line):
                self.patterns.remove(pattern)
                self.dropped.append(request_line)
                return True
        return False


def interrupted(fn: Callable[..., object], *args: object, **kwargs: object) -> str | None:
    """Run a command; the one-line error it stopped with, or None when it completed."""
    try:
        fn(*args, **kwargs)
    except PipelineError as exc:
        return str(exc)
    return None


def despite_faults(command: Callable[..., object], run: Run, flaky: Settings, direct: Settings,
                   **options: object) -> str | None:
    """``command`` over the faulty link; when it stops with its one-line error instead, a clean re-run must
    complete (returns that error, or None)."""
    error = interrupted(command, run, flaky, **options)
    if error is not None:
        command(run, direct, **options)
    return error


# --- checks ------------------------------------------------------------------------------------------
def server_copies(settings: Settings, run: Run) -> dict:
    """What Label Studio holds for the run, counted independently of the tool's own bookkeeping."""
    store = AnnotationStore(run.labels_path)
    try:
        project, run_id = int(store.get_meta("project_id")), store.get_meta("run_id")
        media = store.get_meta(f"media_project_for_{project}")
        uploads = store.uploads(project)
        recorded = {t.task_id for t in store.tasks(project)}
    finally:
        store.close()
    with Studio(settings) as studio:
        tasks = [t for t in studio.list_tasks(project) if (t.get("data") or {}).get("run_id") == run_id]
        per_image = Counter(int(t["data"]["image_id"]) for t in tasks)
        names = Counter()
        media_projects = 0
        if media is not None:
            for item in studio.client.files.list(id=int(media), all_=True):
                match = STORED_NAME.match(PurePosixPath(item.file).name)
                names[match["name"] if match else item.file] += 1
            shown = studio.project(int(media))
            media_projects = len(studio.projects_named(shown.title, shown.description or ""))
        projects = len(studio.projects_named(*project_identity(run, run_id)))
    return {
        "images": sorted(per_image),
        "duplicate_tasks": sum(n - 1 for n in per_image.values()),
        "unrecorded_tasks": len({int(t["id"]) for t in tasks} - recorded),
        "files": sum(names.values()),
        "example_files": sum(n for name, n in names.items() if name.startswith("example-")),
        "duplicate_uploads": sum(n - 1 for n in names.values()),
        "unrecorded_uploads": len(set(names) - set(uploads)),
        "projects": projects,
        "media_projects": media_projects,
    }


def push_is_complete(copies: dict, run: Run) -> bool:
    """Every selected image is one recorded task; every picture stored once and recorded (the tasks' two each, and
    the instructions' two examples); one project each."""
    selected = sorted(int(r["image_id"]) for r in run.load_csv(run.selection_path(run.rounds()[-1]), "sample"))
    return (copies["images"] == selected and copies["duplicate_tasks"] == copies["unrecorded_tasks"] == 0
            and copies["duplicate_uploads"] == copies["unrecorded_uploads"] == 0 and copies["example_files"] == 2
            and copies["files"] == 2 * len(selected) + copies["example_files"]
            and copies["projects"] == copies["media_projects"] == 1)


def dump(path: Path) -> list[tuple]:
    """The tasks and annotations tables, row by row (what a pull writes)."""
    with sqlite3.connect(path) as db:
        return [("task", *row) for row in db.execute("SELECT * FROM tasks ORDER BY task_id")] + [
            ("annotation", *row) for row in db.execute("SELECT * FROM annotations ORDER BY annotation_id")]


def outcome(path: Path) -> dict:
    """A run's database without Label Studio's ids and clocks: comparable between two projects."""
    store = AnnotationStore(path)
    try:
        tasks = sorted((t.image_id, t.round, t.deleted, t.synced_at is not None) for t in store.tasks())
        answers = sorted((a.image_id, a.annotator, a.choice, a.skipped, json.dumps(a.boxes), a.note, a.lead_time)
                         for a in store.annotations())
        project = store.get_meta("project_id")
        uploads = sorted(store.uploads(int(project))) if project else []
    finally:
        store.close()
    return {"tasks": tasks, "annotations": answers, "uploads": uploads}


# --- scenarios ---------------------------------------------------------------------------------------
def scenario_push_ls_killed(work: Path, seed: int = 0, quick: bool = True, run: Path | None = None,
                            server: LocalLabelStudio | None = None) -> ScenarioResult:
    """Kill Label Studio at each point of ``push`` (``seed``: unused, the kill points are exact)."""
    result = ScenarioResult("push_ls_killed")
    source = source_run(work, quick, run)
    with label_studio(work, server) as studio_server:
        for number, (point, pattern, occurrence) in enumerate(PUSH_KILLS[quick]):
            started = time.perf_counter()
            copy = copy_run(source, work / f"push-{number}")
            hook = KillAt(studio_server, pattern, occurrence)
            with FaultProxy(studio_server.port, on_response=hook) as proxy:
                error = interrupted(push_run, copy, settings_of(studio_server, proxy.url, KILL_RETRY), progress=False)
            studio_server.start()
            summary = push_run(copy, settings_of(studio_server), progress=False)
            copies = server_copies(settings_of(studio_server), copy)
            complete = push_is_complete(copies, copy)
            result.faults_injected += hook.fired
            result.faults_survived += hook.fired and complete and error is not None and "\n" not in error
            result.duplicate_tasks += copies["duplicate_tasks"]
            result.detail[point] = {"killed": hook.fired, "error": error, "next_push": summary,
                                    "complete": complete, **{k: v for k, v in copies.items() if k != "images"},
                                    "seconds": round(time.perf_counter() - started, 1)}
    return result


def scenario_pull_ls_killed(work: Path, seed: int = 0, quick: bool = True, run: Path | None = None,
                            server: LocalLabelStudio | None = None) -> ScenarioResult:
    """Kill Label Studio while ``pull`` reads; ``seed`` seeds the simulated annotator's noise."""
    result = ScenarioResult("pull_ls_killed")
    source = source_run(work, quick, run)
    with label_studio(work, server) as studio_server:
        direct = settings_of(studio_server)
        annotated = copy_run(source, work / "pull-annotated")
        push_run(annotated, direct, progress=False)
        simulate_annotator(annotated, direct, noise=ANNOTATOR_NOISE, seed=seed, progress=False)
        reference = copy_run(annotated.root, work / "pull-reference", history=True)
        pull_run(reference, direct)
        expected = dump(reference.labels_path)
        result.detail["annotations"] = sum(row[0] == "annotation" for row in expected)
        for number, (point, pattern, occurrence) in enumerate(PULL_KILLS[quick]):
            copy = copy_run(annotated.root, work / f"pull-{number}", history=True)
            before = dump(copy.labels_path)
            hook = KillAt(studio_server, pattern, occurrence)
            with FaultProxy(studio_server.port, on_response=hook) as proxy:
                error = interrupted(pull_run, copy, settings_of(studio_server, proxy.url, KILL_RETRY))
            untouched = dump(copy.labels_path) == before
            studio_server.start()
            pull_run(copy, direct)
            after = dump(copy.labels_path)
            lost = len(set(expected) - set(after))
            result.faults_injected += hook.fired
            result.faults_survived += (hook.fired and untouched and after == expected and error is not None
                                       and "\n" not in error)
            result.annotations_lost += lost
            result.detail[point] = {"killed": hook.fired, "error": error, "store_untouched": untouched,
                                    "same_as_undisturbed": after == expected, "rows_missing": lost}
    return result


def scenario_lost_answers(work: Path, seed: int = 0, quick: bool = True, run: Path | None = None,
                          server: LocalLabelStudio | None = None) -> ScenarioResult:
    """Answers lost after the server acted, survived by the retries themselves (``seed``: the annotator's)."""
    result = ScenarioResult("lost_answers")
    source = source_run(work, quick, run)
    with label_studio(work, server) as studio_server:
        direct = settings_of(studio_server)
        copy = copy_run(source, work / "lost-answers")
        hook = DropAnswers(list(LOST_ANSWERS))
        with FaultProxy(studio_server.port, on_response=hook) as proxy:
            push_error = interrupted(push_run, copy, settings_of(studio_server, proxy.url), progress=False)
            answered = simulate_annotator(copy, direct, noise=ANNOTATOR_NOISE, seed=seed, progress=False)
            hook.patterns.append(ANNOTATION_LISTING)
            pull_error = interrupted(pull_run, copy, settings_of(studio_server, proxy.url))
        copies = server_copies(direct, copy)
        pulled = len(outcome(copy.labels_path)["annotations"])
        survived = (push_error is None and pull_error is None and push_is_complete(copies, copy)
                    and pulled == answered["core"] + answered["spurious"])
        result.faults_injected = len(hook.dropped)
        result.faults_survived = result.faults_injected if survived else 0
        result.duplicate_tasks = copies["duplicate_tasks"]
        result.annotations_lost = answered["core"] + answered["spurious"] - pulled
        result.detail = {"dropped": hook.dropped, "push_error": push_error, "pull_error": pull_error,
                         **{k: v for k, v in copies.items() if k != "images"}}
    return result


def scenario_flaky_network(work: Path, seed: int = 0, quick: bool = True, run: Path | None = None,
                           server: LocalLabelStudio | None = None, share: float = FLAKY_SHARE) -> ScenarioResult:
    """Push and pull through a proxy that spoils ``share`` of the requests (seeded by ``seed``)."""
    result = ScenarioResult("flaky_network")
    source = source_run(work, quick, run)
    plan = FaultPlan(delay=share * 0.3, truncate=share * 0.25, reset=share * 0.25, bad_gateway=share * 0.2)
    with label_studio(work, server) as studio_server:
        direct = settings_of(studio_server)
        clean = copy_run(source, work / "flaky-clean")
        push_run(clean, direct, progress=False)
        simulate_annotator(clean, direct, noise=ANNOTATOR_NOISE, seed=seed, progress=False)
        pull_run(clean, direct)
        expected = outcome(clean.labels_path)
        for schedule in range(seed, seed + FLAKY_SEEDS[quick]):
            started = time.perf_counter()
            copy = copy_run(source, work / f"flaky-{schedule}")
            with FaultProxy(studio_server.port, plan, seed=schedule) as proxy:
                flaky = settings_of(studio_server, proxy.url)
                errors = [despite_faults(push_run, copy, flaky, direct, progress=False)]
                simulate_annotator(copy, direct, noise=ANNOTATOR_NOISE, seed=seed, progress=False)
                errors.append(despite_faults(pull_run, copy, flaky, direct))
                # once more: nothing new to push or pull, and the faults must not make up a change
                errors.append(despite_faults(push_run, copy, flaky, direct, progress=False))
                errors.append(despite_faults(pull_run, copy, flaky, direct))
                counters = proxy.counters()
            copies = server_copies(direct, copy)
            correct = (outcome(copy.labels_path) == expected and push_is_complete(copies, copy)
                       and all("\n" not in (e or "") for e in errors))
            injected = sum(counters["faults"].values())
            result.faults_injected += injected
            result.faults_survived += injected if correct else 0
            result.duplicate_tasks += copies["duplicate_tasks"]
            result.annotations_lost += len(set(expected["annotations"]) - set(outcome(copy.labels_path)["annotations"]))
            result.detail[f"schedule {schedule}"] = {
                **counters, "stopped": [e for e in errors if e], "correct": correct,
                "duplicate_uploads": copies["duplicate_uploads"], "seconds": round(time.perf_counter() - started, 1)}
    return result


SCENARIOS = {"push_ls_killed": scenario_push_ls_killed, "pull_ls_killed": scenario_pull_ls_killed,
             "lost_answers": scenario_lost_answers, "flaky_network": scenario_flaky_network}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-out/faults-network", help="runs and server data go here")
    parser.add_argument("--quick", action="store_true", help="the small versions the tests run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(args.work)
    with label_studio(work, None) as server:
        for name, scenario in SCENARIOS.items():
            result = scenario(work / name, seed=args.seed, quick=args.quick, server=server)
            print(json.dumps(result.to_dict(), indent=2, default=str))


if __name__ == "__main__":
    main()
