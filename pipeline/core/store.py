"""The run's annotation database (``labels.sqlite``): Label Studio tasks, uploads and every annotation.

``push`` records which image became which task (so pushing twice creates nothing new), ``pull`` and the ML
backend's webhooks mirror annotations here, keyed by Label Studio's annotation id so that the same answer
arriving twice is stored once. ``pull`` also keeps its own account (``pulled``) of every answer it has reported
and as what, so that its "new" means new to the run's pulls, whichever writer stored the answer first.
``push-checks`` / ``pull-checks`` keep the verification of generated images apart (``check_tasks``, ``checks``):
those answers judge a picture, not an attention map, and must never reach propagation. Tables are created when
missing, so a database made by an older version opens unchanged. Each write is one SQLite transaction: a command
that dies half-way leaves the database as it was before the command.

Writers run at the same time: the backend serves webhooks from a thread pool while a ``pull`` runs in another
process. SQLite connections must not be shared between threads that open transactions, so the store keeps one
connection per thread (opened on first use, closed by :meth:`AnnotationStore.close` or when its thread has
ended), in WAL mode (readers never block the writer) with a busy timeout: ``BEGIN IMMEDIATE`` makes each
writer wait for the write lock instead of failing. A file that is not a valid database is refused when the
store opens, with the file left exactly as it was.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.verdicts import CHOICES

# How long a writer waits for another's transaction (a pull of thousands of tasks commits in well under a
# second; 30 s only runs out when something holds the database for good, e.g. a stopped process)
BUSY_TIMEOUT_S = 30.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    task_id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL,
    image_id INTEGER NOT NULL,
    round INTEGER NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    synced_at TEXT  -- the task's updated_at in Label Studio when its annotations were last mirrored
);
CREATE INDEX IF NOT EXISTS tasks_by_image ON tasks (project_id, image_id);
CREATE TABLE IF NOT EXISTS uploads (
    project_id INTEGER NOT NULL,
    local_name TEXT NOT NULL,
    url TEXT NOT NULL,
    PRIMARY KEY (project_id, local_name)
);
CREATE TABLE IF NOT EXISTS annotations (
    annotation_id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL,
    image_id INTEGER NOT NULL,
    annotator TEXT,
    choice TEXT,
    skipped INTEGER NOT NULL DEFAULT 0,
    boxes TEXT NOT NULL DEFAULT '[]',
    note TEXT,
    created_at TEXT,
    updated_at TEXT,
    lead_time REAL
);
CREATE INDEX IF NOT EXISTS annotations_by_task ON annotations (task_id);
CREATE TABLE IF NOT EXISTS check_tasks (  -- verification tasks of generated (counterfactual) images
    task_id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL,
    key TEXT NOT NULL,  -- the image's key: the digest of its bytes
    class_name TEXT NOT NULL,  -- the class the image claims (and would be trained as)
    synced_at TEXT
);
CREATE INDEX IF NOT EXISTS check_tasks_by_key ON check_tasks (project_id, key);
CREATE TABLE IF NOT EXISTS checks (
    annotation_id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    accepted INTEGER,  -- 1 yes (still shows its class), 0 no; NULL skipped
    annotator TEXT,
    updated_at TEXT
);
CREATE INDEX IF NOT EXISTS checks_by_task ON checks (task_id);
"""
# What ``pull`` has reported of each answer: its content as last seen (without the annotator's name, which is
# how the tool names a person, not part of the answer). Created apart from SCHEMA: a database made before it
# existed gets it filled from the answers already stored (see :meth:`AnnotationStore._add_pull_account`).
PULLED_SCHEMA = """
CREATE TABLE pulled (
    annotation_id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL,
    seen TEXT NOT NULL
);
CREATE INDEX pulled_by_task ON pulled (task_id);
"""


@dataclass(frozen=True)
class MirroredTable:
    """The statements that mirror one task's rows of a table (first column: the annotation id), written out in
    full: no SQL is assembled from strings at run time."""

    select: str
    upsert: str
    delete: str


