"""Shared fixtures: a tiny synthetic dataset and a run trained on it, built once per test session."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.core.synth import SynthSpec, generate

TINY = SynthSpec(n_train=160, n_val=40, n_test=40, image_size=32, seed=3)
# Label Studio's first start (migrations) takes ~30 s alone on 2 cores, and over 180 s on a runner busy with other
# jobs: a generous limit keeps a slow machine from failing every Label Studio test at once
LABEL_STUDIO_START_S = 360.0
SQLITE_DATABASE = "label_studio.sqlite3"  # where Label Studio keeps its SQLite database, in its data folder
MIGRATED = "label-studio-migrated.sqlite3"  # the session server's database just after its migrations


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "tiny", TINY, progress=False)


@pytest.fixture(scope="session")
def trained_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with a trained model and its attention stage (PCA embedding keeps the session fast; fp32 makes
    the attention identical on every machine, whatever its bf16 support)."""
    run = tmp_path_factory.mktemp("runs") / "a"
    assert main(["train", "--data", str(tiny_data), "--run", str(run), "--epochs", "2", "--quiet"]) == 0
    assert main(["embed", "--run", str(run), "--embedding", "pca", "--precision", "fp32", "--quiet"]) == 0
    return run


@pytest.fixture()
def answered_run(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run, answered from a CSV: every third image spurious, the rest core."""
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    arrays = np.load(run / "attention.npz")
    (run / "answers.csv").write_text("image_id,label\n" + "".join(
        f"{i},{'spurious' if k % 3 == 0 else 'core'}\n" for k, i in enumerate(arrays["index"][::8])))
    assert main(["propagate", "--run", str(run), "--labels", str(run / "answers.csv"), "--quiet"]) == 0
    return run


def record_answers(run: Path, answers: list[tuple[int, str, bool]]) -> None:
    """``(image id, verdict, boxed)`` answers in the run's database, one annotator; a boxed one carries a box
    around the object (its mask's bounding box), as an annotator draws it."""
    from pipeline.core.data import load_dataset, load_mask
    from pipeline.core.run import Run
    from pipeline.core.store import Annotation, AnnotationStore
    from pipeline.labelstudio.annotator import mask_box

    image_set = load_dataset(Run(run).load_config().data.root)
    store = AnnotationStore(run / "labels.sqlite")
    try:
        for number, (image_id, verdict, boxed) in enumerate(answers, start=1):
            sample = image_set.samples[image_id]
            mask = load_mask(image_set.root / sample.mask_filename, image_set.native_size)
            store.upsert_annotation(Annotation(number, number, image_id, "a@example.org", verdict,
                                               boxes=[mask_box(mask)] if boxed else []))
    finally:
        store.close()


def box_answered_objects(run: Path) -> None:
    """The answers of ``answers.csv`` recorded with a box around each object: the tiny model's attention
    rarely covers enough of an object to cut it out."""
    rows = (line.split(",") for line in (run / "answers.csv").read_text().splitlines()[1:])
    record_answers(run, [(int(image_id), verdict, True) for image_id, verdict in rows])


@pytest.fixture()
def generated(answered_run: Path, capsys) -> Path:
    """The answered run, its answered objects boxed, with its counterfactuals made by the CLI stage."""
    box_answered_objects(answered_run)
    assert main(["counterfactuals", "--run", str(answered_run), "--quiet"]) == 0
    assert "counterfactuals: " in capsys.readouterr().out
    return answered_run


@pytest.fixture(scope="session")
def labelstudio(tmp_path_factory: pytest.TempPathFactory):
    """A real Label Studio (SQLite, 127.0.0.1) for the whole session; local files served below the temp root."""
    from pipeline.labelstudio.server import LocalLabelStudio, free_port

    # any free port, not 8080: a developer's own Label Studio (or a parallel session's) may hold that one
    server = LocalLabelStudio(tmp_path_factory.mktemp("label-studio"), port=free_port(0),
                              files_root=tmp_path_factory.getbasetemp())
    credentials = server.start(timeout=LABEL_STUDIO_START_S)
    with closing(sqlite3.connect(server.data_dir / SQLITE_DATABASE)) as live, \
            closing(sqlite3.connect(tmp_path_factory.getbasetemp() / MIGRATED)) as snapshot:
        live.backup(snapshot)  # consistent while the server runs; before any test wrote to it
    yield credentials
    server.stop()


@pytest.fixture(scope="session")
def label_studio_folder(labelstudio, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Makes a data folder for another Label Studio, holding the session server's freshly migrated database.

    Label Studio's ~300 migrations take 40-80 s on 2 cores, and the tests start five more servers (a killable
    one, the command's own under three signals): on a migrated database a server answers in ~8 s. The copy has
    no project, only the same admin and token every local server is started with.
    """
    def make(name: str) -> Path:
        folder = tmp_path_factory.mktemp(name)
        shutil.copyfile(tmp_path_factory.getbasetemp() / MIGRATED, folder / SQLITE_DATABASE)
        return folder

    return make


@pytest.fixture()
def settings(labelstudio):
    from pipeline.labelstudio.client import Settings

    return Settings(labelstudio.url, labelstudio.token)


@pytest.fixture()
def sampled_run(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run with 4 images per class selected."""
    import shutil

    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    assert main(["sample", "--run", str(run), "--per-class", "4", "--quiet"]) == 0
    return run
