"""Label Studio on PostgreSQL: the connection settings, the local cluster, and the round trip on a real server.

The round trip (push, simulated annotation, pull; the ML backend's predictions and webhook) is the SQLite suite's
own tests from ``test_labelstudio.py``, run here against one Label Studio whose database is a PostgreSQL cluster
of its own, as ``python -m pipeline labelstudio --database postgres`` runs it: Debian's ``postgresql`` binaries
(``.ci/run`` installs them), the cluster in a temp folder on 127.0.0.1, stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import test_labelstudio
from conftest import LABEL_STUDIO_START_S

from pipeline.cli import main
from pipeline.core.errors import PipelineError
from pipeline.labelstudio import postgres
from pipeline.labelstudio.postgres import LocalPostgres, PostgresServer, postgres_installed, resolve_server
from pipeline.labelstudio.server import LocalCredentials, LocalLabelStudio, free_port, server_environment

needs_postgres = pytest.mark.skipif(not postgres_installed(), reason="PostgreSQL binaries (initdb, pg_ctl) not "
                                    "found: install Debian's postgresql package (.ci/run does)")


@contextmanager
def open_folder() -> Iterator[Path]:
    """A temp folder other users may enter: run as root, PostgreSQL runs as the ``postgres`` account, and pytest's
    own temp root is private to its user."""
    folder = Path(tempfile.mkdtemp(prefix="slim-postgres-"))
    folder.chmod(0o711)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def studio_on_postgres() -> Iterator[LocalLabelStudio]:
    """One Label Studio for the module, its database a cluster of its own in ``DATA/postgres``."""
    if not postgres_installed():
        pytest.skip("PostgreSQL binaries not found")
    with open_folder() as folder:
        server = LocalLabelStudio(folder / "label-studio", port=free_port(0), database="postgres")
        try:
            server.start(timeout=LABEL_STUDIO_START_S)  # every migration runs: no copy
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def labelstudio(studio_on_postgres: LocalLabelStudio) -> LocalCredentials:
    """Replaces conftest's SQLite server in this module: ``settings`` (and the reused tests) talk to this one."""
    return studio_on_postgres.credentials


# --- the round trip on PostgreSQL ------------------------------------------------------------------------------
@needs_postgres
def test_round_trip_keeps_the_answers_in_postgres(studio_on_postgres: LocalLabelStudio, sampled_run: Path,
                                                  settings) -> None:
    test_labelstudio.test_simulated_answers_are_pulled_exactly_and_pull_is_idempotent(sampled_run, settings)
    project = test_labelstudio.project_of(sampled_run)
    cluster = studio_on_postgres.cluster
    assert cluster.psql(f"SELECT count(*) FROM task WHERE project_id = {project}").strip() == "8"
    assert cluster.psql(f"SELECT count(*) FROM task_completion WHERE project_id = {project} "
                        "AND NOT was_cancelled").strip() == "8"
    assert not list(studio_on_postgres.data_dir.rglob("*.sqlite3"))  # Label Studio made no SQLite database


@needs_postgres
def test_ml_backend_webhook_on_postgres(sampled_run: Path, settings) -> None:
    test_labelstudio.test_ml_backend_end_to_end(sampled_run, settings)


# --- the local cluster ------------------------------------------------------------------------------------------
@needs_postgres
def test_cluster_is_made_once_and_reused_with_its_data() -> None:
    with open_folder() as folder:
        first = LocalPostgres(folder / "pg")
        with first as server:
            first.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
            assert (server.host, server.user, server.name) == ("127.0.0.1", "labelstudio", "labelstudio")
        assert not (first.data / "postmaster.pid").exists()  # stopped
        again = LocalPostgres(folder / "pg")
        again.start()
        # its helper killed, the server runs on: the next helper adopts it instead of failing on the folder
        adopting = LocalPostgres(folder / "pg")
        try:
            assert adopting.start().port == again.port
            assert adopting.psql("SELECT x FROM kept").strip() == "42"
            assert adopting.server.password == server.password
        finally:
            adopting.stop()
            if (again.data / "postmaster.pid").exists():  # not adopted: stop it here
                again.stop()
        assert not (again.data / "postmaster.pid").exists()


@needs_postgres
@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the cluster to another account")
def test_root_gets_one_line_when_the_service_account_cannot_enter_the_folder(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    with pytest.raises(PipelineError, match="cannot enter"):
        LocalPostgres(tmp_path / "pg").start()


def test_missing_binaries_stop_the_command_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(postgres, "DEBIAN_ROOT", tmp_path / "none")
    status = main(["labelstudio", "--data-dir", str(tmp_path / "ls"), "--port", str(free_port(0)),
                   "--database", "postgres"])
    error = capsys.readouterr().err.strip()
    assert status == 2 and "install Debian's `postgresql` package" in error and len(error.splitlines()) == 1


# --- connection settings ----------------------------------------------------------------------------------------
def test_url_and_label_studio_variables_name_a_server() -> None:
    server = PostgresServer.from_url("postgresql://ls:p%40ss@db.example:6543/studio", env={})
    assert server == PostgresServer("db.example", 6543, "ls", "p@ss", "studio")
    assert "p@ss" not in str(server) and str(server) == "postgresql://ls@db.example:6543/studio"
    # no password in the URL (it would show in `ps`): Label Studio's own variable
    assert PostgresServer.from_url("postgres://ls@db/studio", env={"POSTGRE_PASSWORD": "pw"}) == PostgresServer(
        "db", 5432, "ls", "pw", "studio")
    assert resolve_server(None, env={}) is None  # nothing given: the helper runs a cluster of its own
    assert resolve_server(None, env={"POSTGRE_HOST": "db", "POSTGRE_PORT": "5433", "POSTGRE_PASSWORD": "pw"}) == (
        PostgresServer("db", 5433, "postgres", "pw", "postgres"))  # Label Studio's defaults for the rest
    for bad in ("mysql://ls:secret@db/studio", "postgresql://ls:secret@db", "postgresql://ls:secret@db:x/studio"):
        with pytest.raises(PipelineError, match="postgresql://USER") as error:
            PostgresServer.from_url(bad, env={})
        assert "secret" not in str(error.value)


def test_database_variables_reach_label_studio_only_for_postgres(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DJANGO_DB", "default")  # a user's own, e.g. left from another Label Studio
    monkeypatch.setenv("POSTGRE_HOST", "elsewhere")
    credentials = LocalCredentials("http://127.0.0.1:1", "u", "p", "token-123")
    sqlite = server_environment(tmp_path, credentials, None)
    assert "DJANGO_DB" not in sqlite and "POSTGRE_HOST" not in sqlite
    server = PostgresServer("127.0.0.1", 5999, "ls", "pw", "studio")
    env = server_environment(tmp_path, credentials, None, server)
    assert {key: env[key] for key in server.environment()} == {
        "DJANGO_DB": "default", "POSTGRE_NAME": "studio", "POSTGRE_USER": "ls", "POSTGRE_PASSWORD": "pw",
        "POSTGRE_HOST": "127.0.0.1", "POSTGRE_PORT": "5999"}


def test_postgres_url_needs_the_postgres_database(tmp_path: Path, capsys) -> None:
    status = main(["labelstudio", "--data-dir", str(tmp_path), "--postgres-url", "postgresql://ls@db/studio"])
    assert status == 2 and "--postgres-url needs --database postgres" in capsys.readouterr().err
