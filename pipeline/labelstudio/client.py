"""The one place that talks to Label Studio, through ``label-studio-sdk``.

:class:`Studio` wraps the SDK client with the few operations the pipeline needs and turns every failure into
a one-line :class:`~pipeline.core.errors.PipelineError` (server down, wrong key, project or task gone).
Constructing a :class:`Studio` costs nothing; :meth:`Studio.connect` opens the connection and checks the key.

Two requests have no typed SDK call that is fast enough: multipart file uploads, and task listings of
thousands of tasks (validating them into SDK models costs more than the request). Those go through this
module's own ``httpx`` client, authenticated as the SDK is: a legacy token as ``Token``, a personal access
token exchanged for a short-lived access token through the SDK's public ``tokens.refresh`` and sent as
``Bearer`` (renewed once when the server answers 401). No private SDK attribute is used.

Retries (one layer, :class:`RetryPolicy`): only calls that can be repeated without changing the result are
tried again after a transient failure (the connection broke, a truncated answer, HTTP 5xx/408/429) --
listings and reads, file uploads and task imports (both made idempotent by looking up what an earlier attempt
left before trying again), and project creation (a retry first looks for the project the lost attempt may
have made). Submitting, editing and deleting annotations are tried once. The SDK's own retries are switched
off (it re-sends every method, POSTs included, which could duplicate); ``httpx`` re-tries failed *connects*
only, which is always safe since nothing was sent. Every failure ends as one line, never a traceback.

The API key is handed to the SDK and never formatted into a message or a log line.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

import label_config
from pipeline.core.config import option
from pipeline.core.errors import PipelineError
from pipeline.core.verdicts import CHOICES
from pipeline.labelstudio.schema import ANSWER

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)
TIMEOUT_S = 120  # one request's limit: importing 500 tasks with predictions takes seconds, not minutes
CONNECT_TIMEOUT_S = 10  # a TCP handshake takes milliseconds on a LAN; 10 s covers a slow WAN, not a dead host
# httpx re-tries a failed connect (nothing was sent, so it is safe for every method) after 0 s and 0.5 s:
# enough for a server that is rebinding its port, short enough that a wrong URL is reported in a second
TRANSPORT_RETRIES = 2
RETRY_ATTEMPTS = 5  # with 30 % of requests failing (the fault suite), all five fail for 0.2 % of calls
RETRY_BASE_DELAY_S = 0.5  # first wait: a dropped connection is gone by then, a restarting worker nearly so
RETRY_MAX_DELAY_S = 8.0  # the longest single wait: 0.5, 1, 2, 4 s before attempts 2..5
RETRY_BUDGET_S = 30.0  # no attempt starts later than this after the first: a longer outage is reported, not waited out
# answers that say "try again": request timeout, rate limit, server errors, a proxy whose upstream is down
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
UPLOAD_BATCH = 100  # Django's DATA_UPLOAD_MAX_NUMBER_FILES
# one user's name, asked while Label Studio waits for a webhook's answer (its WEBHOOK_TIMEOUT, 1 s by default);
# a local server answers in milliseconds
USER_LOOKUP_TIMEOUT_S = 0.5
# Label Studio parses every uploaded file as a task and refuses that for configs with several data keys, so
# pictures are uploaded into a companion project with this one-image config and referenced by URL.
MEDIA_CONFIG = '<View><Image name="image" value="$image"/></View>'

# tasks per import request: ~1 MB of JSON, far under the server's 200 MB limit and its two minutes' timeout
# (~2 s of server time); each request also costs Label Studio ~0.1 s of its own, which batches of 500 made a
# sixth of a 10,000-task push
IMPORT_BATCH = 2000
PAGE_SIZE = 1000  # tasks per listing page: few round trips, pages of a few hundred kB
# task ids named in one listing's query: they travel URL-encoded in the request line (up to ~11 bytes each),
# which Label Studio's server (Django's runserver, like Python's http.server) refuses past 64 kB
IDS_PER_QUERY = PAGE_SIZE
# what a task listing carries: enough to tell a task's state, or its annotations in full
TASK_COUNTS = ("id", "updated_at", "total_annotations", "cancelled_annotations")
TASK_STATE = (*TASK_COUNTS, "data")
TASK_ANNOTATIONS = ("id", "updated_at", "annotations", "result", "completed_by", "was_cancelled", "lead_time",
                    "created_at")
TASK_FULL = (*TASK_ANNOTATIONS, *TASK_COUNTS[2:])  # both at once: the annotations, and what changed
DATA_MANAGER_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # the format Label Studio's Data Manager parses a Datetime filter in
T = TypeVar("T")
# Label Studio stores an upload as upload/<project>/<8 hex digits of a uuid>-<file name>
STORED_NAME = re.compile(r"^[0-9a-f]{8}-(?P<name>.+)$")
TRUNCATED = "truncated response"  # a body cut off before its end: the JSON does not parse
# Label Studio's (Django's) own sign-in pages, and what they answer when an email is already registered
SIGNUP_PATH, LOGIN_PATH, CSRF_COOKIE = "/user/signup/", "/user/login/", "csrftoken"
EMAIL_TAKEN = "User with this email already exists"


@dataclass(frozen=True)
class RetryPolicy:
    """How an idempotent call is tried again after a transient failure.

    Attempt ``n + 1`` follows a wait of ``min(max_delay_s, base_delay_s * 2**n)`` with equal jitter (half
    fixed, half random, so two upload threads that failed together do not come back together); no attempt
    starts after ``budget_s``, so a call gives up within ``budget_s`` plus one request's timeout.
    """

    attempts: int = RETRY_ATTEMPTS
    base_delay_s: float = RETRY_BASE_DELAY_S
    max_delay_s: float = RETRY_MAX_DELAY_S
    budget_s: float = RETRY_BUDGET_S

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** retry)
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class ProjectCounts:
    """What Label Studio counts for a project: its tasks, its answers (given or skipped), and when it counted
    them by its own clock (its answer's ``Date``, to the second; None when the server sent none)."""

    tasks: int
    answers: int
    counted_at: datetime | None


@dataclass(frozen=True)
class UserLogin:
    """A Label Studio user this tool signed in as: the token that acts as that user and the password it signed in
    with (both kept out of ``repr``)."""

    user_id: int
    email: str
    token: str = field(repr=False)
    password: str = field(default="", repr=False)


class TransientError(PipelineError):
    """A one-line failure that trying again may cure: a broken connection or a "try again" status.

    It keeps its parts so that an enclosing retry (an import that re-lists tasks) can report its own count.
    """

    def __init__(self, reason: str, what: str, hint: str, attempts: int = 1, seconds: float = 0.0) -> None:
        self.reason, self.what, self.hint = reason, what, hint
        plural = "s" if attempts != 1 else ""
        super().__init__(f"{what} after {attempts} attempt{plural} in {seconds:.1f} s; {hint}")

    def after(self, attempts: int, seconds: float) -> TransientError:
        return TransientError(self.reason, self.what, self.hint, attempts, seconds)


def retry_reason(exc: BaseException) -> str | None:
    """Why ``exc`` is worth another attempt (its short name), or None when it is not.

    A refused or timed-out connect is not: the transport already re-tried it, and nothing listening is a
    definite answer (nor is a URL httpx cannot use). A 2xx ``ApiError`` is how the SDK reports a body that is
    not JSON: a truncated answer.
    """
    if isinstance(exc, TransientError):
        return exc.reason
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol)):
        return None
    if isinstance(exc, (httpx.TransportError, httpx.DecodingError)):
        return exc.__class__.__name__
    if isinstance(exc, json.JSONDecodeError):
        return TRUNCATED
    if isinstance(exc, ApiError) and exc.status_code is not None:
        if exc.status_code in RETRY_STATUSES:
            return f"HTTP {exc.status_code}"
        if 200 <= exc.status_code < 300:
            return TRUNCATED
    return None


