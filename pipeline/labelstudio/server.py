"""A local Label Studio for the embedded default, the demo and the tests.

Starts the ``label-studio`` package (loopback only) headless with a known admin and a known legacy
API token, all through environment variables (the ``--data-dir`` flag is applied too late to keep its files
in one place), waits until ``/health`` answers, and stops it again. To use an existing server instead, set
``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` (or pass ``--url`` / ``--api-key``).

Its database is SQLite in the data folder by default; with ``database="postgres"`` it is PostgreSQL: the server
given, or a cluster of its own in ``DATA_DIR/postgres`` started and stopped with it (see
:mod:`pipeline.labelstudio.postgres`).

The server runs from its own virtual environment when one exists (``.venv-labelstudio``, made by
``scripts/setup.sh``), because its pinned dependencies need not agree with torch's; ``LABEL_STUDIO_BIN``
names the executable explicitly.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from pipeline.core.errors import PipelineError
from pipeline.core.termination import TERMINATING_SIGNALS

if TYPE_CHECKING:  # postgres.py builds on this module
    from pipeline.labelstudio.postgres import LocalPostgres, PostgresServer

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_USER = "admin@slim.local"
DEFAULT_PASSWORD = "slim-demo-password"
DEFAULT_TOKEN = "slim-demo-token-0123456789"
STOP_GRACE_S = 20  # Label Studio finishes its requests and closes SQLite in a second or two; then SIGKILL
DATABASES = ("sqlite", "postgres")
# the variables that choose Label Studio's database, with each prefix it reads them under (LABEL_STUDIO_ ones are
# dropped anyway): a user's own must not turn a SQLite server into a PostgreSQL one, or point it elsewhere
DATABASE_VARIABLES = re.compile(r"(HEARTEX_)?(DJANGO_DB|DATABASE_NAME|POSTGRE_\w+)")


@dataclass(frozen=True)
class LocalCredentials:
    url: str
    username: str
    password: str
    token: str


def find_label_studio() -> str:
    """The ``label-studio`` executable: ``$LABEL_STUDIO_BIN``, the project's own venv, or ``PATH``."""
    candidates = [os.environ.get("LABEL_STUDIO_BIN"), str(PROJECT_ROOT / ".venv-labelstudio" / "bin" / "label-studio"),
                  str(Path(sys.executable).parent / "label-studio"), shutil.which("label-studio")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise PipelineError(
        "the label-studio package is not installed; run `bash scripts/setup.sh` (it makes .venv-labelstudio) "
        "or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to use an existing server"
    )


def free_port(preferred: int = 8080) -> int:
    """``preferred`` when nothing listens there, else any free loopback port."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is free
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise PipelineError("no free TCP port on 127.0.0.1 for Label Studio")


def server_environment(data_dir: Path, credentials: LocalCredentials, files_root: Path | None,
                       postgres: PostgresServer | None = None) -> dict[str, str]:
    """Environment for a headless, offline, loopback-only server with a known admin and token; its database is
    SQLite in ``data_dir`` unless ``postgres`` names a server."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("LABEL_STUDIO_") and not DATABASE_VARIABLES.fullmatch(key)}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": credentials.username,
        "LABEL_STUDIO_PASSWORD": credentials.password,
        "LABEL_STUDIO_USER_TOKEN": credentials.token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        # a backend or webhook on 127.0.0.1 is fine for a loopback test server, never for production
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "XDG_CONFIG_HOME": str(data_dir / "xdg-config"),
        "XDG_DATA_HOME": str(data_dir / "xdg-data"),
        "XDG_CACHE_HOME": str(data_dir / "xdg-cache"),
    })
    if files_root is not None:
        env["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"] = "true"
        env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] = str(files_root)
    if postgres is not None:
        env.update(postgres.environment())
    return env


