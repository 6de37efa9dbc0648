"""PostgreSQL for Label Studio: a server you already run, or a cluster of its own in a folder.

SQLite (Label Studio's default, one file in its data folder) serves one team on one machine; Label Studio's own
production setup keeps its database in PostgreSQL, which takes many annotators writing at once and the usual
backups and replicas. Label Studio reads the connection from ``DJANGO_DB=default`` and ``POSTGRE_NAME``,
``POSTGRE_USER``, ``POSTGRE_PASSWORD``, ``POSTGRE_HOST``, ``POSTGRE_PORT``: :class:`PostgresServer` is those
values, from a ``postgresql://`` URL or from the same variables. :class:`LocalPostgres` runs a cluster of Debian's
``postgresql`` binaries in a folder — ``initdb`` on the first start, then ``pg_ctl`` on a free 127.0.0.1 port —
so the local helper and the tests need no server set up by hand; the next start reuses the folder.

PostgreSQL refuses to run as root (``initdb``, ``pg_ctl`` and the server all check), and CI and containers run as
root: there the cluster belongs to, and runs as, the ``postgres`` system user the Debian package creates (else
``nobody``), which must be able to enter every folder above the cluster's.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.termination import TERMINATING_SIGNALS
from pipeline.labelstudio.server import _signals_held, free_port

log = logging.getLogger(__name__)

DEBIAN_ROOT = Path("/usr/lib/postgresql")  # Debian keeps each major version's binaries off PATH, in <version>/bin
BINARIES = ("initdb", "pg_ctl", "psql")
SERVICE_ACCOUNTS = ("postgres", "nobody")  # who runs the cluster when we are root
DEFAULT_PORT = 5432
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # role and database names go into SQL unquoted-safe
NOT_INSTALLED = ("PostgreSQL is not installed (no initdb and pg_ctl on PATH or under /usr/lib/postgresql): install "
                 "Debian's `postgresql` package (`apt-get install postgresql`), or use an existing server with "
                 "--postgres-url")


@dataclass(frozen=True)
class PostgresServer:
    """Where Label Studio's database lives: a PostgreSQL server, a login on it and the database's name."""

    host: str
    port: int
    user: str
    password: str
    name: str

    @classmethod
    def from_url(cls, url: str, env: Mapping[str, str] = os.environ) -> PostgresServer:
        """``postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE``; without a password in it, ``$POSTGRE_PASSWORD``
        (a password in a command line is visible to every user of the machine)."""
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            port = 0
        name = urllib.parse.unquote(parts.path.lstrip("/"))
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not name or "/" in name or not port:
            raise PipelineError(f"not a PostgreSQL URL: {redacted(url)!r}; expected "
                                "postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
        password = env.get("POSTGRE_PASSWORD", "") if parts.password is None else urllib.parse.unquote(parts.password)
        return cls(parts.hostname, port, urllib.parse.unquote(parts.username or "postgres"), password, name)

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> PostgresServer | None:
        """The server Label Studio's own ``POSTGRE_*`` variables name, with its defaults; None without
        ``POSTGRE_HOST`` (then nothing says a server exists)."""
        if not env.get("POSTGRE_HOST"):
            return None
        try:
            port = int(env.get("POSTGRE_PORT") or DEFAULT_PORT)
        except ValueError:
            raise PipelineError(f"POSTGRE_PORT is not a port number: {env['POSTGRE_PORT']!r}") from None
        return cls(env["POSTGRE_HOST"], port, env.get("POSTGRE_USER", "postgres"),
                   env.get("POSTGRE_PASSWORD", "postgres"), env.get("POSTGRE_NAME", "postgres"))

    def environment(self) -> dict[str, str]:
        """The variables that point Label Studio at this database."""
        return {"DJANGO_DB": "default", "POSTGRE_NAME": self.name, "POSTGRE_USER": self.user,
                "POSTGRE_PASSWORD": self.password, "POSTGRE_HOST": self.host, "POSTGRE_PORT": str(self.port)}

    def __str__(self) -> str:  # for logs: never the password
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.name}"


def redacted(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for an error message."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def resolve_server(url: str | None, env: Mapping[str, str] = os.environ) -> PostgresServer | None:
    """An existing server: ``url`` when given, else the one ``POSTGRE_HOST`` (and the other ``POSTGRE_*``
    variables) name; None when neither does, i.e. the caller runs a cluster of its own."""
    return PostgresServer.from_url(url, env) if url else PostgresServer.from_environment(env)


def find_binaries() -> Path:
    """The folder with ``initdb``, ``pg_ctl`` and ``psql``: ``pg_ctl``'s on PATH, else Debian's newest version."""
    on_path = shutil.which("pg_ctl")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    versions = DEBIAN_ROOT.glob("*/bin") if DEBIAN_ROOT.is_dir() else []
    candidates += sorted(versions, key=lambda path: [int(p) for p in re.findall(r"\d+", path.parent.name)],
                         reverse=True)
    for folder in candidates:
        if all(os.access(folder / binary, os.X_OK) for binary in BINARIES):
            return folder
    raise PipelineError(NOT_INSTALLED)


def postgres_installed() -> bool:
    try:
        find_binaries()
    except PipelineError:
        return False
    return True


class LocalPostgres:
    """A PostgreSQL cluster of our own in ``directory``, on 127.0.0.1 only; use as a context manager.

    The first :meth:`start` makes the cluster (``directory/data``), a role ``user`` with a random password
    (``directory/password``, readable by its owner only) and the database ``database``; later starts reuse them,
    on a free port each time. A server still running there (its helper was killed) is adopted, not duplicated.
    """

    def __init__(self, directory: str | Path, port: int | None = None, user: str = "labelstudio",
                 database: str = "labelstudio"):
        for name in (user, database):
            if not IDENTIFIER.fullmatch(name):
                raise PipelineError(f"not a plain PostgreSQL name: {name!r} (letters, digits and _)")
        self.directory = Path(directory).expanduser().resolve()
        self.port = port
        self.user, self.database = user, database
        self._bin: Path | None = None
        self._account: pwd.struct_passwd | None = None
        self._running = False

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    @property
    def server(self) -> PostgresServer:
        if not self._running:
            raise PipelineError(f"the PostgreSQL cluster in {self.directory} is not running")
        return PostgresServer("127.0.0.1", self.port, self.user, (self.directory / "password").read_text().strip(),
                              self.database)

    def start(self, timeout: float = 60.0) -> PostgresServer:
        """Make the cluster on the first call, start it and make sure the database exists (running: a no-op)."""
        if self._running:
            return self.server
        self._bin = find_binaries()
        self._account = service_account()
        self._prepare_directory()
        if not (self.data / "PG_VERSION").is_file():
            self._initdb()
        running = self._running_port()
        if running is not None:
            log.warning("reusing the PostgreSQL server already running in %s (left by a killed helper?)", self.data)
            self.port, self._running = running, True
        else:
            self.port = self.port or free_port(0)
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories=''"
            try:
                self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t",
                          str(int(timeout)), "-o", options)
            except PipelineError as error:
                lines = self.log_path.read_text(errors="replace").strip().splitlines() if self.log_path.exists() else []
                reason = lines[-1] if lines else str(error)
                raise PipelineError(f"PostgreSQL did not start ({reason}); see {self.log_path}") from None
            self._running = True
        try:
            self._create_database()
        except BaseException:  # Ctrl-C or a failure right after starting: no server left behind
            self.stop()
            raise
        log.debug("PostgreSQL at %s (cluster %s)", self.server, self.data)
        return self.server

    def stop(self) -> None:
        """Stop the server (``fast``: open sessions are rolled back, the data is checkpointed)."""
        if not self._running:
            return
        with _signals_held(TERMINATING_SIGNALS):
            try:
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")
            except PipelineError as error:
                log.warning("%s", error)
        self._running = False

    def psql(self, sql: str, database: str | None = None) -> str:
        """Run ``sql`` on the running cluster as its role; the rows as ``psql -At`` prints them."""
        server = self.server
        return self._run("psql", "-X", "-v", "ON_ERROR_STOP=1", "-At", "-h", server.host, "-p", str(server.port),
                         "-U", server.user, "-d", database or server.name, "-c", sql,
                         env={"PGPASSWORD": server.password, "PGCONNECT_TIMEOUT": "10"})

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- helpers ---------------------------------------------------------------------------------------------
    def _prepare_directory(self) -> None:
        """The cluster's folder and its role's password; as root, both handed to the service account."""
        self.directory.mkdir(parents=True, exist_ok=True)
        account = self._account
        blocked = unreachable_parent(self.directory, account) if account else None
        if blocked is not None:
            raise PipelineError(
                f"PostgreSQL refuses to run as root, so its cluster runs as user {account.pw_name!r}, who cannot "
                f"enter {blocked}; put the data folder where other users can enter, run as a normal user, or use "
                "an existing server with --postgres-url")
        password = self.directory / "password"
        if not password.exists():
            descriptor = os.open(password, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_urlsafe(24) + "\n")
        if account is not None:
            for path in (self.directory, password):
                os.chown(path, account.pw_uid, account.pw_gid)

    def _initdb(self) -> None:
        """A new cluster, made aside and renamed into place: a killed ``initdb`` leaves no half cluster behind."""
        log.info("making a PostgreSQL cluster in %s", self.data)
        partial = self.directory / "data.partial"
        shutil.rmtree(partial, ignore_errors=True)
        self._run("initdb", "-D", str(partial), "-U", self.user, f"--pwfile={self.directory / 'password'}",
                  "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale")
        partial.rename(self.data)

    def _running_port(self) -> int | None:
        """The port of a server already running on the cluster, from its ``postmaster.pid``; None when none is."""
        try:
            self._run("pg_ctl", "status", "-D", str(self.data))
        except PipelineError:
            return None
        lines = (self.data / "postmaster.pid").read_text().splitlines()
        return int(lines[3])  # pid, data dir, start time, port, ...

    def _create_database(self) -> None:
        """Label Studio's database, made once with ``createdb`` (no SQL assembled from its name)."""
        try:
            self.psql("SELECT 1", database=self.database)  # connects only where the database exists
        except PipelineError:
            server = self.server
            self._run("createdb", "-h", server.host, "-p", str(server.port), "-U", server.user, self.database,
                      env={"PGPASSWORD": server.password, "PGCONNECT_TIMEOUT": "10"})

    def _run(self, binary: str, *args: str, env: Mapping[str, str] | None = None) -> str:
        """A PostgreSQL program, as the service account when we are root; its output, or one line on failure."""
        account = self._account
        # the user's own PG* variables (PGHOST, PGSSLMODE, PGOPTIONS...) would point psql elsewhere
        environment = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        environment.update({"LC_ALL": "C", **(env or {})})
        if account is not None:
            environment.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name)
        result = subprocess.run(
            [str(self._bin / binary), *args], check=False, capture_output=True, text=True, env=environment,
            cwd=self.directory, stdin=subprocess.DEVNULL, start_new_session=True,
            user=account.pw_uid if account else None, group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
        )
        if result.returncode != 0:
            message = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise PipelineError(f"{binary} {args[0]} failed: {message[-1] if message else result.returncode}")
        return result.stdout


def service_account() -> pwd.struct_passwd | None:
    """Who runs the cluster: None (ourselves) unless we are root, whom PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    for name in SERVICE_ACCOUNTS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PipelineError("PostgreSQL refuses to run as root and there is no 'postgres' or 'nobody' user to run it "
                        "as; run as a normal user, or use an existing server with --postgres-url")


def unreachable_parent(path: Path, account: pwd.struct_passwd) -> Path | None:
    """The first folder above ``path`` that ``account`` may not enter (its execute bit), or None."""
    groups = {account.pw_gid} | {group.gr_gid for group in grp.getgrall() if account.pw_name in group.gr_mem}
    for folder in reversed(path.parents):
        info = folder.stat()
        bit = (stat.S_IXUSR if info.st_uid == account.pw_uid else
               stat.S_IXGRP if info.st_gid in groups else stat.S_IXOTH)
        if not info.st_mode & bit:
            return folder
    return None

