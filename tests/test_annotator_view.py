"""What an annotator meets, in a real browser: Debian's Chromium driven by playwright against a real Label Studio.

The hotkeys are the labeling page's own (1 core, 2 spurious, Ctrl+Enter submit); what they submit is read
back through ``pull``. Skipped only where no Chromium or playwright is installed; CI installs both.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from pathlib import Path

import pytest

from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.labelstudio.browser import SETTLE_MS, browser_page, find_chromium, log_in, open_task
from pipeline.labelstudio.client import Settings, Studio
from pipeline.labelstudio.pull import pull_run
from pipeline.labelstudio.push import push_run
from pipeline.labelstudio.verify import pull_checks, push_checks
from pipeline.slim.counterfactual import load_counterfactuals, read_counterfactuals

MISSING = "no chromium or no playwright package (CI installs both; see .ci/run)"
if find_chromium() is None or importlib.util.find_spec("playwright") is None:
    if os.environ.get("CI"):
        raise RuntimeError(f"the browser tests cannot run on CI: {MISSING}")
    pytest.skip(MISSING, allow_module_level=True)

from playwright.sync_api import Locator, Page, expect
from test_counterfactual_checks import check_tasks

ANSWER_WAIT_S = 20  # the editor posts the annotation a moment after the key press


def choice(page: Page, answer: str) -> Locator:
    """The answer's radio button in the labeling editor (its label shows the hotkey: "core[1]")."""
    return page.get_by_role("radio", name=re.compile(rf"^{answer}\b"))


def answer_count(studio: Studio, project_id: int, task_id: int) -> int:
    """How many answers Label Studio holds for one task, polled until one arrives or the wait is over."""
    deadline = time.monotonic() + ANSWER_WAIT_S
    while True:
        (task,) = studio.list_tasks(project_id, task_ids=[task_id])
        if task["total_annotations"] or time.monotonic() > deadline:
            return task["total_annotations"]
        time.sleep(0.5)


def test_the_label_stream_hides_the_guess_and_the_hotkeys_submit_also_from_the_note(
        sampled_run: Path, settings: Settings, labelstudio) -> None:
    """In the label stream ("Label All Tasks") the instructions come first and nothing is pre-selected (push's
    default hides the model's guess); "1"/"2" choose and Ctrl+Enter submits. With the cursor in the note box
    Ctrl+Enter alone does nothing (Label Studio ignores hotkeys in text boxes), but Shift+Enter keeps the note and
    closes the box, and then Ctrl+Enter submits the answer with its note, as the box's placeholder says. A task
    opened from the Data Manager instead shows the guess pre-selected whatever the setting (Label Studio applies
    it to the label stream only; the README says so)."""
    pushed = push_run(Run(sampled_run), settings, progress=False)
    project_id = pushed["project_id"]
    studio = Studio(settings)
    tasks = sorted(studio.list_tasks(project_id, fields=("id", "predictions", "result")), key=lambda t: t["id"])
    first, second, third = (t["id"] for t in tasks[:3])
    with browser_page() as page:
        log_in(page, labelstudio)
        open_task(page, labelstudio.url, project_id)
        instructions = page.locator(".lsf-modal-ls_visible")  # shown before the first task
        expect(instructions.get_by_text("Labeling Instructions")).to_be_visible()
        expect(instructions.locator("img")).to_have_count(2)  # one core and one spurious example of this run
        instructions.get_by_role("button").first.click()  # its close button
        expect(instructions).to_have_count(0)
        assert page.get_by_text("CAM ≥ 0.8").count() == 1  # the run's threshold in the header
        for answer in ("core", "spurious", "unsure"):
            expect(choice(page, answer)).not_to_be_checked()
        note = page.locator("textarea").first
        assert "Shift+Enter keeps it, then Ctrl+Enter submits" in note.get_attribute("placeholder")
        page.keyboard.press("2")
        expect(choice(page, "spurious")).to_be_checked()
        note.click()
        page.keyboard.type("the stripes are water")
        page.keyboard.press("Control+Enter")
        assert answer_count(studio, project_id, first) == 0, "Ctrl+Enter from inside the note box submitted"
        page.keyboard.press("Shift+Enter")
        page.keyboard.press("Control+Enter")
        assert answer_count(studio, project_id, first) == 1

        page.wait_for_timeout(SETTLE_MS)  # the stream deals the next task
        expect(choice(page, "core")).not_to_be_checked()
        page.keyboard.press("1")
        expect(choice(page, "core")).to_be_checked()
        page.keyboard.press("Control+Enter")
        assert answer_count(studio, project_id, second) == 1

        open_task(page, labelstudio.url, project_id, third)
        guess = tasks[2]["predictions"][0]["result"][0]["value"]["choices"][0]
        expect(choice(page, guess)).to_be_checked()

    pull_run(Run(sampled_run), settings)
    store = AnnotationStore(sampled_run / "labels.sqlite")
    by_task = {a.task_id: a for a in store.annotations()}
    store.close()
    assert (by_task[first].choice, by_task[first].note) == ("spurious", "the stripes are water")
    assert (by_task[second].choice, by_task[second].note) == ("core", None)
    assert by_task[first].annotator == by_task[second].annotator == labelstudio.username


def test_a_counterfactual_check_shows_its_question_and_picture_and_a_no_keeps_the_image_out_of_training(
        generated: Path, settings: Settings, labelstudio) -> None:
    """A check task as the annotator meets it: the question names the class the generated image would be trained
    as, the generated picture itself is on screen (loaded, not a broken link), "2" answers no and Ctrl+Enter
    submits; the next ``pull-checks`` then leaves that image out of training and keeps every other one."""
    run = Run(generated)
    pushed = push_checks(run, settings, progress=False)
    project_id = pushed["project_id"]
    studio = Studio(settings)
    (task,) = studio.list_tasks(project_id, task_ids=[min(check_tasks(generated).values())])
    picture = task["data"]["image"].rsplit("/", 1)[-1]
    with browser_page() as page:
        log_in(page, labelstudio)
        open_task(page, labelstudio.url, project_id, task["id"], ready_text="yes")
        expect(page.get_by_text(task["data"]["question"], exact=True)).to_be_visible()
        assert re.fullmatch(r"Does this still show a (disc|triangle)\?", task["data"]["question"])
        page.wait_for_function("name => [...document.images].some(i => i.src.endsWith(name) && i.complete "
                               "&& i.naturalWidth > 0)", arg=picture)
        expect(choice(page, "no")).not_to_be_checked()
        page.keyboard.press("2")
        expect(choice(page, "no")).to_be_checked()
        page.keyboard.press("Control+Enter")
        assert answer_count(studio, project_id, task["id"]) == 1

    summary = pull_checks(run, settings)
    assert (summary["checked"], summary["rejected"]) == (1, 1)
    training = load_counterfactuals(run, run.load_config())
    assert task["data"]["key"] not in training.keys
    assert (len(training), training.rejected) == (len(read_counterfactuals(run.counterfactual_dir)) - 1, 1)