class LocalLabelStudio:
    """Start/stop a Label Studio process; use as a context manager.

    ``files_root`` switches on local-files serving below that folder (for ``push --storage local-files``).
    ``database="postgres"`` keeps Label Studio's database in PostgreSQL: on ``postgres`` when given, else on a
    cluster of its own in ``DATA_DIR/postgres`` (made by the first start, reused by later ones, running only
    while the server does).
    """

    def __init__(self, data_dir: str | Path, port: int | None = None, files_root: str | Path | None = None,
                 username: str = DEFAULT_USER, password: str = DEFAULT_PASSWORD, token: str = DEFAULT_TOKEN,
                 database: str = "sqlite", postgres: PostgresServer | None = None):
        if database not in DATABASES:
            raise PipelineError(f"unknown Label Studio database {database!r}; choose one of {', '.join(DATABASES)}")
        if postgres is not None and database != "postgres":
            raise PipelineError("a PostgreSQL server was given for a SQLite Label Studio; use --database postgres")
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.port = port
        self.files_root = Path(files_root).resolve() if files_root else None
        self._login = (username, password, token)
        self.database = database
        self.postgres = postgres
        self.cluster: LocalPostgres | None = None  # our own PostgreSQL, while it runs
        self.process: subprocess.Popen | None = None

    @property
    def credentials(self) -> LocalCredentials:
        username, password, token = self._login
        return LocalCredentials(f"http://127.0.0.1:{self.port}", username, password, token)

    def start(self, timeout: float = 180.0) -> LocalCredentials:
        """Launch the server and block until ``/health`` answers (first start runs migrations: ~30 s)."""
        executable = find_label_studio()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        try:
            database = self._start_database()
            with (self.data_dir / "server.log").open("ab") as server_log:
                self.process = subprocess.Popen(
                    [executable, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port),
                     "--log-level", "WARNING"],
                    env=server_environment(self.data_dir, self.credentials, self.files_root, database),
                    stdout=server_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                )
            self._wait_until_healthy(timeout)
        except BaseException:  # a timeout, Ctrl-C or SIGTERM while starting: no server left behind
            self.stop()
            raise
        return self.credentials

    def _start_database(self) -> PostgresServer | None:
        """The PostgreSQL server Label Studio is to use (ours started first when none was given); None: SQLite."""
        if self.database != "postgres":
            return None
        if self.postgres is not None:
            log.info("Label Studio's database: %s", self.postgres)
            return self.postgres
        from pipeline.labelstudio.postgres import LocalPostgres

        if self.cluster is None:  # else still running from a start whose Label Studio was killed
            self.cluster = LocalPostgres(self.data_dir / "postgres")
        server = self.cluster.start()
        log.info("Label Studio's database: %s (its own cluster in %s)", server, self.cluster.directory)
        return server

    def _wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PipelineError(
                    f"Label Studio exited with status {self.process.returncode} while starting; "
                    f"see {self.data_dir / 'server.log'}"
                )
            if is_healthy(self.credentials.url):
                return
            time.sleep(0.5)
        raise PipelineError(f"Label Studio did not answer within {timeout:.0f} s; see {self.data_dir / 'server.log'}")

    def stop(self) -> None:
        """Terminate the server and its workers (it runs in its own process group), SIGKILL after a grace time.

        The whole group is signalled even when the launcher already exited, so no worker keeps the port; a
        second SIGTERM/SIGHUP arriving meanwhile is held back until the group is gone. Our own PostgreSQL stops
        after it, once nothing is connected.
        """
        if self.process is not None:
            with _signals_held(TERMINATING_SIGNALS):
                _signal_group(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    log.warning("Label Studio did not stop within %d s; killing it", STOP_GRACE_S)
                _signal_group(self.process.pid, signal.SIGKILL)  # stragglers of the group, if any
                self.process.wait()
            self.process = None
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    def __enter__(self) -> LocalCredentials:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:  # the group is already gone
        pass


@contextmanager
def _signals_held(signals: tuple[int, ...]) -> Iterator[None]:
    """Defer ``signals`` (delivered when the block ends) so a clean-up is not cut short by a second one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def is_healthy(url: str) -> bool:
    """Label Studio answers its health check (2 s: a starting server either answers or refuses at once)."""
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