def one_line(text: str, limit: int = 300) -> str:
    """A server's error body (JSON, or a proxy's HTML page) squeezed onto one line of a message."""
    return " ".join(text.split())[:limit]


@dataclass(frozen=True)
class ConnectionOptions:
    """Where Label Studio is, as the user gives it; :meth:`Settings.resolve` fills in the environment."""

    url: str | None = option(None, "Label Studio URL (default: $LABEL_STUDIO_URL)")
    api_key: str | None = option(None, "Label Studio access token, legacy or personal (default: "
                                       "$LABEL_STUDIO_API_KEY)")


@dataclass(frozen=True)
class Settings:
    """Where Label Studio is, how to authenticate and how to retry; the key is kept out of ``repr``."""

    url: str
    api_key: str
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __repr__(self) -> str:
        return f"Settings(url={self.url!r}, api_key=<hidden>)"

    @classmethod
    def resolve(cls, url: str | None, api_key: str | None) -> Settings:
        """Flags first, then ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``."""
        url = url or os.environ.get("LABEL_STUDIO_URL")
        api_key = api_key or os.environ.get("LABEL_STUDIO_API_KEY")
        if not url:
            raise PipelineError("no Label Studio URL: set LABEL_STUDIO_URL or pass --url (e.g. http://localhost:8080)")
        if not api_key:
            raise PipelineError(
                "no Label Studio API key: set LABEL_STUDIO_API_KEY or pass --api-key "
                "(Label Studio > Account & Settings > Access Token)"
            )
        if not re.match(r"^https?://", url):
            raise PipelineError(f"Label Studio URL must start with http:// or https://, got {url!r}")
        return cls(url.rstrip("/"), api_key.strip())


