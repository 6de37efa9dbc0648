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

from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.labelstudio.browser import browser_page, log_in, open_task
from pipeline.labelstudio.server import LocalLabelStudio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a run pushed by the demo (default runs/demo)")
    parser.add_argument("--out", default="docs/labelstudio-task.png", help="PNG to write")
    parser.add_argument("--chromium", default=None, help="Chromium executable (default: $CHROMIUM or chromium on PATH)")
    args = parser.parse_args()
    run = Run(args.run)
    store = AnnotationStore(run.labels_path)
    project = int(store.get_meta("project_id"))
    task = store.tasks(project)[0].task_id
    store.close()
    with LocalLabelStudio(run.labelstudio_dir) as login, browser_page(args.chromium) as page:
        log_in(page, login)
        open_task(page, login.url, project, task)
        page.wait_for_timeout(3000)  # let the images finish drawing
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
