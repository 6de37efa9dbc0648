"""Screenshot of an attention task as an annotator sees it in Label Studio (for docs/).

Starts the run's local Label Studio (the one ``python -m pipeline demo`` made), logs in with the demo login
in headless Chromium and captures the labeling page of the run's first task. Needs Debian's ``chromium``
(``apt-get install chromium``) and the ``playwright`` Python package (its driver only; no browser download):

    pip install playwright
    python scripts/screenshot_task.py --run runs/demo --out docs/labelstudio-task.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.labelstudio.server import LocalLabelStudio

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a run pushed by the demo (default runs/demo)")
    parser.add_argument("--out", default="docs/labelstudio-task.png", help="PNG to write")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    args = parser.parse_args()
    run = Run(args.run)
    store = AnnotationStore(run.labels_path)
    project = int(store.get_meta("project_id"))
    task = store.tasks(project)[0].task_id
    store.close()
    with LocalLabelStudio(run.labelstudio_dir) as login, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{login.url}/user/login/")
        page.fill("input[name=email]", login.username)
        page.fill("input[name=password]", login.password)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.goto(f"{login.url}/projects/{project}/data?task={task}")
        page.wait_for_selector("text=spurious", timeout=60_000)
        page.wait_for_timeout(3000)  # let the images finish drawing
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