ANNOTATION_ROWS = ("SELECT annotation_id, task_id, image_id, annotator, choice, skipped, boxes, note, created_at, "
                   "updated_at, lead_time FROM annotations")
ANNOTATION_TABLE = MirroredTable(
    select="SELECT annotation_id, task_id, image_id, annotator, choice, skipped, boxes, note, created_at, updated_at, "
           "lead_time FROM annotations WHERE task_id = ?",
    upsert="INSERT OR REPLACE INTO annotations (annotation_id, task_id, image_id, annotator, choice, skipped, boxes, "
           "note, created_at, updated_at, lead_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    delete="DELETE FROM annotations WHERE annotation_id = ?")
CHECK_TABLE = MirroredTable(
    select="SELECT annotation_id, task_id, key, accepted, annotator, updated_at FROM checks WHERE task_id = ?",
    upsert="INSERT OR REPLACE INTO checks (annotation_id, task_id, key, accepted, annotator, updated_at) "
           "VALUES (?, ?, ?, ?, ?, ?)",
    delete="DELETE FROM checks WHERE annotation_id = ?")

@dataclass(frozen=True)
class Annotation:
    """One submitted (or skipped) answer, as stored: what the annotator chose, drew and wrote."""

    annotation_id: int
    task_id: int
    image_id: int
    annotator: str | None
    choice: str | None  # core / spurious / unsure; None when skipped
    skipped: bool = False
    boxes: list[dict] = field(default_factory=list)  # {"x","y","width","height"} in percent of the image
    note: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    lead_time: float | None = None

    def row(self) -> tuple:
        return (self.annotation_id, self.task_id, self.image_id, self.annotator, self.choice, int(self.skipped),
                json.dumps(self.boxes, sort_keys=True), self.note, self.created_at, self.updated_at, self.lead_time)

    def seen(self) -> str:
        """What ``pull`` remembers having reported: the answer without the annotator's name (renaming a person
        from a user id to an e-mail is not a change of their answer)."""
        return seen_of(self.row())


def seen_of(row: tuple | list) -> str:
    """:meth:`Annotation.seen` of a stored annotations row (or :meth:`Annotation.row`)."""
    return json.dumps([*row[1:3], *row[4:]])


@dataclass(frozen=True)
class TaskRecord:
    task_id: int
    project_id: int
    image_id: int
    round: int
    deleted: bool = False
    synced_at: str | None = None


@dataclass(frozen=True)
class CheckTask:
    """A verification task: which generated image (by key) it shows, and as which class."""

    task_id: int
    project_id: int
    key: str
    class_name: str
    synced_at: str | None = None


@dataclass(frozen=True)
class Check:
    """One answer to a verification task: ``accepted`` is None when the annotator skipped it."""

    annotation_id: int
    task_id: int
    key: str
    accepted: bool | None
    annotator: str | None = None
    updated_at: str | None = None

    def row(self) -> tuple:
        return (self.annotation_id, self.task_id, self.key, None if self.accepted is None else int(self.accepted),
                self.annotator, self.updated_at)


class AnnotationStore:
    """Typed access to ``labels.sqlite``, safe to share between threads; each public write is one transaction.

    Opening checks the file (``PRAGMA quick_check``) before anything is written to it, so a damaged database
    stops the command with a one-line :class:`PipelineError` instead of failing later or being overwritten.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _connections
        self._connections: dict[threading.Thread, sqlite3.Connection] = {}
        db = self._open_checked()
        db.execute("PRAGMA journal_mode=WAL")  # persistent: recorded in the file, every connection uses it
        db.executescript(SCHEMA)
        self._add_pull_account()

    def _add_pull_account(self) -> None:
        """Create ``pulled`` where it is missing. In a database made before it existed, every stored answer
        counts as reported: older versions' pulls reported what they mirrored, and the alternative, calling
        them all new, would be wrong for nearly all of them. Checked again inside one write transaction, so two
        processes opening such a file at once do it once."""
        exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'pulled'"
        if self._connection().execute(exists).fetchone():
            return
        with self.transaction() as db:
            if db.execute(exists).fetchone():
                return
            for statement in filter(str.strip, PULLED_SCHEMA.split(";")):
                db.execute(statement)
            db.executemany("INSERT INTO pulled VALUES (?, ?, ?)",
                           [(row[0], row[1], seen_of(row)) for row in db.execute(ANNOTATION_ROWS)])

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use.

        Opening one also closes the connections of threads that have ended (a threaded HTTP server starts a
        thread per request), so a long-running backend holds at most one connection per live thread.
        """
        db = getattr(self._local, "db", None)
        if db is not None:
            return db
        # check_same_thread=False only so that close() may close it from another thread; it is used by one
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        with self._lock:
            for thread in [t for t in self._connections if not t.is_alive()]:
                self._connections.pop(thread).close()
            self._connections[threading.current_thread()] = db
        self._local.db = db
        return db

    def _open_checked(self) -> sqlite3.Connection:
        """This thread's connection, after a check, before anything is written, that the file is a valid
        SQLite database; a one-line error otherwise.

        SQLite reports a damaged file lazily (on the first statement that reads the damaged page), so the
        whole file is checked here: quick_check reads every page in time linear in the file's size
        (milliseconds for a run's annotations).
        """
        try:
            db = self._connection()
            problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall() if row[0] != "ok"]
            reason = "; ".join(problems[:1])
        except sqlite3.OperationalError as exc:  # unreadable, or locked for good: not damage
            self.close()
            raise PipelineError(f"cannot open {self.path} ({exc}); check its permissions and that no stopped "
                                "process still holds it") from exc
        except sqlite3.DatabaseError as exc:
            reason = str(exc)
        if reason:
            self.close()
            raise PipelineError(
                f"{self.path} is not a valid SQLite database ({reason}); restore it from a backup, or move "
                "it away to start over (the next push then creates a new Label Studio project)")
        return db

    def close(self) -> None:
        """Close every thread's connection; the store opens new ones if it is used again."""
        with self._lock:
            connections, self._connections = list(self._connections.values()), {}
            self._local = threading.local()
        for db in connections:
            db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All-or-nothing on this thread's connection: BEGIN IMMEDIATE takes the write lock at once, so
        concurrent writers (threads, or pull in another process) wait for each other instead of clashing.

        Inside an open transaction of the same thread it joins that one (the outer one commits or rolls back).
        """
        db = self._connection()
        if db.in_transaction:
            yield db
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # --- meta ---------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._connection().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str, db: sqlite3.Connection | None = None) -> None:
        db = db or self._connection()
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # --- tasks and uploads --------------------------------------------------------------------------
    def tasks(self, project_id: int | None = None, include_deleted: bool = False) -> list[TaskRecord]:
        sql, args = "SELECT task_id, project_id, image_id, round, deleted, synced_at FROM tasks", []
        clauses = [] if include_deleted else ["deleted = 0"]
        if project_id is not None:
            clauses.append("project_id = ?")
            args.append(project_id)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        rows = self._connection().execute(sql + " ORDER BY task_id", args)
        return [TaskRecord(*row[:4], bool(row[4]), row[5]) for row in rows]

    def add_tasks(self, records: Iterable[TaskRecord]) -> None:
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, 0, NULL)",
                           [(r.task_id, r.project_id, r.image_id, r.round) for r in records])

    def mark_tasks_deleted(self, task_ids: Iterable[int]) -> None:
        """The tasks are gone from Label Studio; their annotations stay stored."""
        with self.transaction() as db:
            db.executemany("UPDATE tasks SET deleted = 1 WHERE task_id = ?", [(t,) for t in task_ids])

    def uploads(self, project_id: int) -> dict[str, str]:
        rows = self._connection().execute("SELECT local_name, url FROM uploads WHERE project_id = ?",
                                          (project_id,))
        return dict(rows.fetchall())

    def add_uploads(self, project_id: int, urls: dict[str, str]) -> None:
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO uploads VALUES (?, ?, ?)",
                           [(project_id, name, url) for name, url in urls.items()])

    # --- annotations --------------------------------------------------------------------------------
    def sync_task_annotations(self, task_id: int, annotations: list[Annotation], synced_at: str,
                              db: sqlite3.Connection) -> dict:
        """Make the stored annotations of ``task_id`` equal ``annotations`` (what ``pull`` fetched); count what
        changed for the run's pulls: ``added``, answers no pull had reported yet (the ML backend's webhook may
        have stored them already); ``updated``, answers changed since a pull last saw them; ``removed``, answers
        a pull had reported that are gone.

        ``synced_at`` is the task's ``updated_at`` that this state corresponds to: the next pull skips the task
        unless Label Studio reports a newer one.
        """
        db.execute("UPDATE tasks SET synced_at = ? WHERE task_id = ?", (synced_at, task_id))
        mirror_rows(db, ANNOTATION_TABLE, task_id, [a.row() for a in annotations])
        reported = dict(db.execute("SELECT annotation_id, seen FROM pulled WHERE task_id = ?", (task_id,)))
        changes = {"added": 0, "updated": 0, "removed": 0}
        for annotation in annotations:
            previous, seen = reported.pop(annotation.annotation_id, None), annotation.seen()
            if previous == seen:
                continue
            db.execute("INSERT OR REPLACE INTO pulled VALUES (?, ?, ?)", (annotation.annotation_id, task_id, seen))
            changes["added" if previous is None else "updated"] += 1
        db.executemany("DELETE FROM pulled WHERE annotation_id = ?", [(a,) for a in reported])
        changes["removed"] = len(reported)
        return changes

    def pulled_counts(self) -> dict[int, int]:
        """Answers (given or skipped) per task id as the last pull of each task saw them: a task whose count in
        Label Studio differs has changed since, whatever the ML backend's webhooks stored meanwhile."""
        return dict(self._connection().execute("SELECT task_id, COUNT(*) FROM pulled GROUP BY task_id").fetchall())

    def unnamed_annotators(self) -> set[str]:
        """Stored annotator names that are bare Label Studio user ids: what both writers store when the user
        could not be named (a webhook while Label Studio did not answer, an older version's webhook)."""
        rows = self._connection().execute("SELECT DISTINCT annotator FROM annotations WHERE annotator IS NOT NULL")
        return {name for (name,) in rows if name.isdecimal()}

    def rename_annotators(self, names: dict[str, str], db: sqlite3.Connection) -> int:
        """Replace stored annotator names (a bare user id -> the name ``pull`` gives that user); returns the
        rows changed."""
        return sum(db.execute("UPDATE annotations SET annotator = ? WHERE annotator = ?", (new, old)).rowcount
                   for old, new in names.items() if new != old)

    def annotation_rows(self, task_ids: Iterable[int], db: sqlite3.Connection | None = None) -> dict[int, frozenset]:
        """The stored rows of each of ``task_ids`` (an empty set for a task without any), to compare later:
        a task whose rows changed between two looks was written by someone else meanwhile."""
        wanted = set(task_ids)
        rows: dict[int, set] = {task_id: set() for task_id in wanted}
        for row in (db or self._connection()).execute(ANNOTATION_ROWS):
            if row[1] in wanted:
                rows[row[1]].add(row)
        return {task_id: frozenset(found) for task_id, found in rows.items()}

    def forget_sync(self, task_ids: Iterable[int], db: sqlite3.Connection) -> None:
        """The next pull re-mirrors these tasks whatever Label Studio's listing says about them."""
        db.executemany("UPDATE tasks SET synced_at = NULL WHERE task_id = ?", [(t,) for t in task_ids])

    def upsert_annotation(self, annotation: Annotation) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO annotations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       annotation.row())

    def delete_annotations(self, annotation_ids: Iterable[int]) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM annotations WHERE annotation_id = ?", [(a,) for a in annotation_ids])

    def annotation_counts(self) -> dict[int, int]:
        """Stored annotations (answered or skipped) per task id."""
        rows = self._connection().execute("SELECT task_id, COUNT(*) FROM annotations GROUP BY task_id")
        return dict(rows.fetchall())

    def annotations(self) -> list[Annotation]:
        rows = self._connection().execute(ANNOTATION_ROWS + " ORDER BY annotation_id")
        return [Annotation(r[0], r[1], r[2], r[3], r[4], bool(r[5]), json.loads(r[6]), *r[7:]) for r in rows]

    def summary(self) -> dict:
        """What ``pull`` prints: tasks, annotated tasks and images (and those answered more than once), answers
        by choice, skipped, annotators. Images and answers are counted apart: with several annotators per task
        the answers outnumber the images."""
        annotations = self.annotations()
        answered = [a for a in annotations if not a.skipped]
        per_image = Counter(a.image_id for a in answered)
        return {
            "tasks": len(self.tasks()),
            "annotated_tasks": len({a.task_id for a in answered}),
            "annotated_images": len(per_image),
            "images_answered_more_than_once": sum(n > 1 for n in per_image.values()),
            "annotations": len(answered),
            "skipped": sum(a.skipped for a in annotations),
            "choices": {c: sum(a.choice == c for a in answered) for c in CHOICES},
            "annotators": sorted({a.annotator for a in answered if a.annotator}),
        }

    # --- counterfactual checks ----------------------------------------------------------------------
    def check_tasks(self, project_id: int | None = None) -> list[CheckTask]:
        sql, args = "SELECT task_id, project_id, key, class_name, synced_at FROM check_tasks", ()
        if project_id is not None:
            sql, args = sql + " WHERE project_id = ?", (project_id,)
        return [CheckTask(*row) for row in self._connection().execute(sql + " ORDER BY task_id", args)]

    def add_check_tasks(self, records: Iterable[CheckTask]) -> None:
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO check_tasks VALUES (?, ?, ?, ?, NULL)",
                           [(r.task_id, r.project_id, r.key, r.class_name) for r in records])

    def forget_check_tasks(self, task_ids: Iterable[int], db: sqlite3.Connection) -> None:
        """The tasks are gone from Label Studio: so are their answers (a check is mirrored, not archived: the
        image itself is unchanged, and ``push-checks`` asks again if it is still in the sample)."""
        for task_id in task_ids:
            db.execute("DELETE FROM checks WHERE task_id = ?", (task_id,))
            db.execute("DELETE FROM check_tasks WHERE task_id = ?", (task_id,))

    def sync_checks(self, task_id: int, checks: list[Check], synced_at: str, db: sqlite3.Connection) -> dict:
        """Make the stored answers of check task ``task_id`` equal ``checks`` (as of its ``updated_at``
        ``synced_at``); count what changed."""
        db.execute("UPDATE check_tasks SET synced_at = ? WHERE task_id = ?", (synced_at, task_id))
        return mirror_rows(db, CHECK_TABLE, task_id, [c.row() for c in checks])

    def check_counts(self) -> dict[int, int]:
        """Stored answers (given or skipped) per check task id."""
        return dict(self._connection().execute("SELECT task_id, COUNT(*) FROM checks GROUP BY task_id").fetchall())

    def counterfactual_checks(self) -> dict[str, bool]:
        """One verdict per checked image key: True (train on it) when most of its non-skipped answers say it
        still shows its class. Keys without such an answer have no verdict yet.

        A tie rejects: it means at least as many people say the class is gone as say it is there, and a
        training image with a wrong label costs more than one generated image fewer (there are hundreds).
        """
        rows = self._connection().execute(
            "SELECT key, SUM(accepted), COUNT(accepted) FROM checks WHERE accepted IS NOT NULL GROUP BY key")
        return {key: 2 * yes > answers for key, yes, answers in rows}


def mirror_rows(db: sqlite3.Connection, table: MirroredTable, task_id: int, rows: list[tuple]) -> dict:
    """Make ``table``'s rows of ``task_id`` equal ``rows``; count what changed."""
    stored = {row[0]: row for row in db.execute(table.select, (task_id,))}
    changes = {"added": 0, "updated": 0, "removed": 0}
    for row in rows:
        previous = stored.pop(row[0], None)
        if previous == row:
            continue
        db.execute(table.upsert, row)
        changes["added" if previous is None else "updated"] += 1
    for annotation_id in stored:
        db.execute(table.delete, (annotation_id,))
        changes["removed"] += 1
    return changes
