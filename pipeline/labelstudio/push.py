"""``push``: the selected images become Label Studio tasks, with pre-annotations.

Idempotent by construction: the run's database remembers which image became which task in which project
(and which file was uploaded where). What a push killed (or cut off by the network) before its bookkeeping
left in Label Studio is found again and adopted instead of duplicated: tasks by their ``run_id``, pictures by
their file name in the companion project, projects by their title and description (which carry the run id).
The same look-ups make retrying an import, an upload or a project creation safe after a broken connection.
The machinery is shared with ``push-checks`` (:mod:`pipeline.labelstudio.verify`): a :class:`ProjectKind` says
how a run's project is found and configured, a :class:`TaskBook` where its tasks are recorded, and
:func:`pushing` opens both ends and adopts what a killed push left.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

import label_config
from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.config import option
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore, TaskRecord
from pipeline.core.verdicts import CHOICES
from pipeline.labelstudio.client import IMPORT_BATCH, MEDIA_CONFIG, UPLOAD_BATCH, Settings, Studio
from pipeline.labelstudio.guidance import example_pictures, instructions, show_instructions
from pipeline.labelstudio.schema import ANSWER, prediction
from pipeline.slim.prelabel import attention_prior

log = logging.getLogger(__name__)
STORAGES = ("upload", "local-files")
TASK_VIEWS = ("image", "attention")  # a task's pictures, named as its data fields (the overview is for people)
UPLOAD_THREADS = 2  # two requests in flight keep the server busy while the other one's response travels
RUN_ID_LENGTH = 12  # hex digits of a run id: unique among a server's runs, short enough to read in a task
TITLE_LENGTH = 50  # Label Studio's limit on a project title

PREDICTION_DISPLAY = ("hide", "show")  # what annotators see of the model's guess (Label Studio's project setting)

@dataclass(frozen=True)
class PushOptions:
    """What ``push`` sends where; the fields are :func:`push_run`'s keyword arguments."""

    project_id: int | None = option(None, "use this existing project (default: the run's own, created on first "
                                          "push)", flag="--project", metavar="ID")
    new_project: bool = option(False, "create a new project even if the run has one")
    round_: int | None = option(None, "selection round to push (default: the latest)", flag="--round")
    storage: str = option("upload", "upload the pictures through the import API (works with remote and docker "
                                    "servers) or serve them as Label Studio local files", choices=STORAGES)
    document_root: str | None = option(None, "with --storage local-files: the server's "
                                             "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", metavar="DIR")
    annotations_per_task: int = option(1, "annotators asked per task (Label Studio's maximum annotations; each "
                                          "annotator sees a task at most once)", metavar="N")
    overlap_share: float = option(1.0, "with --annotations-per-task above 1: the share of tasks asked that many "
                                       "times, the rest once (Label Studio's overlap cohort)", metavar="F")
    predictions: str = option("hide", "show annotators the model's guess as a pre-selected answer, or hide it "
                                      "(default: a shown guess anchors the very judgement SLIM needs)",
                              choices=PREDICTION_DISPLAY)


def run_id_of(store: AnnotationStore) -> str:
    """A stable id for the run, written into every task so its tasks can be told from anyone else's."""
    run_id = store.get_meta("run_id")
    if run_id is None:
        run_id = uuid.uuid4().hex[:RUN_ID_LENGTH]
        with store.transaction() as db:
            store.set_meta("run_id", run_id, db)
    return run_id


def latest_round(run: Run) -> int:
    rounds = run.rounds()
    if not rounds:
        raise PipelineError(f"no selection in {run.root}; run `python -m pipeline sample --run {run.root}` first")
    return rounds[-1]


def model_version(run: Run) -> str:
    """Identity of the checkpoint whose attention the prediction comes from (stable across restarts)."""
    return f"slim-prior-{(run.stage_fingerprint('embed') or 'unknown')[:10]}"


def project_identity(run: Run, run_id: str) -> tuple[str, str]:
    """Title and description of the run's project: the run id in both finds it again after a push that was
    killed between creating it and remembering it."""
    return (f"SLIM {run.root.name} {run_id[:6]}"[:TITLE_LENGTH],
            f"SLIM attention review for run {run.root} (run id {run_id})")