@functools.cache
def tls_context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    """httpx's default TLS context, made once per process: loading the CA bundle takes ~0.1 s of CPU per client
    (a noticeable share of a no-change pull), and one context is safe to share between clients and threads.
    The arguments are ``$SSL_CERT_FILE`` and ``$SSL_CERT_DIR``, which httpx reads: they key the cache."""
    return httpx.create_ssl_context()


def http_client(**options: Any) -> httpx.Client:
    """A plain ``httpx`` client with the tool's timeouts and connect-only transport retries."""
    verify = tls_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    return httpx.Client(transport=httpx.HTTPTransport(retries=TRANSPORT_RETRIES, verify=verify),
                        timeout=httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S), **options)


def is_personal_access_token(key: str) -> bool:
    """Personal access tokens are JWTs (three base64url parts); legacy tokens are plain hex strings."""
    return key.startswith("eyJ") and key.count(".") == 2


class TokenAuth(httpx.Auth):
    """Label Studio's two token kinds for a plain ``httpx`` client.

    A legacy token is sent as is. A personal access token is a long-lived refresh token: it is exchanged for an
    access token with ``refresh`` (the SDK's public ``tokens.refresh``), cached, and renewed once when a
    request comes back 401 (access tokens expire after minutes).
    """

    def __init__(self, api_key: str, refresh: Callable[[str], str]) -> None:
        self.api_key = api_key
        self.refresh = refresh
        self.personal = is_personal_access_token(api_key)
        self._access: str | None = None
        self._lock = threading.Lock()

    def _header(self, renew: bool = False) -> str:
        if not self.personal:
            return f"Token {self.api_key}"
        with self._lock:
            if renew or self._access is None:
                self._access = self.refresh(self.api_key)
            return f"Bearer {self._access}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header()
        response = yield request
        if response.status_code == 401 and self.personal:
            request.headers["Authorization"] = self._header(renew=True)
            yield request


