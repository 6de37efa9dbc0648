"""What an annotator sees: Label Studio's labeling page in a real, headless Chromium.

For the docs' screenshots and the UI tests. It drives the system's own Chromium (Debian's ``chromium``
package) through the ``playwright`` package's driver: ``playwright install`` is never needed, nothing is
downloaded. Both are optional: the labeling loop itself never opens a browser.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from pipeline.labelstudio.server import LocalCredentials

log = logging.getLogger(__name__)
# a headless browser in a container or CI job: no sandbox (no user namespaces there), no GPU, nothing phoned home
CHROMIUM_FLAGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
VIEWPORT = {"width": 1400, "height": 900}  # a laptop screen: both images and the choices fit without scrolling
PAGE_TIMEOUT_MS = 60_000  # the labeling app's first load compiles a large bundle: seconds on a busy 2-core machine
SETTLE_MS = 1_500  # the editor attaches its hotkeys after the page reports idle


def find_chromium() -> str | None:
    """The Chromium to drive: ``$CHROMIUM`` or the system's ``chromium`` (None when there is none)."""
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@contextmanager
def browser_page(executable: str | None = None) -> Iterator[Page]:
    """A fresh headless Chromium page, closed afterwards."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise PipelineError("the playwright package is not installed; run `pip install playwright` "
                            "(its driver only: the browser is the system's chromium)") from exc
    executable = executable or find_chromium()
    if executable is None:
        raise PipelineError("no chromium found; install Debian's chromium package or set CHROMIUM=/path/to/chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_FLAGS))
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def log_in(page: Page, login: LocalCredentials) -> None:
    """Sign in through Label Studio's login form, as a person would."""
    page.goto(f"{login.url}/user/login/")
    page.fill("input[name=email]", login.username)
    page.fill("input[name=password]", login.password)
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")
    if "/user/login" in page.url:
        raise PipelineError(f"Label Studio at {login.url} refused the login of {login.username}")


def open_task(page: Page, url: str, project_id: int, task_id: int | None = None,
              ready_text: str = "spurious") -> None:
    """Open one task from the Data Manager (``task_id``), or the label stream ("Label All Tasks": the next task
    Label Studio deals this user), and wait until the choices are on screen and the hotkeys are live."""
    page.goto(f"{url}/projects/{project_id}/data?" + (f"task={task_id}" if task_id is not None else "labeling=1"))
    page.wait_for_selector(f"text={ready_text}")
    page.wait_for_load_state("networkidle")  # the task's pictures and annotations, then the editor binds its keys
    page.wait_for_timeout(SETTLE_MS)
    log.debug("opened %s of project %d", f"task {task_id}" if task_id is not None else "the label stream",
              project_id)
