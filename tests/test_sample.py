"""Choosing images to annotate: budgets, cluster coverage, overlays, rounds, reuse."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.core.config import SampleConfig
from pipeline.slim import clustering
from pipeline.slim.clustering import nearest_unchosen, pick_near_centroids
from pipeline.slim.sample import class_budget


@pytest.fixture()
def run(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run, so each test starts with no selection."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def read_selection(run: Path, round_: int = 1) -> list[dict[str, str]]:
    with (run / f"selection_round{round_}.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_per_class_budget_unique_images_and_overlays(run: Path) -> None:
    assert main(["sample", "--run", str(run), "--per-class", "5", "--quiet"]) == 0
    rows = read_selection(run)
    assert len(rows) == 10
    assert sorted(r["class_name"] for r in rows) == ["disc"] * 5 + ["triangle"] * 5
    assert len({r["image_id"] for r in rows}) == 10
    arrays = dict(np.load(run / "attention.npz"))
    label_of = dict(zip(arrays["index"].tolist(), arrays["y"].tolist()))
    for r in rows:
        assert label_of[int(r["image_id"])] == int(r["y"])
        with Image.open(run / r["overlay"]) as overlay:
            width, height = overlay.size
        assert width > 3 * 224 and height > 224  # three enlarged panels side by side


def test_fraction_budget(run: Path) -> None:
    assert main(["sample", "--run", str(run), "--fraction", "0.1", "--quiet"]) == 0
    rows = read_selection(run)
    arrays = dict(np.load(run / "attention.npz"))
    expected = sum(int(np.ceil(0.1 * (arrays["y"] == y).sum())) for y in (0, 1))
    assert len(rows) == expected


def test_second_round_never_repeats_the_first(run: Path) -> None:
    assert main(["sample", "--run", str(run), "--per-class", "4", "--quiet"]) == 0
    assert main(["sample", "--run", str(run), "--per-class", "4", "--round", "2", "--quiet"]) == 0
    first = {r["image_id"] for r in read_selection(run, 1)}
    second = {r["image_id"] for r in read_selection(run, 2)}
    assert len(second) == 8 and not first & second
    assert (run / "overlays" / "round2").is_dir()


def test_sample_again_reuses_the_selection(run: Path, capsys) -> None:
    assert main(["sample", "--run", str(run), "--per-class", "3", "--quiet"]) == 0
    stamp = (run / "selection_round1.csv").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--quiet"]) == 0  # the run remembers --per-class 3
    assert "reusing" in capsys.readouterr().out
    assert (run / "selection_round1.csv").stat().st_mtime_ns == stamp


def test_bad_budget_is_refused_without_touching_the_run(run: Path, capsys) -> None:
    config_before = (run / "config.json").read_text()
    assert main(["sample", "--run", str(run), "--per-class", "0", "--quiet"]) == 2
    assert "--per-class must be at least 1" in capsys.readouterr().err
    assert (run / "config.json").read_text() == config_before
    assert not (run / "selection_round1.csv").exists()


def test_centroid_picks_cover_every_cluster() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], float)
    points = np.vstack([c + rng.normal(0, 0.3, (30, 2)) for c in centres])
    picks = pick_near_centroids(points, 3, seed=0)
    assert sorted(row // 30 for row, _, _ in picks) == [0, 1, 2]
    assert all(distance < 1.0 for _, _, distance in picks)


def test_large_classes_pick_by_mini_batch_k_means_without_a_dense_distance_matrix(monkeypatch) -> None:
    """Above EXACT_KMEANS_LIMIT: one distinct pick per centroid, each the nearest point, as the exact search."""
    rng = np.random.default_rng(1)
    centres = rng.uniform(0, 100, (40, 3))
    points = np.vstack([c + rng.normal(0, 0.3, (50, 3)) for c in centres])
    monkeypatch.setattr(clustering, "EXACT_KMEANS_LIMIT", 100)
    monkeypatch.setattr(clustering, "NEAREST_CANDIDATES", 2)  # forces the fallback search for crowded centres
    picks = pick_near_centroids(points, 40, seed=0)
    rows = [row for row, _, _ in picks]
    assert len(set(rows)) == 40 and sorted(row // 50 for row in rows) == list(range(40))  # every blob once
    assert all(distance < 1.0 for _, _, distance in picks)
    crowded = nearest_unchosen(points, np.repeat(points[:1], 5, axis=0))  # five centres on one point
    assert len({row for row, _, _ in crowded}) == 5 and crowded[0][0] == 0


def test_class_budget_rules() -> None:
    assert class_budget(1000, SampleConfig(fraction=0.02)) == 20
    assert class_budget(10, SampleConfig(fraction=0.02)) == 1
    assert class_budget(5, SampleConfig(per_class=20)) == 5


def test_later_round_asks_the_contested_images_again_first(run: Path) -> None:
    """Round 2 re-asks the images two annotators disagreed on (or one could not decide) before any new image,
    within the class budget, recording who answered them; an image everyone on the team answered, or one they
    agreed on, is not asked again; --contested-below 0 turns it off."""
    from pipeline.core.store import Annotation, AnnotationStore

    assert main(["sample", "--run", str(run), "--per-class", "4", "--quiet"]) == 0
    first = read_selection(run, 1)
    discs = [int(r["image_id"]) for r in first if r["class_name"] == "disc"]
    triangles = [int(r["image_id"]) for r in first if r["class_name"] == "triangle"]
    answers = {discs[0]: {"a": "core", "b": "spurious"},  # disagreement: asked again
               discs[1]: {"a": "unsure"},  # nobody could tell, and b has not seen it: asked again
               discs[2]: {"a": "unsure", "b": "unsure", "c": "core"},  # the whole team answered: nobody to ask
               triangles[0]: {"a": "spurious", "b": "core"},  # c has not seen it: asked of c
               **{image_id: {"a": "core", "b": "core"} for image_id in (discs[3], *triangles[1:])}}
    store = AnnotationStore(run / "labels.sqlite")
    number = 0
    for task, (image_id, given) in enumerate(answers.items()):
        for annotator, choice in given.items():
            number += 1
            store.upsert_annotation(Annotation(number, task + 1, image_id, annotator, choice))
    store.close()

    assert main(["sample", "--run", str(run), "--per-class", "4", "--round", "2", "--quiet"]) == 0
    second = read_selection(run, 2)
    again = [r for r in second if r["reask"] == "1"]
    assert second[:len(again)] == again  # contested images first
    assert {int(r["image_id"]): r["answered_by"] for r in again} == {discs[0]: "a;b", discs[1]: "a",
                                                                       triangles[0]: "a;b"}
    assert all(r["cluster"] == "-1" for r in again)
    assert sorted(r["class_name"] for r in second) == ["disc"] * 4 + ["triangle"] * 4  # within the budget
    new = {int(r["image_id"]) for r in second if r["reask"] == "0"}
    assert len(new) == 5 and not new & set(discs + triangles)

    assert main(["sample", "--run", str(run), "--per-class", "4", "--round", "2", "--contested-below", "0",
                 "--quiet"]) == 0
    assert all(r["reask"] == "0" for r in read_selection(run, 2))
    assert main(["sample", "--run", str(run), "--round", "2", "--contested-below", "1.5", "--quiet"]) == 2