class Studio:
    """One Label Studio server: the SDK client plus a plain HTTP client for uploads and fast listings.

    ``Studio(settings)`` only remembers the settings; :meth:`connect` (or ``with Studio(settings) as studio``)
    opens the connection and checks the key with one ``whoami`` call.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: LabelStudio | None = None
        self._http: httpx.Client | None = None
        self._sdk_http: httpx.Client | None = None
        self.user: Any = None
        self._jitter = random.Random()  # only spreads retries in time: nothing to reproduce, so no seed

    def connect(self) -> Studio:
        """Open the connection and check the key; a one-line error when the server or the key is wrong."""
        if self._client is not None:
            return self
        sdk_http = http_client(follow_redirects=True)  # as the SDK's own default client

        def login() -> tuple[LabelStudio, Any]:  # the SDK already checks a personal access token's expiry here
            client = LabelStudio(base_url=self.settings.url, api_key=self.settings.api_key, max_retries=0,
                                 httpx_client=sdk_http)
            return client, client.users.whoami()

        try:
            client, self.user = self._call("connect", login)
        except BaseException:
            sdk_http.close()
            raise
        auth = TokenAuth(self.settings.api_key, lambda key: client.tokens.refresh(refresh=key).access)
        self._client, self._sdk_http = client, sdk_http
        self._http = http_client(base_url=self.settings.url, auth=auth)
        return self

    def close(self) -> None:
        for http in (self._http, self._sdk_http):
            if http is not None:
                http.close()
        self._client = self._http = self._sdk_http = None

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> LabelStudio:
        """The SDK client (connecting on first use)."""
        return self.connect()._client  # type: ignore[return-value]

    @property
    def http(self) -> httpx.Client:
        """The plain HTTP client, authenticated like the SDK (connecting on first use)."""
        return self.connect()._http  # type: ignore[return-value]

    def get(self, path: str, params: dict | None = None, action: str = "fetch a file") -> httpx.Response:
        """A GET of a server path (e.g. an uploaded image); the response, whatever its status."""
        return self._call(action, lambda: self.http.get("/" + path.lstrip("/"), params=params))

    # --- retries and errors -------------------------------------------------------------------------
    def retrying(self, action: str, attempt: Callable[[int], T], project_id: int | None = None,
                 idempotent: bool = True) -> T:
        """``attempt(0)``, ``attempt(1)``, ... until one succeeds, a failure is final or the policy says stop.

        ``attempt`` gets its number so that an operation which is idempotent only by looking first (an import,
        a project creation, an upload) can find what a lost attempt did before doing it again. With
        ``idempotent=False`` there is one attempt: a broken connection may have come after the server acted.
        Every failure leaves as a one-line :class:`PipelineError`; each retry is logged as a warning.
        """
        policy = self.settings.retry
        attempts = policy.attempts if idempotent else 1
        start = time.monotonic()
        number = 0
        while True:
            try:
                return attempt(number)
            except (httpx.HTTPError, ApiError, json.JSONDecodeError, PipelineError) as exc:
                reason, elapsed = retry_reason(exc), time.monotonic() - start
                wait = policy.delay(number, self._jitter)
                number += 1
                if reason is None or number >= attempts or elapsed + wait > policy.budget_s:
                    raise self._failure(exc, action, project_id, number, elapsed) from None
            log.warning("Label Studio at %s: %s while trying to %s (attempt %d of %d); trying again in %.1f s",
                        self.settings.url, reason, action, number, attempts, wait)
            time.sleep(wait)

    def _call(self, action: str, fn: Callable[[], T], project_id: int | None = None, idempotent: bool = True) -> T:
        return self.retrying(action, lambda _: fn(), project_id, idempotent)

    def _failure(self, exc: Exception, action: str, project_id: int | None, attempts: int,
                 seconds: float) -> PipelineError:
        """The one-line error for ``exc``; a :class:`TransientError` when trying later may help."""
        if isinstance(exc, TransientError):
            return exc.after(attempts, seconds)
        if isinstance(exc, PipelineError):
            return exc
        reason = retry_reason(exc)
        if isinstance(exc, ApiError) and reason != TRUNCATED:
            if reason is None:
                return PipelineError(self._explain(exc, action, project_id))
            return TransientError(reason, self._explain(exc, action, project_id),
                                  "the server (or a proxy in front of it) keeps failing; run the command again later "
                                  "(it resumes where it stopped)", attempts, seconds)
        what = f"cannot reach Label Studio at {self.settings.url} ({reason or exc.__class__.__name__}) while trying " \
               f"to {action}"
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):  # final: the transport already re-tried
            return PipelineError(f"{what} after {1 + TRANSPORT_RETRIES} connection attempts in {seconds:.1f} s; "
                                 "is it running? check LABEL_STUDIO_URL or --url")
        if reason is None:  # a redirect loop, a URL httpx cannot use: trying again changes nothing
            return PipelineError(f"{what}; check LABEL_STUDIO_URL or --url")
        return TransientError(reason, what, "the connection keeps breaking: is Label Studio (or a proxy in front of "
                              "it) restarting, or the network failing? run the command again when it is back (it "
                              "resumes where it stopped)", attempts, seconds)

    def _explain(self, exc: ApiError, action: str, project_id: int | None) -> str:
        url, status = self.settings.url, exc.status_code
        if status == 401:
            if is_personal_access_token(self.settings.api_key):
                return (f"Label Studio at {url} rejected the personal access token (401): it is expired, revoked "
                        "or from another server; create a new one under Account & Settings")
            return (f"Label Studio at {url} rejected the legacy API token (401): the token is wrong, or legacy "
                    "tokens are disabled for this organization (enable them under Organization > API Tokens "
                    "Settings, or use a personal access token)")
        if status == 403:
            return f"Label Studio at {url} refused to {action} (403): this user lacks permission for it"
        if status == 404 and project_id is not None:
            return (f"project {project_id} does not exist in Label Studio at {url} (deleted?); "
                    "push again with --new-project or --project ID of an existing project")
        detail = one_line(exc.body if isinstance(exc.body, str) else json.dumps(exc.body))
        return f"Label Studio at {url} failed to {action} (HTTP {status}): {detail}"

    # --- projects -----------------------------------------------------------------------------------
    def projects_named(self, title: str, description: str) -> list[int]:
        """Ids of the projects with exactly this title and description, oldest first (the server's title filter
        matches substrings, so the exact comparison is made here)."""
        projects = self._call("list projects", lambda: list(self.client.projects.list(title=title)))
        return sorted(int(p.id) for p in projects if p.title == title and (p.description or "") == description)

    def create_project(self, title: str, description: str, config: str | None = None, instructions: str = "") -> int:
        """A project with the SLIM labeling config (or ``config``), and ``instructions`` (HTML) shown to annotators
        before they start, where given.

        Creating is not idempotent and a broken connection leaves unknown whether the server made the project,
        so a retry first looks for a project with this title and description that was not there before the
        first attempt, and takes it instead of making a twin.
        """
        before = set(self.projects_named(title, description))

        def attempt(number: int) -> int:
            if number:
                made = sorted(set(self.projects_named(title, description)) - before)
                if made:
                    return made[0]
            return int(self.client.projects.create(title=title, description=description,
                                                   label_config=config or label_config.load(),
                                                   expert_instruction=instructions,
                                                   show_instruction=bool(instructions)).id)

        return self.retrying("create a project", attempt)

    def configure_annotation(self, project_id: int, annotations_per_task: int, share: float,
                             show_predictions: bool) -> None:
        """Ask ``annotations_per_task`` distinct annotators for ``share`` of the project's tasks (one for the
        rest), and show annotators the tasks' predictions or not.

        Label Studio's own settings (maximum annotations, overlap cohort percentage, "show predictions to
        annotators"): its label stream then never gives a task to someone who already answered it, and it
        re-deals the cohort when tasks arrive. Unchanged settings are not written again (the server re-deals
        every task on each change).
        """
        wanted = {"maximum_annotations": annotations_per_task,
                  "overlap_cohort_percentage": round(100 * share) if annotations_per_task > 1 else 100,
                  "show_collab_predictions": show_predictions}
        current = self.project(project_id)
        if all(getattr(current, key, None) == value for key, value in wanted.items()):
            return
        self._call(f"configure project {project_id}",
                   lambda: self.client.projects.update(id=project_id, **wanted), project_id)
        log.info("project %d: %d annotations per task on %d %% of its tasks; predictions %s to annotators",
                 project_id, annotations_per_task, wanted["overlap_cohort_percentage"],
                 "shown" if show_predictions else "hidden")

    def describe_project(self, project_id: int, title: str, description: str) -> None:
        """Give the project this title and description, unless it has them already (then nothing is written)."""
        current = self.project(project_id)
        if (current.title, current.description or "") != (title, description):
            self._call(f"rename project {project_id}", lambda: self.client.projects.update(
                id=project_id, title=title, description=description), project_id)

    def set_instructions(self, project_id: int, html: str) -> bool:
        """Show annotators ``html`` before they start (Label Studio's "instructions"), unless the project shows it
        already; True when something was written. Label Studio sanitises the HTML (bleach): to compare, pass
        HTML that it keeps as it is."""
        current = self.project(project_id)
        if (current.expert_instruction or "") == html and bool(current.show_instruction) == bool(html):
            return False
        self._call(f"update the instructions of project {project_id}", lambda: self.client.projects.update(
            id=project_id, expert_instruction=html, show_instruction=bool(html)), project_id)
        return True

    def project(self, project_id: int) -> Any:
        return self._call(f"open project {project_id}", lambda: self.client.projects.get(id=project_id), project_id)

    def check_project(self, project_id: int, answer: str = ANSWER, choices: Sequence[str] = CHOICES) -> None:
        """The project exists and its labeling config has the ``answer`` control with ``choices`` (by default
        the attention config's core/spurious/unsure)."""
        config = self.project(project_id).label_config or ""
        if f'name="{answer}"' not in config or not all(f'value="{c}"' in config for c in choices):
            raise PipelineError(
                f"project {project_id} does not use the SLIM labeling config (no '{answer}' choices "
                f"{'/'.join(choices)}); pass --project of a project this tool made, or leave it out to create one"
            )

    def project_url(self, project_id: int) -> str:
        return f"{self.settings.url}/projects/{project_id}/data"

    # --- files and tasks ----------------------------------------------------------------------------
    def uploaded_files(self, project_id: int) -> dict[str, str]:
        """{file name as uploaded: URL} of every file in the project (the first copy of a name, if several)."""
        listing = self._call("list uploaded files", lambda: self.client.files.list(id=project_id, all_=True),
                             project_id)
        urls: dict[str, str] = {}
        for item in sorted(listing, key=lambda item: int(item.id)):
            match = STORED_NAME.match(PurePosixPath(item.file).name)
            if match:
                urls.setdefault(match["name"], "/data/" + item.file.lstrip("/"))
        return urls

    def upload_files(self, project_id: int, paths: Sequence[Path]) -> dict[str, str]:
        """Upload files without creating tasks; returns {file name: URL Label Studio serves it at}.

        The SDK has no typed call for multipart uploads, so they go through :attr:`http`; the new files' URLs
        come from the SDK's ``files.list``. A retried batch first takes the files a lost attempt stored (by
        name), so a broken connection never stores a picture twice.
        """
        urls: dict[str, str] = {}
        for start in range(0, len(paths), UPLOAD_BATCH):
            batch = list(paths[start:start + UPLOAD_BATCH])
            urls.update(self.retrying("upload images", lambda number, batch=batch: self._upload_batch(
                project_id, batch, retry=number > 0), project_id))
        return urls

    def _upload_batch(self, project_id: int, batch: list[Path], retry: bool) -> dict[str, str]:
        stored = self.uploaded_files(project_id) if retry else {}
        urls = {path.name: stored[path.name] for path in batch if path.name in stored}
        rest = [path for path in batch if path.name not in stored]
        if not rest:
            return urls
        files = {f"file{i}": (p.name, p.read_bytes(), "image/png") for i, p in enumerate(rest)}
        response = self.http.post(f"/api/projects/{project_id}/import", params={"commit_to_project": "false"},
                                  files=files)
        self._raise_for(response)
        ids = response.json()["file_upload_ids"]
        by_id = {item.id: item.file for item in self.client.files.list(id=project_id, ids=json.dumps(ids))}
        urls.update({path.name: "/data/" + by_id[upload_id].lstrip("/") for path, upload_id in zip(rest, ids)})
        return urls

    def ensure_local_storage(self, project_id: int, folders: Sequence[str]) -> None:
        """Local-files serving only hands out files below a local storage of the project: make one per
        folder (never synced: tasks are imported by ``push``, not created from the folder's files). Creating
        is tried once; the next push lists the storages again and makes only the missing ones."""
        existing = {s.path for s in self._call("list local storages", lambda: self.client.import_storage.local.list(
            project=project_id), project_id)}
        for folder in folders:
            if folder not in existing:
                self._call("create a local-files storage", lambda folder=folder: self.client.import_storage.local.create(
                    project=project_id, path=folder, title=f"SLIM overlays {Path(folder).name}",
                    use_blob_urls=True, regex_filter=r".*\.png"), project_id, idempotent=False)

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.status_code >= 400:
            try:
                body: Any = response.json()
            except ValueError:
                body = response.text[:300]
            raise ApiError(status_code=response.status_code, body=body)

    def import_tasks(self, project_id: int, tasks: Sequence[dict]) -> list[int]:
        """Create tasks (with their predictions; at most :data:`IMPORT_BATCH`); returns their ids in order.

        Posted as plain JSON through :attr:`http`, like the SDK's ``projects.import_tasks`` but without its
        per-value ``jsonable_encoder`` walk (about a tenth of a push's time on plain dicts that are JSON already).
        Tried once: the server may have created the tasks before the connection broke. A broken connection
        raises :class:`TransientError`, which a caller's :meth:`retrying` retries after finding out, by the
        tasks' own ids, what arrived (``push.import_batch``).
        """
        def post() -> list[int]:
            response = self.http.post(f"/api/projects/{project_id}/import", params={"return_task_ids": "true"},
                                      json=list(tasks))
            self._raise_for(response)
            return [int(t) for t in response.json()["task_ids"]]

        return self._call("import tasks", post, project_id, idempotent=False)

    def publish_predictions(self, project_id: int, predictions: Sequence[dict], version: str) -> None:
        """Add ``predictions`` (each naming its ``task``) in one import, then make ``version`` the project's current
        model version: Label Studio shows annotators the predictions of that version, so the tasks still open
        show the newest guess without anyone pressing "Retrieve predictions"."""
        def post() -> None:
            if predictions:
                self._raise_for(self.http.post(f"/api/projects/{project_id}/import/predictions",
                                               json=list(predictions)))
            self._raise_for(self.http.patch(f"/api/projects/{project_id}", json={"model_version": version}))

        self._call(f"publish predictions of version {version}", post, project_id, idempotent=False)

    def list_tasks(self, project_id: int, task_ids: Sequence[int] | None = None,
                   fields: Sequence[str] = TASK_STATE, updated_since: datetime | None = None) -> Iterator[dict]:
        """Tasks of the project (optionally only ``task_ids``, or only those updated at or after
        ``updated_since``, a UTC time of the server's clock) with only ``fields``.

        Label Studio's ``include`` filter also applies to nested annotations, so naming few fields makes the
        listing several times faster; the pages are read as plain JSON through :attr:`http` because validating
        thousands of tasks into SDK models costs more than the request itself. Each page is retried alone.
        ``task_ids`` are asked for :data:`IDS_PER_QUERY` at a time, so the request line stays short.
        ``updated_since`` is a Data Manager filter, so the server lists only what moved, not every task.
        """
        if updated_since is not None:
            since = {"filter": "filter:tasks:updated_at", "operator": "greater_or_equal", "type": "Datetime",
                     "value": updated_since.astimezone(timezone.utc).strftime(DATA_MANAGER_TIME)}
            yield from self._listing(project_id, fields, json.dumps(
                {"filters": {"conjunction": "and", "items": [since]}}))
            return
        if task_ids is None:
            yield from self._listing(project_id, fields, None)
            return
        for start in range(0, len(task_ids), IDS_PER_QUERY):
            chosen = list(task_ids[start:start + IDS_PER_QUERY])
            yield from self._listing(project_id, fields,
                                     json.dumps({"selectedItems": {"all": False, "included": chosen}}))

    def _listing(self, project_id: int, fields: Sequence[str], query: str | None) -> Iterator[dict]:
        """Every page of one task listing (``query``: a Data Manager selection, or None for all tasks)."""
        seen, page = 0, 1
        while True:
            params = {"project": project_id, "page": page, "page_size": PAGE_SIZE, "fields": "all",
                      "include": ",".join(fields)}
            if query:
                params["query"] = query
            body = self._call("list tasks", lambda params=params: self._task_page(params), project_id)
            if body is None:  # past the last page
                return
            tasks = body["tasks"] if isinstance(body, dict) else body
            yield from tasks
            seen += len(tasks)
            total = body.get("total", seen) if isinstance(body, dict) else seen
            if not tasks or seen >= total:
                return
            page += 1

    def _task_page(self, params: dict) -> Any:
        """One page of a task listing as JSON, or None past the last page (Label Studio answers 404)."""
        response = self.http.get("/api/tasks/", params=params)
        if response.status_code == 404 and params["page"] > 1:
            return None
        self._raise_for(response)
        return response.json()

    def project_counts(self, project_id: int) -> ProjectCounts:
        """The project's tasks and answers, counted by the server in one cheap request (three SQL counts)."""
        def read() -> ProjectCounts:
            response = self.http.get("/api/projects/counts/", params={
                "ids": project_id, "include": "id,task_number,total_annotations_number,skipped_annotations_number"})
            self._raise_for(response)
            found = [p for p in response.json().get("results", []) if int(p["id"]) == project_id]
            if not found:
                raise PipelineError(f"Label Studio did not count project {project_id}; is it deleted?")
            date = response.headers.get("date")
            return ProjectCounts(int(found[0]["task_number"]),
                                 int(found[0]["total_annotations_number"]) + int(found[0]["skipped_annotations_number"]),
                                 parsedate_to_datetime(date) if date else None)

        return self._call("count the project's tasks and answers", read, project_id)

    def users(self) -> dict[int, str]:
        """User id -> email, to name annotators."""
        return self._call("list users", lambda: {int(u.id): u.email or u.username for u in self.client.users.list()})

    # --- users and their own tokens -----------------------------------------------------------------
    # Label Studio's API creates users (POST /api/users/) but never hands out their tokens; a user gets one by
    # signing in. So a simulated annotator signs in like a person does -- the organisation's invite link, the
    # signup or login form -- in a cookie session of its own, and then reads its own token from the API. All of
    # it is plain HTTP, so it works with a remote server as well as the local one.
    def invite_token(self) -> str:
        """The organisation's invite token (``GET /api/invite``): what lets a new member sign up when the server
        allows signing up only by invitation."""
        return self._call("read the organization's invite link",
                          lambda: self._json(self.http.get("/api/invite"))["token"])

    def legacy_tokens_enabled(self) -> bool:
        """Whether the organisation accepts legacy tokens; if not, users act through personal access tokens."""
        return bool(self._call("read the API token settings",
                               lambda: self.client.jwt_settings.get()).legacy_api_tokens_enabled)

    def sign_up_user(self, email: str, password: str, invite: str, personal: bool) -> UserLogin | None:
        """Create the user ``email`` through the signup form with the organisation's ``invite`` token, as a person
        opening the invite link does, and return its own token (``personal``: a personal access token, else its
        legacy token).

        Submitted once (a lost answer may hide a created user); when the email is taken -- by an earlier attempt
        or anyone else -- this logs in with ``password`` instead, so calling it again never makes a second user
        (``None`` when that login is refused: the email belongs to someone with another password).
        """
        with http_client(base_url=self.settings.url) as browser:
            response = self._submit_form(browser, SIGNUP_PATH, {"email": email, "password": password},
                                         f"sign up {email}", params={"token": invite}, idempotent=False)
            if response.status_code == 403:
                raise PipelineError(f"Label Studio at {self.settings.url} refused the organization's invite link "
                                    f"(403) while signing up {email}; was the invite link reset meanwhile? run again")
            if response.status_code != 302:
                if EMAIL_TAKEN not in response.text:
                    raise PipelineError(f"Label Studio at {self.settings.url} refused to sign up {email} (HTTP "
                                        f"{response.status_code}): its signup form rejected the email or password")
                return self.log_in_user(email, [password], personal)
            return self._own_token(browser, email, password, personal)

    def log_in_user(self, email: str, passwords: Sequence[str], personal: bool) -> UserLogin | None:
        """Log in as the existing user ``email`` with the first of ``passwords`` the server accepts and return its
        own token (see :meth:`sign_up_user`); ``None`` when none is accepted."""
        with http_client(base_url=self.settings.url) as browser:
            for password in passwords:
                response = self._submit_form(browser, LOGIN_PATH, {"email": email, "password": password},
                                             f"log in as {email}")
                if response.status_code == 302:
                    return self._own_token(browser, email, password, personal)
        return None

    def _submit_form(self, browser: httpx.Client, path: str, fields: dict[str, str], action: str,
                     params: dict | None = None, idempotent: bool = True) -> httpx.Response:
        """Open the form at ``path`` (for Django's CSRF cookie), then post ``fields`` with that token, as a
        browser does; the answer is returned unfollowed (a redirect means success, the form again a refusal)."""
        def opened() -> str:
            page = browser.get(path, params=params)
            if page.status_code >= 400:
                self._raise_for(page)
            return browser.cookies.get(CSRF_COOKIE) or ""

        csrf = self._call(f"open the form to {action}", opened)
        headers = {"Referer": f"{self.settings.url}{path}"}  # Django checks the referer of a form posted over https
        return self._call(action, lambda: browser.post(path, params=params, headers=headers,
                                                       data={**fields, "csrfmiddlewaretoken": csrf}),
                          idempotent=idempotent)

    def _own_token(self, browser: httpx.Client, email: str, password: str, personal: bool) -> UserLogin:
        """The logged-in session's user and its own token: the legacy token every user has, or a new personal
        access token (a user may hold only one valid one, and Label Studio shows it only when it is made)."""
        who = self._call("read the signed-in user", lambda: self._json(browser.get("/api/current-user/whoami")))
        if (who.get("email") or "").lower() != email.lower():
            raise PipelineError(f"Label Studio at {self.settings.url} signed in someone else than {email}")
        if not personal:
            body = self._call(f"read the API token of {email}",
                              lambda: self._json(browser.get("/api/current-user/token")))
            return UserLogin(int(who["id"]), email, body["token"], password)
        response = self._call(f"create a personal access token for {email}", lambda: browser.post(
            "/api/token/", headers={"X-CSRFToken": browser.cookies.get(CSRF_COOKIE) or ""}), idempotent=False)
        if response.status_code == 409:
            raise PipelineError(f"{email} already has a personal access token that this tool no longer knows; revoke "
                                f"it in Label Studio (log in as {email}, Account & Settings) or enable legacy tokens, "
                                "and run again")
        return UserLogin(int(who["id"]), email, self._json(response)["token"], password)

    def _json(self, response: httpx.Response) -> Any:
        """The JSON body of a successful answer (an error status raises, as the SDK's calls do)."""
        self._raise_for(response)
        return response.json()

    def user_name(self, user_id: int, timeout_s: float = USER_LOOKUP_TIMEOUT_S) -> str | None:
        """One user's name as :meth:`users` gives it (e-mail, else username), or None when Label Studio has no
        such user. One small request instead of the whole user list, tried once with a short timeout: the ML
        backend asks it while Label Studio waits for the webhook's answer (for a second, by default)."""
        def get() -> str | None:
            response = self.http.get(f"/api/users/{int(user_id)}/", timeout=timeout_s)
            if response.status_code == 404:
                return None
            self._raise_for(response)
            body = response.json()
            return body.get("email") or body.get("username") or None

        return self._call(f"name user {user_id}", get, idempotent=False)

    # --- annotations --------------------------------------------------------------------------------
    def submit_annotation(self, task_id: int, project_id: int, result: list[dict], lead_time: float) -> int:
        """Submit an answer through the same endpoint the labeling UI posts to (once: a lost answer to a
        submission may hide a stored annotation, and a second one would be a duplicate)."""
        annotation = self._call(f"annotate task {task_id}", lambda: self.client.annotations.create(
            id=task_id, project=project_id, result=result, lead_time=lead_time, was_cancelled=False), project_id,
            idempotent=False)
        return int(annotation.id)

    def update_annotation(self, annotation_id: int, result: list[dict]) -> None:
        """Replace an annotation's result (setting the same result twice is harmless: retried)."""
        self._call(f"update annotation {annotation_id}",
                   lambda: self.client.annotations.update(id=annotation_id, result=result))

    def delete_annotation(self, annotation_id: int) -> None:
        self._call(f"delete annotation {annotation_id}", lambda: self.client.annotations.delete(id=annotation_id),
                   idempotent=False)

    def delete_task(self, task_id: int) -> None:
        self._call(f"delete task {task_id}", lambda: self.client.tasks.delete(id=task_id), idempotent=False)

    def reopen_task(self, task_id: int, answers_wanted: int) -> bool:
        """Ask for ``answers_wanted`` answers on a task (its overlap), putting it back into the label stream while
        it has fewer; Label Studio never deals a task to someone who already answered it, so each new answer is a
        new person's. Setting what is already set is harmless (retried); False when nothing had to change.

        Label Studio re-deals every task's overlap when tasks arrive in a project with an overlap cohort below
        100 %, so a push applies this after its imports.
        """
        task = self._call(f"open task {task_id}", lambda: self.client.tasks.get(id=str(task_id)))
        labeled = (task.total_annotations or 0) >= answers_wanted
        if (task.overlap or 1) >= answers_wanted and bool(task.is_labeled) == labeled:
            return False
        self._call(f"reopen task {task_id}", lambda: self.client.tasks.update(
            id=str(task_id), overlap=max(answers_wanted, task.overlap or 1), is_labeled=labeled))
        return True
