"""labels.sqlite under concurrent writers (threads and processes) and when the file is damaged."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.store import Annotation, AnnotationStore, Check, CheckTask, TaskRecord

THREADS = 8  # the gunicorn worker's thread count in docker/: every one of them writing at once
WRITES_PER_WRITER = 25  # enough for the writers' transactions to overlap many times


def annotation(n: int) -> Annotation:
    return Annotation(n, n // 3, n // 3, f"annotator-{n % 4}", ("core", "spurious", "unsure")[n % 3])


def write_many(path: Path, first: int, start=None) -> None:
    """One writer: its own transactions, each with a read and a write (what pull and the webhooks do)."""
    store = AnnotationStore(path)
    if start is not None:
        start.wait()
    try:
        for n in range(first, first + WRITES_PER_WRITER):
            with store.transaction() as db:
                db.execute("SELECT COUNT(*) FROM annotations").fetchone()
                db.execute("INSERT OR REPLACE INTO annotations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           annotation(n).row())
                store.set_meta(f"last-{first}", str(n), db)
    finally:
        store.close()


def test_threads_writing_through_one_store_all_succeed(tmp_path: Path) -> None:
    store = AnnotationStore(tmp_path / "labels.sqlite")
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def writer(first: int) -> None:
        start.wait()
        try:
            for n in range(first, first + WRITES_PER_WRITER):
                with store.transaction() as db:
                    db.execute("INSERT INTO annotations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               annotation(n).row())
                    store.set_meta(f"last-{first}", str(n), db)
                store.upsert_annotation(annotation(n + 10_000))
        except BaseException as exc:  # noqa: BLE001 - the test reports every failure
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k * WRITES_PER_WRITER,)) for k in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    written = THREADS * WRITES_PER_WRITER
    expected = list(range(written)) + list(range(10_000, 10_000 + written))
    assert [a.annotation_id for a in store.annotations()] == expected
    assert store.get_meta(f"last-{WRITES_PER_WRITER}") == str(2 * WRITES_PER_WRITER - 1)
    store.close()


def test_a_failed_transaction_leaves_nothing_and_other_threads_go_on(tmp_path: Path) -> None:
    store = AnnotationStore(tmp_path / "labels.sqlite")
    with pytest.raises(RuntimeError), store.transaction() as db:
        db.execute("INSERT INTO annotations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   annotation(1).row())
        raise RuntimeError("killed half-way")
    other = threading.Thread(target=store.add_tasks, args=([TaskRecord(5, 1, 5, 1)],))
    other.start()
    other.join()
    assert store.annotations() == [] and [t.task_id for t in store.tasks()] == [5]
    store.close()


def test_close_closes_every_threads_connection(tmp_path: Path) -> None:
    store = AnnotationStore(tmp_path / "labels.sqlite")
    seen: list[sqlite3.Connection] = []
    gate = threading.Event()

    def reader() -> None:
        store.tasks()
        seen.append(store._connection())
        gate.wait()

    thread = threading.Thread(target=reader)
    thread.start()
    while not seen:
        thread.join(0.01)
    store.close()
    gate.set()
    thread.join()
    with pytest.raises(sqlite3.ProgrammingError):  # closed by close(), from the main thread
        seen[0].execute("SELECT 1")
    assert store.tasks() == []  # used again: it reopens
    store.close()


def test_two_processes_write_at_once(tmp_path: Path) -> None:
    path = tmp_path / "labels.sqlite"
    AnnotationStore(path).close()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter, like pull beside the backend
    start = context.Barrier(3)  # all three writers begin together, so their transactions overlap
    processes = [context.Process(target=write_many, args=(path, k * WRITES_PER_WRITER, start))
                 for k in range(2)]
    for process in processes:
        process.start()
    write_many(path, 2 * WRITES_PER_WRITER, start)  # and this process too
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0, 0]
    store = AnnotationStore(path)
    assert [a.annotation_id for a in store.annotations()] == list(range(3 * WRITES_PER_WRITER))
    store.close()


def filled(path: Path) -> bytes:
    """A database with a few hundred answers (several pages), closed so it is all in the main file."""
    store = AnnotationStore(path)
    store.add_tasks(TaskRecord(t, 1, t, 1) for t in range(200))
    for n in range(300):
        store.upsert_annotation(annotation(n))
    store.close()
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "garbage-header"])
def test_a_damaged_database_is_refused_in_one_line_and_left_untouched(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "labels.sqlite"
    data = filled(path)
    damaged = {"truncated": data[:len(data) // 2],
               "garbage": bytes((n * 7919) % 251 for n in range(len(data))),
               "garbage-header": b"not a database at all" + data[21:]}[damage]
    path.write_bytes(damaged)
    with pytest.raises(PipelineError) as caught:
        AnnotationStore(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "backup" in message
    assert path.read_bytes() == damaged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.sqlite"]  # no journal or WAL left behind


def test_a_database_from_before_the_check_tables_opens_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "labels.sqlite"
    filled(path)
    with closing(sqlite3.connect(path)) as db, db:  # what an older version made: no check tables
        db.executescript("DROP TABLE check_tasks; DROP TABLE checks;")
    store = AnnotationStore(path)
    assert len(store.annotations()) == 300 and len(store.tasks()) == 200
    assert store.counterfactual_checks() == {} and store.check_tasks() == []
    store.add_check_tasks([CheckTask(1, 7, "k", "disc")])
    assert store.check_tasks(7) == [CheckTask(1, 7, "k", "disc")]
    store.close()


def test_one_verdict_per_key_by_majority_a_tie_rejects_skips_do_not_count(tmp_path: Path) -> None:
    store = AnnotationStore(tmp_path / "labels.sqlite")
    answers = {"most-yes": [True, True, False], "tie": [True, False], "only-skipped": [None],
               "yes-and-skip": [True, None], "no": [False]}
    store.add_check_tasks(CheckTask(t, 1, key, "disc") for t, key in enumerate(answers))
    with store.transaction() as db:
        for task_id, (key, given) in enumerate(answers.items()):
            store.sync_checks(task_id, [Check(100 * task_id + n, task_id, key, a) for n, a in enumerate(given)],
                              "t0", db)
    assert store.counterfactual_checks() == {"most-yes": True, "tie": False, "yes-and-skip": True, "no": False}
    assert store.check_counts() == {0: 3, 1: 2, 2: 1, 3: 2, 4: 1}
    with store.transaction() as db:  # mirrored: one answer edited, one deleted, the rest unchanged
        changes = store.sync_checks(0, [Check(0, 0, "most-yes", False), Check(1, 0, "most-yes", True)], "t1", db)
        assert changes == {"added": 0, "updated": 1, "removed": 1}
        assert store.sync_checks(4, [Check(400, 4, "no", False)], "t1", db) == {"added": 0, "updated": 0,
                                                                                "removed": 0}
        store.forget_check_tasks([1], db)  # deleted in Label Studio: its answers go with it
    assert store.counterfactual_checks() == {"most-yes": False, "yes-and-skip": True, "no": False}
    assert [t.synced_at for t in store.check_tasks()] == ["t1", "t0", "t0", "t1"]
    assert store.annotations() == []  # checks never reach the attention answers
    store.close()


def test_summary_counts_images_and_answers_apart(tmp_path: Path) -> None:
    """Two annotators on one task: two answers, one image; a skip is neither."""
    store = AnnotationStore(tmp_path / "labels.sqlite")
    store.add_tasks([TaskRecord(1, 9, 101, 1), TaskRecord(2, 9, 102, 1), TaskRecord(3, 9, 103, 1)])
    for annotation in (Annotation(1, 1, 101, "a@x", "core"), Annotation(2, 1, 101, "b@x", "spurious"),
                       Annotation(3, 2, 102, "a@x", "unsure"), Annotation(4, 3, 103, "b@x", None, skipped=True)):
        store.upsert_annotation(annotation)
    summary = store.summary()
    assert (summary["tasks"], summary["annotated_tasks"], summary["annotated_images"]) == (3, 2, 2)
    assert (summary["annotations"], summary["images_answered_more_than_once"], summary["skipped"]) == (3, 1, 1)
    assert summary["choices"] == {"core": 1, "spurious": 1, "unsure": 1}
    store.close()


NOTHING = {"added": 0, "updated": 0, "removed": 0}


def test_pull_reports_answers_new_to_the_run_whoever_stored_them_first(tmp_path: Path) -> None:
    """The ML backend's webhook stores an answer first: the pull that then mirrors it still calls it new. Only a
    change of the answer since a pull saw it is an update -- naming its annotator differently is not."""
    from dataclasses import replace

    store = AnnotationStore(tmp_path / "labels.sqlite")
    store.add_tasks([TaskRecord(1, 9, 101, 1)])
    by_webhook = Annotation(1, 1, 101, "7", "core", updated_at="t1", lead_time=2.5)  # its user not named
    store.upsert_annotation(by_webhook)
    pulled = replace(by_webhook, annotator="a@x")

    def sync(*annotations: Annotation) -> dict:
        with store.transaction() as db:
            return store.sync_task_annotations(1, list(annotations), "u", db)

    assert sync(pulled) == {"added": 1, "updated": 0, "removed": 0}
    assert sync(pulled) == NOTHING and store.pulled_counts() == {1: 1}
    assert sync(replace(pulled, annotator="another name")) == NOTHING
    assert sync(replace(pulled, choice="spurious", updated_at="t2")) == {"added": 0, "updated": 1, "removed": 0}
    assert sync(Annotation(2, 1, 101, "b@x", "unsure")) == {"added": 1, "updated": 0, "removed": 1}
    assert [a.annotation_id for a in store.annotations()] == [2] and store.pulled_counts() == {1: 1}
    store.close()


def test_rows_stored_under_a_user_id_are_named_later(tmp_path: Path) -> None:
    store = AnnotationStore(tmp_path / "labels.sqlite")
    for n, name in enumerate(("7", "7", "8", "a@x", None)):
        store.upsert_annotation(Annotation(n, n, n, name, "core"))
    assert store.unnamed_annotators() == {"7", "8"}
    with store.transaction() as db:
        assert store.rename_annotators({"7": "b@x"}, db) == 2
    assert [a.annotator for a in store.annotations()] == ["b@x", "b@x", "8", "a@x", None]
    store.close()


def test_a_database_from_before_the_pull_account_counts_its_answers_as_reported(tmp_path: Path) -> None:
    """Answers stored by an older version were reported by its pulls: the first pull after the upgrade calls them
    neither new nor updated."""
    path = tmp_path / "labels.sqlite"
    filled(path)
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript("DROP TABLE pulled;")
    store = AnnotationStore(path)
    assert store.pulled_counts() == store.annotation_counts() and len(store.annotations()) == 300
    with store.transaction() as db:
        task = [a for a in store.annotations() if a.task_id == 5]
        assert task and store.sync_task_annotations(5, task, "u", db) == NOTHING
    store.close()
    reopened = AnnotationStore(path)
    assert reopened.pulled_counts() == reopened.annotation_counts()  # filled once: opening again adds nothing
    reopened.close()
