"""Annotator guidance against a real Label Studio: the instructions' two examples from the run's own pictures
(loadable by the browser, re-pushed without duplicates, updated once answers exist), and the companion project
that holds uploaded pictures (named for what it is, found again under its former name, absent with local files)."""

from __future__ import annotations

import html
import io
import re
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cli import main
from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.labelstudio import guidance
from pipeline.labelstudio.client import Settings, Studio
from pipeline.labelstudio.guidance import EXAMPLE_WIDTH, asked_images, choose_examples
from pipeline.labelstudio.push import former_media_identity, media_identity, push_run
from pipeline.slim.prelabel import attention_prior
from pipeline.slim.propagate import Propagation

EXAMPLE = re.compile(r'<img src="([^"]+)" alt="(core|spurious) example: image (\d+)">')
PNG = b"\x89PNG\r\n\x1a\n"


def examples_shown(studio: Studio, project_id: int) -> dict[str, tuple[int, str]]:
    """verdict -> (image id, URL) of the examples in the project's instructions, each checked loadable: fetched
    with the admin's token as the annotator's browser fetches it with a session, a PNG thumbnail."""
    project = studio.project(project_id)
    assert project.show_instruction and "<b>spurious</b>" in project.expert_instruction
    found = {verdict: (int(image_id), html.unescape(url))
             for url, verdict, image_id in EXAMPLE.findall(project.expert_instruction)}
    assert len(EXAMPLE.findall(project.expert_instruction)) == len(found)  # one picture per verdict
    for _, url in found.values():
        response = studio.get(url)
        assert response.status_code == 200 and response.content[:8] == PNG, url
        picture = Image.open(io.BytesIO(response.content))
        assert picture.format == "PNG" and picture.width <= EXAMPLE_WIDTH and len(response.content) < 200_000
    return found


def test_examples_are_two_attended_images_that_are_no_task(sampled_run: Path, monkeypatch) -> None:
    run = Run(sampled_run)
    arrays = AttentionArrays.load(sampled_run / "attention.npz")
    examples = choose_examples(run, arrays)
    assert [e.verdict for e in examples] == ["core", "spurious"] and {e.source for e in examples} == {"attention"}
    ids = {e.image_id for e in examples}
    assert len(ids) == 2 and not ids & asked_images(run) and asked_images(run)
    assert all(arrays.cam[arrays.row_of(i)].max() > 0 for i in ids)  # a blank map shows nothing to judge
    monkeypatch.setattr(guidance, "attention_prior", lambda cams: np.full(len(cams), 0.7))  # every map alike
    alike = choose_examples(run, arrays)
    assert len({e.image_id for e in alike}) == 2 and [e.clear for e in alike] == [True, False]


def test_instructions_show_a_core_and_a_spurious_example_of_the_run(sampled_run: Path, settings: Settings) -> None:
    """First push: the attention prior's extremes among images that are no task, captioned as the tool's guess.
    Pushing again changes nothing. Once answers are spread, the next push shows the answers' clearest cases."""
    run = Run(sampled_run)
    summary = push_run(run, settings, progress=False)
    studio = Studio(settings)
    project = summary["project_id"]
    shown = examples_shown(studio, project)
    assert set(shown) == {"core", "spurious"} and summary["instructions_updated"]
    assert summary["examples"] == {verdict: image_id for verdict, (image_id, _) in shown.items()}
    arrays = AttentionArrays.load(sampled_run / "attention.npz")
    asked = {int(row["image_id"]) for row in run.load_csv(run.selection_path(1), "sample")}
    assert asked == asked_images(run) and not {image_id for image_id, _ in shown.values()} & asked
    prior = attention_prior(arrays.cam)
    attended = arrays.cam.reshape(len(arrays), -1).max(axis=1) > 0  # a blank map (prior 1) shows nothing
    unasked = prior[~np.isin(arrays.index, list(asked)) & attended]
    core, spurious = (prior[arrays.row_of(shown[v][0])] for v in ("core", "spurious"))
    assert core == unasked.max() >= 0.5 and spurious == unasked.min()
    text = studio.project(project).expert_instruction
    assert "guess from the shape of the attention alone" in text
    if spurious >= 0.5:  # the tiny run's 4x4 maps are compact everywhere: the caption says it only leans that way
        assert "no image of this run has attention spread out enough" in text

    uploads = AnnotationStore(run.labels_path).uploads(project)
    media = int(AnnotationStore(run.labels_path).get_meta(f"media_project_for_{project}"))
    files = studio.uploaded_files(media)
    again = push_run(run, settings, progress=False)
    assert not again["instructions_updated"] and again["examples"] == summary["examples"]
    assert AnnotationStore(run.labels_path).uploads(project) == uploads and studio.uploaded_files(media) == files

    # answers arrive (here as a CSV: every third answered image spurious) and are spread: the examples follow them
    (sampled_run / "answers.csv").write_text("image_id,label\n" + "".join(
        f"{i},{'spurious' if k % 3 == 0 else 'core'}\n" for k, i in enumerate(arrays.index[::8])))
    assert main(["propagate", "--run", str(sampled_run), "--labels", str(sampled_run / "answers.csv"), "--quiet"]) == 0
    spread = Propagation.load(run.propagation_path)
    updated = push_run(run, settings, progress=False)
    assert updated["instructions_updated"] and updated["created"] == 0
    shown = examples_shown(studio, project)
    text = studio.project(project).expert_instruction
    assert text.count("the answers given so far") == 2 and "guess from the shape" not in text
    candidates = spread.score[~np.isin(arrays.index, list(asked)) & attended]
    assert spread.score[arrays.row_of(shown["core"][0])] == candidates.max() >= 0.75
    assert spread.score[arrays.row_of(shown["spurious"][0])] == candidates.min() <= 0.25
    pictures = {p.name for p in (sampled_run / "overlays" / "examples").iterdir()}
    assert sorted(name.split("-")[1] for name in pictures) == ["core", "spurious"]  # earlier ones removed
    # uploaded: the pictures not uploaded before (an image still an example keeps its file), nothing else
    assert set(studio.uploaded_files(media)) - set(files) == pictures - set(files) != set()