@dataclass(frozen=True)
class ProjectKind:
    """One kind of project a run has (attention review, counterfactual check): where ``labels.sqlite`` remembers
    its id, the title and description it is found again by, its labeling config, and the choices a project given
    with ``--project`` must offer."""

    meta_key: str
    title: str
    description: str
    config: str
    answer: str
    choices: tuple[str, ...]
    instructions: str = ""  # shown to annotators before their first task (HTML)


def attention_project(run: Run, run_id: str) -> ProjectKind:
    """The run's SLIM attention-review project."""
    return ProjectKind("project_id", *project_identity(run, run_id),
                       label_config.attention(run.load_config().embed.threshold), ANSWER, CHOICES, instructions())


def resolve_project(studio: Studio, store: AnnotationStore, kind: ProjectKind, project_id: int | None,
                    new_project: bool) -> int:
    """``--project ID``, else the run's project of this kind (remembered, or left by an interrupted push), else a
    new one; the choice is remembered."""
    if project_id is None and not new_project:
        remembered = store.get_meta(kind.meta_key)
        project_id = int(remembered) if remembered else None
    if project_id is None:
        found = [] if new_project else studio.projects_named(kind.title, kind.description)
        if found:
            project_id = found[0]
            log.info("adopted project %d '%s' (created by an interrupted push)", project_id, kind.title)
        else:
            project_id = studio.create_project(kind.title, kind.description, config=kind.config,
                                               instructions=kind.instructions)
            log.info("created project %d '%s'", project_id, kind.title)
    else:
        studio.check_project(project_id, kind.answer, kind.choices)
    with store.transaction() as db:
        store.set_meta(kind.meta_key, str(project_id), db)
    return project_id


def media_identity(title: str, project_id: int) -> tuple[str, str]:
    """Title and description of the companion project that holds the pictures of project ``project_id`` (titled
    ``title``): what it is and that nobody should annotate in it or delete it, since Label Studio lists it beside
    the projects people work in."""
    suffix = " - pictures, do not annotate"
    description = (f"Holds the pictures shown in the tasks of project {project_id} ('{title}'): Label Studio keeps "
                   "uploaded files per project and refuses them in a project whose tasks show two pictures. It has "
                   f"no tasks: annotate in project {project_id}, not here, and do not delete it (those tasks would "
                   "lose their images).")
    return title[:TITLE_LENGTH - len(suffix)] + suffix, description


def former_media_identity(title: str, project_id: int) -> tuple[str, str]:
    """How earlier versions named the companion project: still found, then renamed."""
    return (f"{title} images"[:TITLE_LENGTH],
            f"Pictures of project {project_id}'s tasks; deleting this project breaks their images")


def media_project(studio: Studio, store: AnnotationStore, project_id: int) -> int:
    """The companion project that holds the uploaded pictures of ``project_id`` (created once; one left by an
    interrupted push is adopted, by its title and description or by those earlier versions gave it). Its title
    and description say what it is; one named by an earlier version is renamed."""
    key = f"media_project_for_{project_id}"
    remembered = store.get_meta(key)
    title = studio.project(project_id).title
    wanted = media_identity(title, project_id)
    if remembered is not None:
        media = int(remembered)
    else:
        found = studio.projects_named(*wanted) or studio.projects_named(*former_media_identity(title, project_id))
        media = found[0] if found else studio.create_project(*wanted, config=MEDIA_CONFIG)
        with store.transaction() as db:
            store.set_meta(key, str(media), db)
    studio.describe_project(media, *wanted)
    return media


class TaskBook(Protocol):
    """Where a project's tasks are recorded in the run's database, and what identifies what a task shows.

    ``field`` names the task-data value that identifies it (an image id, a generated image's key): a push never
    imports a second task for a value that has one.
    """

    field: str

    def known(self) -> set[int]:
        """Task ids recorded for the project, deleted ones included (those are never adopted again)."""

    def present(self) -> set[Hashable]:
        """``field`` values that have a live task in the project."""

    def record(self, made: list[tuple[int, dict]]) -> None:
        """Remember tasks made (or found) in Label Studio: (task id, task data) pairs."""


@dataclass(frozen=True)
class AttentionTasks:
    """The attention project's tasks: the ``tasks`` table, one task per image id."""

    store: AnnotationStore
    project_id: int
    field: str = "image_id"

    def known(self) -> set[int]:
        return {t.task_id for t in self.store.tasks(self.project_id, include_deleted=True)}

    def present(self) -> set[Hashable]:
        return {t.image_id for t in self.store.tasks(self.project_id)}

    def record(self, made: list[tuple[int, dict]]) -> None:
        self.store.add_tasks(TaskRecord(task_id, self.project_id, int(data["image_id"]), int(data.get("round", 1)))
                             for task_id, data in made)


