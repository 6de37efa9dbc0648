"""Closing the loop: propagate answers, curate, retrain, report, and ask again where least certain."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.data import TEST, TRAIN, load_dataset, load_mask
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.store import Annotation, AnnotationStore
from pipeline.core.verdicts import CORE, SPURIOUS
from pipeline.labelstudio.annotator import decide
from pipeline.model.loaders import ImageDataset, make_loader
from pipeline.model.networks import load_checkpoint
from pipeline.slim import propagate as propagate_module
from pipeline.slim.clustering import elbow_k
from pipeline.slim.curate import allocate
from pipeline.slim.propagate import Propagation, answers_from_csv, consolidate, kernel_gamma, spread_class
from pipeline.slim.weights import (
    ATTENDED,
    IGNORED,
    MIN_ERRORS_TO_CHECK,
    cell_balanced_weights,
    spurious_space_cells,
)


def mask_rule_answers(run: Path, per_class: int = 6) -> Path:
    """A labels CSV answering ``per_class`` images of each class by the mask rule (as a careful annotator)."""
    config = Run(run).load_config()
    image_set = load_dataset(config.data.root)
    arrays = dict(np.load(run / "attention.npz"))
    lines = ["image_id,label"]
    for y in np.unique(arrays["y"]):
        for row in np.flatnonzero(arrays["y"] == y)[:per_class]:
            image_id = int(arrays["index"][row])
            mask = load_mask(image_set.root / image_set.samples[image_id].mask_filename, 32)
            lines.append(f"{image_id},{decide(arrays['cam'][row], mask, 0.8)[0]}")
    path = run / "answers.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def run(trained_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def test_consolidate_majority_ties_unsure_and_skips() -> None:
    def a(i: int, image: int, choice: str | None, skipped: bool = False) -> Annotation:
        return Annotation(i, image, image, "x", choice, skipped)

    answers = consolidate([a(1, 10, "core"), a(2, 10, "core"), a(3, 10, "spurious"),  # majority core
                           a(4, 11, "core"), a(5, 11, "spurious"),  # tie: no verdict
                           a(6, 12, "unsure"),  # unsure: no evidence
                           a(7, 13, "unsure"), a(8, 13, "spurious"),  # unsure does not vote
                           a(9, 14, None, skipped=True)], method="majority")
    assert answers.labels == {10: CORE, 13: SPURIOUS}
    assert answers.counts == Counter({"multi_annotated": 3, "unsure_or_tied": 2, "core": 1, "spurious": 1,
                                      "skipped": 1})


def test_spreading_two_answers_follows_the_clusters() -> None:
    rng = np.random.default_rng(0)
    points = np.vstack([rng.normal(0, 0.2, (30, 4)), rng.normal(3, 0.2, (30, 4))])
    scores, certainty = spread_class(points, {0: CORE, 30: SPURIOUS})
    assert scores[:30].min() > 0.6 and scores[30:].max() < 0.4
    assert ((0 <= certainty) & (certainty <= 1)).all()


def test_large_classes_spread_on_a_sparse_neighbour_graph_with_the_dense_verdicts(monkeypatch) -> None:
    """Above DENSE_SPREAD_LIMIT the RBF graph keeps each image's nearest neighbours only: the same verdicts as the
    dense graph on clustered data, from a matrix that grows linearly with the class."""
    rng = np.random.default_rng(3)
    points = np.vstack([rng.normal(c, 1.0, (300, 8)) for c in (0.0, 4.0, 8.0)])
    labelled = {0: CORE, 1: CORE, 300: SPURIOUS, 301: SPURIOUS, 600: CORE, 601: CORE}
    dense, _ = spread_class(points, labelled)
    monkeypatch.setattr(propagate_module, "DENSE_SPREAD_LIMIT", 100)
    knn, certainty = spread_class(points, labelled)
    assert ((dense >= 0.5) == (knn >= 0.5)).mean() > 0.97
    assert (knn[300:600] < 0.5).all() and (knn[:300] > 0.5).all() and ((0 <= certainty) & (certainty <= 1)).all()
    graph = propagate_module.sparse_rbf_affinity(points, kernel_gamma(points))
    assert graph.nnz <= 2 * propagate_module.SPREAD_NEIGHBOURS * len(points) and (graph != graph.T).nnz == 0
    monkeypatch.setattr(propagate_module, "APPROXIMATE_NEIGHBOURS_ABOVE", 100)  # pynndescent's neighbours
    approximate, _ = spread_class(points, labelled)
    assert ((approximate >= 0.5) == (knn >= 0.5)).mean() > 0.97


def test_large_classes_spread_on_axes_fitted_on_a_sample_with_the_exact_verdicts(monkeypatch) -> None:
    """Above EXACT_PCA_LIMIT the kernel's axes are fitted on a sample of the class and the class is projected chunk by
    chunk (no centred copy of it): the verdicts agree with those on the exact PCA."""
    from pipeline.slim import clustering

    rng = np.random.default_rng(5)
    centres = rng.normal(0.0, 3.0, (3, 64))
    representation = np.vstack([rng.normal(c, 1.0, (1000, 64)) for c in centres]).astype(np.float32)
    labelled = {0: CORE, 1: CORE, 1000: SPURIOUS, 1001: SPURIOUS, 2000: CORE, 2001: CORE}
    exact, _ = spread_class(propagate_module.kernel_space(representation), labelled)
    monkeypatch.setattr(propagate_module, "EXACT_PCA_LIMIT", 0)
    monkeypatch.setattr(clustering, "PROJECTION_FIT_ROWS", 500)  # a sixth of the class
    monkeypatch.setattr(clustering, "PROJECTION_CHUNK", 700)  # several chunks, the last one short
    points = propagate_module.kernel_space(representation)
    assert points.shape == (3000, propagate_module.MAX_DIMS)
    sampled, _ = spread_class(points, labelled)
    assert ((exact >= 0.5) == (sampled >= 0.5)).mean() > 0.98
    assert np.corrcoef(exact, sampled)[0, 1] > 0.95


def test_spreading_one_kind_of_answer_keeps_a_ranking() -> None:
    rng = np.random.default_rng(1)
    points = np.vstack([rng.normal(0, 0.2, (30, 4)), rng.normal(3, 0.2, (30, 4))])
    scores, _ = spread_class(points, {0: SPURIOUS, 1: SPURIOUS})
    assert scores[:30].mean() < 0.2  # like the answered ones: spurious
    assert scores[30:].mean() > scores[:30].mean() + 0.2  # unlike them: closer to undecided
    assert ((0 <= scores) & (scores <= 0.5)).all()
    none, certainty = spread_class(points, {})
    assert (none == 0.5).all() and (certainty == 0).all()


def test_elbow_finds_three_blobs_and_allocation_respects_budget() -> None:
    rng = np.random.default_rng(2)
    points = np.vstack([c + rng.normal(0, 0.1, (40, 2)) for c in ([0, 0], [5, 0], [0, 5])])
    assert elbow_k(points, seed=0) == 3
    allocation = allocate(10, np.array([3.0, 1.0, 1.0]), np.array([100, 100, 2]))
    assert allocation.sum() == 10 and allocation[2] <= 2 and allocation[0] > allocation[1]
    assert allocate(50, np.array([1.0, 1.0]), np.array([3, 4])).tolist() == [3, 4]


def test_shortcut_cells_follow_the_answers_and_weights_balance_them() -> None:
    """Attention called core -> cells of what the model ignores; called spurious -> of what it attends to."""
    rng = np.random.default_rng(0)

    def blobs(centres: list[list[float]], n: int) -> np.ndarray:
        return np.vstack([np.array(c) + rng.normal(0, 0.1, (n, 2)) for c in centres])

    three, two = blobs([[0, 0], [5, 0], [0, 5]], 40), blobs([[0, 0], [6, 6]], 60)
    n = 120
    arrays = AttentionArrays(index=np.arange(n), y=np.zeros(n, dtype=int), pred=np.zeros(n, dtype=int),
                             confidence=np.ones(n), entropy=np.zeros(n), features=three + two, f_att=three,
                             f_rev=two, cam=np.zeros((n, 2, 2), dtype=np.float16), class_names=("0",))
    core = spurious_space_cells(arrays, np.ones(120), seed=0)
    spurious = spurious_space_cells(arrays, np.zeros(120), seed=0)
    assert len(np.unique(core.cells)) == 2 and len(np.unique(spurious.cells)) == 3
    assert core.spaces["0"].chosen == IGNORED and spurious.spaces["0"].chosen == ATTENDED  # no errors: answers rule
    labels = np.array([0] * 90 + [1] * 30)
    cells = np.array([0] * 80 + [1] * 10 + [2] * 30)  # class 0: a big and a rare cell; class 1: one cell
    weights = cell_balanced_weights(labels, cells)
    assert np.bincount(labels, weights=weights) == pytest.approx([1.0, 1.0])
    assert weights[cells == 0].sum() == pytest.approx(weights[cells == 1].sum()) == pytest.approx(0.5)


def test_training_errors_overrule_the_answers_space_only_when_it_hides_them() -> None:
    """Mixed attention: the answers point at the attended space, which splits the class by the object's style;
    the reference model's errors all sit in a rare group that only the ignored space gives a cell of its own."""
    rng = np.random.default_rng(0)
    n = 200
    style = np.repeat([[0.0, 0.0], [6.0, 0.0]], n // 2, axis=0)  # two styles, half each, unrelated to the errors
    background = np.zeros((n, 2))
    rare = rng.choice(n, 12, replace=False)
    background[rare] = [0.0, 6.0]  # the minority group: another background

    def arrays_with(errors: np.ndarray) -> AttentionArrays:
        pred = np.where(errors, 1, 0)
        return AttentionArrays(index=np.arange(n), y=np.zeros(n, dtype=int), pred=pred, confidence=np.ones(n),
                               entropy=np.zeros(n), features=np.hstack([style, background]),
                               f_att=style + rng.normal(0, 0.1, (n, 2)), f_rev=background + rng.normal(0, 0.1, (n, 2)),
                               cam=np.zeros((n, 2, 2), dtype=np.float16), class_names=("0", "1"))

    in_rare = np.isin(np.arange(n), rare)
    mixed = spurious_space_cells(arrays_with(in_rare), np.zeros(n), seed=0)
    space = mixed.spaces["0"]
    assert (space.answered, space.chosen) == (ATTENDED, IGNORED)
    assert space.error_lift[IGNORED] > 5 and space.error_lift[ATTENDED] < 1.5
    assert len(set(mixed.cells[rare])) == 1 and not np.isin(mixed.cells[~in_rare], mixed.cells[rare]).any()

    few = spurious_space_cells(arrays_with(np.isin(np.arange(n), rare[:MIN_ERRORS_TO_CHECK - 1])), np.zeros(n), 0)
    assert few.spaces["0"].chosen == ATTENDED  # too few errors to judge: the answers decide


def test_curate_from_csv_answers(run: Path) -> None:
    labels = mask_rule_answers(run)
    assert main(["curate", "--run", str(run), "--labels", str(labels), "--subset-size", "40", "--quiet"]) == 0
    with (run / "curated.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 40 and len({r["image_id"] for r in rows}) == 40
    assert Counter(r["class_name"] for r in rows) == {"disc": 20, "triangle": 20}
    arrays = dict(np.load(run / "attention.npz"))
    assert {int(r["image_id"]) for r in rows} <= set(arrays["index"].tolist())
    propagation = dict(np.load(run / "propagation.npz"))
    assert propagation["answered"].sum() == 12
    assert ((propagation["score"] >= 0) & (propagation["score"] <= 1)).all()
    composition = json.loads((run / "metrics.json").read_text())["curation"]
    assert composition["size"] == 40 and sum(composition["by_group"].values()) == 40


def test_published_variant_keeps_the_better_attended_half(run: Path) -> None:
    labels = mask_rule_answers(run)
    assert main(["curate", "--run", str(run), "--labels", str(labels), "--subset-size", "40", "--variant",
                 "published", "--quiet"]) == 0
    with (run / "curated.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    arrays, propagation = dict(np.load(run / "attention.npz")), dict(np.load(run / "propagation.npz"))
    score_of = dict(zip(propagation["index"].tolist(), propagation["score"].tolist()))
    for y in (0, 1):
        members = propagation["score"][arrays["y"] == y]
        assert all(score_of[int(r["image_id"])] >= np.median(members) - 1e-9 for r in rows if int(r["y"]) == y)
    assert len(rows) == 40


def test_curate_uses_pulled_answers_from_the_run_database(run: Path) -> None:
    arrays = dict(np.load(run / "attention.npz"))
    store = AnnotationStore(run / "labels.sqlite")
    for n, row in enumerate(range(0, 40, 5)):
        store.upsert_annotation(Annotation(n + 1, n + 1, int(arrays["index"][row]), "ann@x", "spurious" if n % 2 else "core"))
    store.close()
    assert main(["curate", "--run", str(run), "--subset-size", "20", "--quiet"]) == 0
    assert dict(np.load(run / "propagation.npz"))["answered"].sum() == 8


@pytest.mark.parametrize("content, message", [
    ("id,answer\n1,core\n", "needs columns image_id,label"),
    ("image_id,label\n1,maybe\n", "label must be core, spurious or unsure"),
    ("image_id,label\nx,core\n", "image_id must be an integer"),
])
def test_bad_labels_csv_is_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(content)
    with pytest.raises(PipelineError, match=message):
        answers_from_csv(path)


def test_answers_for_unknown_images_and_no_answers_are_refused(run: Path, capsys) -> None:
    (run / "bad.csv").write_text("image_id,label\n999999,core\n")
    assert main(["curate", "--run", str(run), "--labels", str(run / "bad.csv"), "--quiet"]) == 2
    assert "not training images of this run" in capsys.readouterr().err
    (run / "unsure.csv").write_text("image_id,label\n0,unsure\n")
    assert main(["curate", "--run", str(run), "--labels", str(run / "unsure.csv"), "--quiet"]) == 2
    assert "no usable answer" in capsys.readouterr().err


def test_last_layer_retrain_is_the_logistic_regression(run: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    labels = mask_rule_answers(run)
    assert main(["curate", "--run", str(run), "--labels", str(labels), "--subset-size", "40", "--quiet"]) == 0
    assert main(["retrain", "--run", str(run), "--mode", "last-layer", "--quiet"]) == 0
    model, meta = load_checkpoint(run / "slim_model.pt")
    assert meta["mode"] == "last-layer" and meta["C"] in (0.01, 0.1, 1.0, 10.0, 100.0)
    arrays = dict(np.load(run / "attention.npz"))
    with (run / "curated.csv").open() as handle:
        ids = [int(r["image_id"]) for r in csv.DictReader(handle)]
    row_of = {int(i): r for r, i in enumerate(arrays["index"])}
    features, y = arrays["features"][[row_of[i] for i in ids]], arrays["y"][[row_of[i] for i in ids]]
    scaler = StandardScaler().fit(features)
    reference = LogisticRegression(C=meta["C"], class_weight="balanced", max_iter=5000).fit(scaler.transform(features), y)
    everything = arrays["features"]
    with torch.no_grad():
        ours = model.head(torch.from_numpy(everything)).argmax(1).numpy()
    assert (ours == reference.predict(scaler.transform(everything))).mean() > 0.99
    erm, _ = load_checkpoint(run / "model.pt")
    assert torch.equal(model.backbone[0][0].weight, erm.backbone[0][0].weight)  # frozen features
    slim = json.loads((run / "metrics.json").read_text())["slim"]
    assert slim["mode"] == "last-layer" and {"worst_group_acc", "mean_acc", "per_group", "val"} <= set(slim)


def test_full_retrain_and_report(run: Path) -> None:
    labels = mask_rule_answers(run)
    assert main(["curate", "--run", str(run), "--labels", str(labels), "--subset-size", "40", "--quiet"]) == 0
    assert main(["retrain", "--run", str(run), "--mode", "full", "--epochs", "1", "--quiet"]) == 0
    erm, _ = load_checkpoint(run / "model.pt")
    slim, meta = load_checkpoint(run / "slim_model.pt")
    assert meta["mode"] == "full" and not torch.equal(slim.backbone[0][0].weight, erm.backbone[0][0].weight)
    trained = json.loads((run / "metrics.json").read_text())["erm"]
    assert main(["report", "--run", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("erm", "slim"):
        assert {"worst_group_acc", "mean_acc", "per_group", "aiou", "core_acc", "val"} <= set(metrics[name])
    assert metrics["erm"]["per_group"] == trained["per_group"]  # the report re-evaluates the same model alike
    assert metrics["annotated"] == 12 and metrics["annotated_fraction"] == pytest.approx(12 / 160)
    assert set(metrics["spuriosity"]["erm"]) == {"disc", "triangle"}
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4  # bars, attention maps, two overlay grids
    assert not re.search(r'src="(https?:)?//', page)  # self-contained
    assert "ERM" in page and "SLIM" in page and "full" in page


def test_full_retrain_draws_images_by_the_given_weights(run: Path) -> None:
    """Default draws are class-balanced; explicit weights (JTT, all-images oracle) replace them."""
    from pipeline.model.loaders import seed_everything
    from pipeline.slim.retrain import retrain_full

    config = Run(run).load_config()
    config.retrain.epochs = 1
    model, meta = load_checkpoint(run / "model.pt")
    image_set = load_dataset(config.data.root)
    ids = [s.index for s in image_set.split(TRAIN)][:64]
    labels = np.array([image_set.samples[i].y for i in ids])

    def retrained(weights):
        seed_everything(0)
        fitted = retrain_full(model, config, image_set, ids, torch.device("cpu"), meta["image_size"], False,
                              sample_weight=weights)[0]
        return torch.cat([p.detach().flatten() for p in fitted.parameters()])

    balanced = retrained(None)
    assert torch.equal(balanced, retrained(1.0 / np.bincount(labels)[labels]))
    assert not torch.equal(balanced, retrained((labels == 0).astype(float)))


def test_fresh_retrain_trains_a_new_model_on_every_image(run: Path, monkeypatch) -> None:
    """A new network, drawn from all training images so each class and each shortcut cell count the same."""
    import pipeline.slim.retrain as retrain_module

    loaders = []

    def recording_make_loader(*args, **kwargs):  # the real loader; the test only keeps what retrain asked for
        loaders.append((args[1], kwargs["sampler"]))
        return make_loader(*args, **kwargs)

    monkeypatch.setattr(retrain_module, "make_loader", recording_make_loader)
    labels = mask_rule_answers(run)
    assert main(["propagate", "--run", str(run), "--labels", str(labels), "--quiet"]) == 0
    assert not (run / "curated.csv").exists()  # fresh needs the propagation only
    assert main(["retrain", "--run", str(run), "--quiet"]) == 0  # fresh is the default
    erm, _ = load_checkpoint(run / "model.pt")
    fresh, meta = load_checkpoint(run / "slim_model.pt")
    assert meta["mode"] == "fresh" and len(meta["train_loss"]) == 2  # the reference's epochs
    assert not torch.equal(fresh.backbone[0][0].weight, erm.backbone[0][0].weight)

    (samples, sampler), = loaders
    arrays = AttentionArrays.load(run / "attention.npz")
    assert [s.index for s in samples] == arrays.index.tolist() and meta["images"] == len(arrays)
    shortcut = spurious_space_cells(arrays, Propagation.load(run / "propagation.npz").score, seed=0)
    cells = shortcut.cells
    weights = sampler.weights.numpy()
    assert meta["cells"] == len(np.unique(cells)) >= 2
    per_class = np.bincount(arrays.y, weights=weights)
    assert per_class == pytest.approx(np.full(2, per_class[0]))  # classes drawn equally often
    for y in arrays.classes:  # and inside a class, every cell as often as every other
        members = arrays.for_class(y)
        per_cell = np.bincount(cells[members], weights=weights[members])
        present = per_cell[per_cell > 0]
        assert present == pytest.approx(np.full(len(present), per_class[y] / len(present)))
    slim = json.loads((run / "metrics.json").read_text())["slim"]
    assert slim["mode"] == "fresh" and slim["images"] == len(arrays)
    assert slim["shortcut_spaces"] == {name: space.as_dict() for name, space in shortcut.spaces.items()}


def test_next_round_asks_where_the_propagation_is_least_certain(run: Path) -> None:
    assert main(["sample", "--run", str(run), "--per-class", "3", "--quiet"]) == 0
    labels = mask_rule_answers(run)
    assert main(["curate", "--run", str(run), "--labels", str(labels), "--subset-size", "20", "--quiet"]) == 0
    assert main(["sample", "--run", str(run), "--round", "2", "--quiet"]) == 0
    with (run / "selection_round1.csv").open() as a, (run / "selection_round2.csv").open() as b:
        first, second = {int(r["image_id"]) for r in csv.DictReader(a)}, [int(r["image_id"]) for r in csv.DictReader(b)]
    assert len(second) == 6 and not first & set(second)
    propagation = dict(np.load(run / "propagation.npz"))
    certainty = dict(zip(propagation["index"].tolist(), propagation["certainty"].tolist()))
    assert np.mean([certainty[i] for i in second]) < np.mean(list(certainty.values()))


def test_core_only_images_keep_the_object_and_replace_the_rest(tiny_data: Path) -> None:
    image_set = load_dataset(tiny_data)
    sample = image_set.split(TEST)[0]
    plain = ImageDataset(image_set, [sample], 32, with_masks=True)[0]
    core = ImageDataset(image_set, [sample], 32, core_only=True)[0]
    mask = plain[3]
    assert torch.equal(core[0][:, mask], plain[0][:, mask])
    assert not torch.allclose(core[0][:, ~mask], plain[0][:, ~mask])
    assert torch.equal(core[0], ImageDataset(image_set, [sample], 32, core_only=True)[0][0])  # fixed noise