def test_instructions_someone_wrote_are_kept(sampled_run: Path, settings: Settings) -> None:
    run = Run(sampled_run)
    project = push_run(run, settings, progress=False)["project_id"]
    studio = Studio(settings)
    studio.client.projects.update(id=project, expert_instruction="<p>Our team's own rules.</p>")
    assert not push_run(run, settings, progress=False)["instructions_updated"]
    assert studio.project(project).expert_instruction == "<p>Our team's own rules.</p>"


def test_local_files_examples_are_served_and_no_companion_project(sampled_run: Path, settings: Settings,
                                                                  tmp_path_factory) -> None:
    run = Run(sampled_run)
    summary = push_run(run, settings, storage="local-files", document_root=tmp_path_factory.getbasetemp(),
                       progress=False)
    studio = Studio(settings)
    shown = examples_shown(studio, summary["project_id"])
    assert set(shown) == {"core", "spurious"}
    assert all(url.startswith("/data/local-files/?d=") for _, url in shown.values())
    with closing(sqlite3.connect(run.labels_path)) as db, db:
        assert db.execute("SELECT COUNT(*) FROM meta WHERE key LIKE 'media_project_for_%'").fetchone() == (0,)
    title = studio.project(summary["project_id"]).title
    assert not studio.projects_named(*media_identity(title, summary["project_id"]))


def test_companion_project_says_what_it_is_and_is_found_under_its_former_name(sampled_run: Path,
                                                                              settings: Settings) -> None:
    """Named for what it is; one an earlier version named is renamed when remembered, and found by that name
    (then renamed) when a killed push did not remember it -- never a second companion, never a second upload."""
    run = Run(sampled_run)
    project = push_run(run, settings, progress=False)["project_id"]
    studio = Studio(settings)
    store = AnnotationStore(run.labels_path)
    media = int(store.get_meta(f"media_project_for_{project}"))
    title = studio.project(project).title
    companion = studio.project(media)
    assert (companion.title, companion.description) == media_identity(title, project)
    assert companion.title.endswith("pictures, do not annotate") and len(companion.title) <= 50
    assert f"annotate in project {project}, not here" in companion.description
    files = studio.uploaded_files(media)
    projects = len(list(studio.client.projects.list()))

    def as_an_earlier_version_left_it(remembered: bool) -> None:
        old_title, old_description = former_media_identity(title, project)
        studio.client.projects.update(id=media, title=old_title, description=old_description)
        if not remembered:  # killed before recording the companion and a picture: the next push must find both
            with store.transaction() as db:
                db.execute("DELETE FROM meta WHERE key = ?", (f"media_project_for_{project}",))
                db.execute("DELETE FROM uploads WHERE local_name LIKE 'example-core-%'")

    for remembered in (True, False):
        as_an_earlier_version_left_it(remembered)
        push_run(run, settings, progress=False)
        companion = studio.project(media)
        assert (companion.title, companion.description) == media_identity(title, project)
        assert store.get_meta(f"media_project_for_{project}") == str(media)
        assert studio.uploaded_files(media) == files  # the picture was found again, not uploaded twice
    assert len(list(studio.client.projects.list())) == projects
    store.close()