def adopt_unrecorded(studio: Studio, book: TaskBook, project_id: int, run_id: str) -> int:
    """Record tasks of this run that exist in Label Studio but not in the database; returns how many."""
    known = book.known()
    orphans = [(int(t["id"]), t["data"]) for t in studio.list_tasks(project_id)
               if (t.get("data") or {}).get("run_id") == run_id and int(t["id"]) not in known]
    if orphans:
        book.record(orphans)
    return len(orphans)


def import_batch(studio: Studio, book: TaskBook, project_id: int, run_id: str, tasks: list[dict]) -> int:
    """Import one batch of tasks and record them; returns how many this call created.

    An import is not idempotent, but its tasks carry the run id: after a failure on the way (a broken
    connection, a 5xx: the server may have created them anyway) the next attempt first adopts the tasks of
    this run that did arrive and imports only the rest, so no task is created twice.
    """
    def attempt(number: int) -> int:
        arrived = adopt_unrecorded(studio, book, project_id, run_id) if number else 0
        present = book.present()
        todo = [task for task in tasks if task["data"][book.field] not in present]
        ids = studio.import_tasks(project_id, todo) if todo else []
        book.record([(task_id, task["data"]) for task_id, task in zip(ids, todo)])
        return arrived + len(ids)

    return studio.retrying("import tasks", attempt, project_id)


def import_all(studio: Studio, book: TaskBook, project_id: int, run_id: str, tasks: list[dict],
               progress: bool) -> int:
    """Import ``tasks`` in batches of :data:`IMPORT_BATCH`, each recorded as soon as it is made; returns how many
    were created (a batch a lost attempt had made is adopted, not counted twice)."""
    created = 0
    with tqdm(total=len(tasks), desc="import", unit="task", disable=not progress or not tasks) as bar:
        for start in range(0, len(tasks), IMPORT_BATCH):
            batch = import_batch(studio, book, project_id, run_id, tasks[start:start + IMPORT_BATCH])
            created += batch
            bar.update(batch)
    return created


@dataclass(frozen=True)
class ProjectPush:
    """A push in progress: the run's database, the open server, and the project whose tasks it adds."""

    store: AnnotationStore
    studio: Studio
    run_id: str
    project_id: int
    book: TaskBook
    adopted: int  # tasks a killed push had made and this one recorded

    def stage(self, paths: list[Path], storage: str = "upload", document_root: Path | None = None,
              progress: bool = True) -> dict[str, str]:
        """:func:`stage_images` into this project."""
        return stage_images(self.studio, self.store, self.project_id, paths, storage, document_root, progress)

    def import_tasks(self, tasks: list[dict], progress: bool) -> int:
        """:func:`import_all` into this project."""
        return import_all(self.studio, self.book, self.project_id, self.run_id, tasks, progress)


@contextmanager
def pushing(run: Run, settings: Settings, kind: Callable[[str], ProjectKind],
            book: Callable[[AnnotationStore, int], TaskBook], project_id: int | None,
            new_project: bool) -> Iterator[ProjectPush]:
    """Open the database and the server, resolve the project of ``kind`` (made from the run id) and adopt what
    a killed push left unrecorded; everything is closed afterwards, whatever happens."""
    store = AnnotationStore(run.labels_path)
    studio = Studio(settings)
    try:
        run_id = run_id_of(store)
        studio.connect()
        project = resolve_project(studio, store, kind(run_id), project_id, new_project)
        tasks = book(store, project)
        yield ProjectPush(store, studio, run_id, project, tasks, adopt_unrecorded(studio, tasks, project, run_id))
    finally:
        store.close()
        studio.close()


def resolved_folders(paths: list[Path]) -> dict[str, Path]:
    """Each distinct folder of ``paths`` (as a string) -> its resolved path: resolved once per folder, not per
    file (a push has thousands of files in one or two folders; ``Path.resolve`` is a system call per component,
    and even ``path.parent`` builds a new object: together seconds at 10,000 tasks)."""
    return {folder: Path(folder).resolve() for folder in {os.path.dirname(path) for path in paths}}


