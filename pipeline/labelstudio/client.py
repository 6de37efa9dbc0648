"""The one place that talks to Label Studio, through ``label-studio-sdk``.

:class:`Studio` wraps the SDK client with the few operations the pipeline needs and turns every failure into
a one-line :class:`~pipeline.core.errors.PipelineError` (server down, wrong key, project or task gone).
Constructing a :class:`Studio` costs nothing; :meth:`Studio.connect` opens the connection and checks the key.

Two requests have no typed SDK call that is fast enough: multipart file uploads, and task listings of
thousands of tasks (validating them into SDK models costs more than the request). Those go through this
module's own ``httpx`` client, authenticated as the SDK is: a legacy token as ``Token``, a personal access
token exchanged for a short-lived access token through the SDK's public ``tokens.refresh`` and sent as
``Bearer`` (renewed once when the server answers 401). No private SDK attribute is used.

The API key is handed to the SDK and never formatted into a message or a log line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
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
UPLOAD_BATCH = 100  # Django's DATA_UPLOAD_MAX_NUMBER_FILES
# Label Studio parses every uploaded file as a task and refuses that for configs with several data keys, so
# pictures are uploaded into a companion project with this one-image config and referenced by URL.
MEDIA_CONFIG = '<View><Image name="image" value="$image"/></View>'

IMPORT_BATCH = 500  # tasks per import request: a few MB of JSON, well under the server's 200 MB limit
PAGE_SIZE = 1000  # tasks per listing page: few round trips, pages of a few hundred kB
# what a task listing carries: enough to tell a task's state, or its annotations in full
TASK_COUNTS = ("id", "updated_at", "total_annotations", "cancelled_annotations")
TASK_STATE = (*TASK_COUNTS, "data")
TASK_ANNOTATIONS = ("id", "updated_at", "annotations", "result", "completed_by", "was_cancelled", "lead_time",
                    "created_at")
T = TypeVar("T")


@dataclass(frozen=True)
class ConnectionOptions:
    """Where Label Studio is, as the user gives it; :meth:`Settings.resolve` fills in the environment."""

    url: str | None = option(None, "Label Studio URL (default: $LABEL_STUDIO_URL)")
    api_key: str | None = option(None, "Label Studio access token, legacy or personal (default: "
                                       "$LABEL_STUDIO_API_KEY)")


@dataclass(frozen=True)
class Settings:
    """Where Label Studio is and how to authenticate; the key is kept out of ``repr``."""

    url: str
    api_key: str

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
        self.user: Any = None

    def connect(self) -> Studio:
        """Open the connection and check the key; a one-line error when the server or the key is wrong."""
        if self._client is not None:
            return self
        with self._errors("connect"):  # the SDK already checks a personal access token's expiry here
            client = LabelStudio(base_url=self.settings.url, api_key=self.settings.api_key, timeout=TIMEOUT_S)
            self.user = client.users.whoami()
        auth = TokenAuth(self.settings.api_key, lambda key: client.tokens.refresh(refresh=key).access)
        self._client = client
        self._http = httpx.Client(base_url=self.settings.url, auth=auth, timeout=TIMEOUT_S)
        return self

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        self._client = self._http = None

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
        with self._errors(action):
            return self.http.get("/" + path.lstrip("/"), params=params)

    # --- errors -------------------------------------------------------------------------------------
    def _call(self, action: str, fn: Callable[[], T], project_id: int | None = None) -> T:
        with self._errors(action, project_id):
            return fn()

    @contextmanager
    def _errors(self, action: str, project_id: int | None = None) -> Iterator[None]:
        url = self.settings.url
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadTimeout) as exc:
            raise PipelineError(
                f"cannot reach Label Studio at {url} ({exc.__class__.__name__}) while trying to {action}; "
                "is it running? check LABEL_STUDIO_URL or --url"
            ) from None
        except ApiError as exc:
            raise PipelineError(self._explain(exc, action, project_id)) from None

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
        detail = exc.body if isinstance(exc.body, str) else json.dumps(exc.body)[:300]
        return f"Label Studio at {url} failed to {action} (HTTP {status}): {detail}"

    # --- projects -----------------------------------------------------------------------------------
    def create_project(self, title: str, description: str, config: str | None = None) -> int:
        """A project with the SLIM labeling config (or ``config``)."""
        project = self._call("create a project", lambda: self.client.projects.create(
            title=title, description=description, label_config=config or label_config.load()))
        return int(project.id)

    def project(self, project_id: int) -> Any:
        return self._call(f"open project {project_id}", lambda: self.client.projects.get(id=project_id), project_id)

    def check_project(self, project_id: int) -> None:
        """The project exists and its labeling config has our answer control with the three choices."""
        config = self.project(project_id).label_config or ""
        if f'name="{ANSWER}"' not in config or not all(f'value="{c}"' in config for c in CHOICES):
            raise PipelineError(
                f"project {project_id} does not use the SLIM labeling config (no '{ANSWER}' choices core/spurious/"
                "unsure); pass --project of a project made by `push`, or leave it out to create one"
            )

    def project_url(self, project_id: int) -> str:
        return f"{self.settings.url}/projects/{project_id}/data"

    # --- files and tasks ----------------------------------------------------------------------------
    def upload_files(self, project_id: int, paths: Sequence[Path]) -> dict[str, str]:
        """Upload files without creating tasks; returns {file name: URL Label Studio serves it at}.

        The SDK has no typed call for multipart uploads, so they go through :attr:`http`; the new files' URLs
        come from the SDK's ``files.list``.
        """
        urls: dict[str, str] = {}
        for start in range(0, len(paths), UPLOAD_BATCH):
            batch = paths[start:start + UPLOAD_BATCH]
            files = {f"file{i}": (p.name, p.read_bytes(), "image/png") for i, p in enumerate(batch)}
            with self._errors("upload images", project_id):
                response = self.http.post(f"/api/projects/{project_id}/import", params={"commit_to_project": "false"},
                                          files=files)
                self._raise_for(response)
                ids = response.json()["file_upload_ids"]
                listing = self.client.files.list(id=project_id, ids=json.dumps(ids))
            by_id = {item.id: item.file for item in listing}
            for path, upload_id in zip(batch, ids):
                urls[path.name] = "/data/" + by_id[upload_id].lstrip("/")
        return urls

    def ensure_local_storage(self, project_id: int, folders: Sequence[str]) -> None:
        """Local-files serving only hands out files below a local storage of the project: make one per
        folder (never synced: tasks are imported by ``push``, not created from the folder's files)."""
        existing = {s.path for s in self._call("list local storages", lambda: self.client.import_storage.local.list(
            project=project_id), project_id)}
        for folder in folders:
            if folder not in existing:
                self._call("create a local-files storage", lambda folder=folder: self.client.import_storage.local.create(
                    project=project_id, path=folder, title=f"SLIM overlays {Path(folder).name}",
                    use_blob_urls=True, regex_filter=r".*\.png"), project_id)

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.status_code >= 400:
            try:
                body: Any = response.json()
            except ValueError:
                body = response.text[:300]
            raise ApiError(status_code=response.status_code, body=body)

    def import_tasks(self, project_id: int, tasks: Sequence[dict]) -> list[int]:
        """Create tasks (with their predictions); returns their ids in order."""
        ids: list[int] = []
        for start in range(0, len(tasks), IMPORT_BATCH):
            batch = list(tasks[start:start + IMPORT_BATCH])
            response = self._call("import tasks", lambda batch=batch: self.client.projects.import_tasks(
                id=project_id, request=batch, return_task_ids=True), project_id)
            ids.extend(int(t) for t in response.task_ids)
        return ids

    def list_tasks(self, project_id: int, task_ids: Sequence[int] | None = None,
                   fields: Sequence[str] = TASK_STATE) -> Iterator[dict]:
        """Tasks of the project (optionally only ``task_ids``) with only ``fields``.

        Label Studio's ``include`` filter also applies to nested annotations, so naming few fields makes the
        listing several times faster; the pages are read as plain JSON through :attr:`http` because validating
        thousands of tasks into SDK models costs more than the request itself.
        """
        query = None
        if task_ids is not None:
            if not task_ids:
                return
            query = json.dumps({"selectedItems": {"all": False, "included": list(task_ids)}})
        seen, page = 0, 1
        while True:
            params = {"project": project_id, "page": page, "page_size": PAGE_SIZE, "fields": "all",
                      "include": ",".join(fields)}
            if query:
                params["query"] = query
            with self._errors("list tasks", project_id):
                response = self.http.get("/api/tasks/", params=params)
                if response.status_code == 404 and page > 1:  # past the last page
                    return
                self._raise_for(response)
            body = response.json()
            tasks = body["tasks"] if isinstance(body, dict) else body
            yield from tasks
            seen += len(tasks)
            total = body.get("total", seen) if isinstance(body, dict) else seen
            if not tasks or seen >= total:
                return
            page += 1

    def users(self) -> dict[int, str]:
        """User id -> email, to name annotators."""
        return {int(u.id): u.email or u.username for u in self._call("list users", lambda: self.client.users.list())}

    # --- annotations --------------------------------------------------------------------------------
    def submit_annotation(self, task_id: int, project_id: int, result: list[dict], lead_time: float) -> int:
        """Submit an answer through the same endpoint the labeling UI posts to."""
        annotation = self._call(f"annotate task {task_id}", lambda: self.client.annotations.create(
            id=task_id, project=project_id, result=result, lead_time=lead_time, was_cancelled=False), project_id)
        return int(annotation.id)

    def update_annotation(self, annotation_id: int, result: list[dict]) -> None:
        self._call(f"update annotation {annotation_id}",
                   lambda: self.client.annotations.update(id=annotation_id, result=result))

    def delete_annotation(self, annotation_id: int) -> None:
        self._call(f"delete annotation {annotation_id}", lambda: self.client.annotations.delete(id=annotation_id))

    def delete_task(self, task_id: int) -> None:
        self._call(f"delete task {task_id}", lambda: self.client.tasks.delete(id=task_id))