def local_file_urls(paths: list[Path], document_root: Path) -> dict[str, str]:
    """URLs for Label Studio's local-files serving (files must lie below its document root)."""
    root = document_root.resolve()
    relative_parts = {}
    for folder, resolved in resolved_folders(paths).items():
        try:
            relative_parts[folder] = resolved.relative_to(root).parts
        except ValueError:
            raise PipelineError(
                f"{folder} is not below --document-root {document_root}; it must equal Label Studio's "
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT and contain the run directory"
            ) from None
    return {path.name: "/data/local-files/?d=" + "/".join((*relative_parts[os.path.dirname(path)], path.name))
            for path in paths}


def stage_images(studio: Studio, store: AnnotationStore, project_id: int, paths: list[Path], storage: str,
                 document_root: Path | None, progress: bool) -> dict[str, str]:
    """Make every file viewable by Label Studio; uploads each file at most once per project."""
    if storage == "local-files":
        if document_root is None:
            raise PipelineError("--storage local-files needs --document-root (Label Studio's "
                                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)")
        urls = local_file_urls(paths, document_root)
        studio.ensure_local_storage(project_id, sorted(str(folder) for folder in resolved_folders(paths).values()))
        return urls
    urls = store.uploads(project_id)
    missing = [p for p in paths if p.name not in urls]
    if not missing:
        if store.get_meta(f"media_project_for_{project_id}") is not None:
            media_project(studio, store, project_id)  # one an earlier version named is renamed
        return urls
    media = media_project(studio, store, project_id)
    stored = studio.uploaded_files(media)  # uploaded by a push that was stopped before it recorded them
    adopted = {p.name: stored[p.name] for p in missing if p.name in stored}
    if adopted:
        store.add_uploads(project_id, adopted)
        urls.update(adopted)
        log.info("%d pictures recovered from an interrupted push", len(adopted))
    missing = [p for p in missing if p.name not in adopted]
    batches = [missing[start:start + UPLOAD_BATCH] for start in range(0, len(missing), UPLOAD_BATCH)]
    with tqdm(total=len(missing), desc="upload", unit="file", disable=not progress or not missing) as bar, \
            ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        for uploaded in pool.map(lambda batch: studio.upload_files(media, batch), batches):
            store.add_uploads(project_id, uploaded)  # remembered at once: a re-run never uploads twice
            urls.update(uploaded)
            bar.update(len(uploaded))
    return urls


def push_run(run: Run, settings: Settings, project_id: int | None = None, new_project: bool = False,
             round_: int | None = None, storage: str = "upload", document_root: str | Path | None = None,
             annotations_per_task: int = 1, overlap_share: float = 1.0, predictions: str = "hide",
             progress: bool = True) -> dict:
    """Push the selection of ``round_`` (default: the latest) as tasks, asked of ``annotations_per_task``
    annotators on ``overlap_share`` of them, the model's guess shown or hidden (the project's settings);
    returns counts. Tasks always carry the guess as a prediction, so showing it later needs no new push."""
    if storage not in STORAGES:
        raise PipelineError(f"unknown --storage {storage!r}; choose upload or local-files")
    if annotations_per_task < 1:
        raise PipelineError(f"--annotations-per-task must be at least 1, got {annotations_per_task}")
    if not 0.0 < overlap_share <= 1.0:
        raise PipelineError(f"--overlap-share must be in (0, 1], got {overlap_share}")
    if predictions not in PREDICTION_DISPLAY:
        raise PipelineError(f"unknown --predictions {predictions!r}; choose {' or '.join(PREDICTION_DISPLAY)}")
    round_ = round_ or latest_round(run)
    selection = run.load_csv(run.selection_path(round_), "sample --run RUN")
    arrays = AttentionArrays.load(run.require(run.attention_path, "embed --run RUN"))
    with pushing(run, settings, lambda run_id: attention_project(run, run_id), AttentionTasks, project_id,
                 new_project) as push:
        # before tasks arrive: Label Studio deals the overlap out as they are imported
        push.studio.configure_annotation(push.project_id, annotations_per_task, overlap_share, predictions == "show")
        present = push.book.present()
        todo = [r for r in selection if int(r["image_id"]) not in present]
        views = task_views(run, round_, todo)
        paths = [path for pictures in views.values() for path in pictures]
        for path in paths:
            if not path.exists():
                raise PipelineError(f"{path} is missing; re-run `python -m pipeline sample --run {run.root} --force`")
        examples = example_pictures(run, arrays)  # one core, one spurious: staged like the tasks' pictures
        urls = push.stage(paths + [path for _, path in examples], storage,
                          Path(document_root) if document_root else None, progress)
        instructed = show_instructions(push.studio, push.project_id, examples, urls, arrays)  # before any task
        created = push.import_tasks(task_payloads(run, arrays, round_, todo, push.run_id, picture_urls(views, urls)),
                                    progress)
        reopened = reopen_contested(push, selection, round_)  # after the imports, which re-deal the overlap
    project, adopted = push.project_id, push.adopted
    summary = {"project_id": project, "created": created, "already_present": len(selection) - len(todo),
               "adopted": adopted, "round": round_, "annotations_per_task": annotations_per_task,
               "overlap_share": overlap_share if annotations_per_task > 1 else 0.0, "predictions": predictions,
               "examples": {example.verdict: example.image_id for example, _ in examples},
               "instructions_updated": instructed, "reopened": reopened}
    log.info("project %d: %d tasks created, %d already there%s; open %s", project, created,
             summary["already_present"], f" ({adopted} recovered from an interrupted push)" if adopted else "",
             push.studio.project_url(project))
    return summary


def reopen_contested(push: ProjectPush, selection: list[dict[str, str]], round_: int) -> int:
    """Put the round's contested images (the selection's ``reask`` rows) back before the team: each one's task
    from an earlier round asks one answer more than the people who had answered it when it was sampled
    (:meth:`Studio.reopen_task`; Label Studio deals it only to the others). Returns how many tasks changed."""
    wanted = {int(r["image_id"]): len(r["answered_by"].split(";")) + 1 for r in selection if r.get("reask") == "1"}
    if not wanted:
        return 0
    tasks = {t.image_id: t.task_id for t in push.store.tasks(push.project_id)
             if t.image_id in wanted and t.round < round_}
    if len(tasks) < len(wanted):
        log.warning("%d contested images have no task from an earlier round in project %d: asked as new tasks",
                    len(wanted) - len(tasks), push.project_id)
    reopened = sum(push.studio.reopen_task(task_id, wanted[image_id]) for image_id, task_id in tasks.items())
    log.info("%d contested images asked again (%d tasks reopened)", len(tasks), reopened)
    return reopened


def task_views(run: Run, round_: int, rows: list[dict[str, str]]) -> dict[int, tuple[Path, ...]]:
    """Image id -> the files of its task's pictures (:data:`TASK_VIEWS`), built once per push: building these
    paths again for every use cost seconds at 10,000 tasks."""
    return {int(r["image_id"]): tuple(run.view_path(round_, int(r["image_id"]), kind) for kind in TASK_VIEWS)
            for r in rows}


def picture_urls(views: dict[int, tuple[Path, ...]], urls: dict[str, str]) -> dict[int, tuple[str, ...]]:
    """Image id -> the URLs of its task's pictures, from :func:`task_views` and ``urls`` (file name -> URL)."""
    return {image_id: tuple(urls[path.name] for path in paths) for image_id, paths in views.items()}


def task_payloads(run: Run, arrays: AttentionArrays, round_: int, rows: list[dict[str, str]], run_id: str,
                  pictures: dict[int, tuple[str, ...]]) -> list[dict]:
    """The tasks ``push`` imports for selection ``rows``, their pictures at ``pictures`` (:func:`picture_urls`);
    a function of its own so that a benchmark can hand Label Studio exactly what a push sends."""
    priors = attention_prior(arrays.cam)
    class_names, version = list(arrays.class_names), model_version(run)
    return [task_payload(r, round_, run_id, pictures[int(r["image_id"])], class_names,
                         float(priors[arrays.row_of(int(r["image_id"]))]), version) for r in rows]


def task_payload(row: dict[str, str], round_: int, run_id: str, pictures: tuple[str, ...], class_names: list[str],
                 p_core: float, version: str) -> dict:
    """One task: the two pictures, what the annotator reads, what the pipeline needs back, a prediction."""
    predicted = class_names[int(row["pred"])]
    confidence = float(row["confidence"])
    return {
        "data": {
            **dict(zip(TASK_VIEWS, pictures)),
            "info": f"class: {row['class_name']} · model predicts: {predicted} ({confidence:.0%})",
            "image_id": int(row["image_id"]),
            "class_name": row["class_name"],
            "prediction": predicted,
            "confidence": round(confidence, 4),
            "run_id": run_id,
            "round": round_,
        },
        "predictions": [prediction(p_core, version)],
    }
