"""The other works' remedies as retraining modes: CoRM (corrupt the likely-spurious region while training) and
low-spuriosity (refit the head on each class's least spurious images)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.config import RETRAIN_MODES
from pipeline.core.data import TRAIN, load_dataset
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.store import Annotation, AnnotationStore
from pipeline.model.loaders import Corruption, ImageDataset, make_loader
from pipeline.model.networks import load_checkpoint
from pipeline.slim import retrain as retrain_module
from pipeline.slim.propagate import Propagation
from pipeline.slim.regions import box_mask, spurious_region
from pipeline.slim.retrain import least_spurious_rows, retrain_last_layer, worst_class_accuracy
from pipeline.slim.spuriosity import spuriosity

SIZE = 32  # the tiny fixture's image side
BOX = {"x": 25.0, "y": 25.0, "width": 50.0, "height": 50.0}  # the middle of the image, in percent


@pytest.fixture()
def run(answered_run: Path) -> Path:
    return answered_run


def retrain(run: Path, mode: str, *extra: str) -> int:
    """``retrain --mode MODE`` alone: without the counterfactuals ``--augment auto`` would add to the fixture
    (tests/test_counterfactual.py covers them with every mode)."""
    return main(["retrain", "--run", str(run), "--mode", mode, "--augment", "none", "--quiet", *extra])


def hot_corner_cam() -> np.ndarray:
    """A 4x4 map whose top-left 2x2 cells are hot: at 8 px its >= half-peak region is the top-left 4x4."""
    cam = np.zeros((4, 4), np.float32)
    cam[:2, :2] = 1.0
    return cam


def quadrant(rows: slice, cols: slice, size: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[rows, cols] = True
    return mask


def test_every_mode_has_a_retraining() -> None:
    assert set(retrain_module.MODES) == set(RETRAIN_MODES)


def test_region_follows_the_verdict_and_a_box_wins_over_the_cam() -> None:
    cam, top_left = hot_corner_cam(), quadrant(slice(0, 4), slice(0, 4))
    assert np.array_equal(spurious_region(cam, 0.9, [], 8), ~top_left)  # looked at the object: the rest is spurious
    assert np.array_equal(spurious_region(cam, 0.1, [], 8), top_left)  # looked at the cue: where it looked
    middle = quadrant(slice(2, 6), slice(2, 6))
    for p_core in (0.1, 0.9):  # a person located the object: outside the box, whatever the attention verdict
        assert np.array_equal(spurious_region(cam, p_core, [BOX], 8), ~middle)
    assert not spurious_region(np.zeros((4, 4), np.float32), 0.9, [], 8).any()  # a flat map localises nothing


def test_boxes_are_percent_rectangles_rotated_about_their_corner() -> None:
    two = [{"x": 0, "y": 0, "width": 50, "height": 50}, {"x": 50, "y": 50, "width": 50, "height": 50}]
    assert np.array_equal(box_mask(two, 8), quadrant(slice(0, 4), slice(0, 4)) | quadrant(slice(4, 8), slice(4, 8)))
    turned = {"x": 50, "y": 0, "width": 50, "height": 50, "rotation": 90}  # swung clockwise onto the top left
    assert np.array_equal(box_mask([turned], 8)[:, :4], quadrant(slice(0, 4), slice(0, 4))[:, :4])


@pytest.mark.parametrize("kind", ["noise", "blur"])
def test_corruption_changes_the_region_only(tiny_data: Path, kind: str) -> None:
    image_set = load_dataset(tiny_data)
    sample = image_set.split(TRAIN)[0]
    left = np.zeros((SIZE, SIZE), bool)
    left[:, : SIZE // 2] = True
    clean = ImageDataset(image_set, [sample], SIZE)[0][0]
    torch.manual_seed(0)
    corrupted = ImageDataset(image_set, [sample], SIZE, corruption=Corruption(lambda i, s: left, kind))[0][0]
    assert torch.equal(corrupted[:, ~left], clean[:, ~left])
    assert (corrupted[:, left] - clean[:, left]).abs().mean() > 0.01
    never = Corruption(lambda i, s: left, kind, probability=0.0)
    assert torch.equal(ImageDataset(image_set, [sample], SIZE, corruption=never)[0][0], clean)
    with pytest.raises(PipelineError, match="corrupt-probability"):
        Corruption(lambda i, s: left, kind, probability=1.5)


def test_corm_trains_a_new_model_corrupting_exactly_the_rule_s_region(run: Path, monkeypatch) -> None:
    arrays = AttentionArrays.load(run / "attention.npz")
    boxed = int(arrays.index[1])
    store = AnnotationStore(run / "labels.sqlite")  # a box drawn in Label Studio, the verdicts from the CSV
    store.upsert_annotation(Annotation(1, 1, boxed, "a@example.org", "core", boxes=[BOX]))
    store.close()
    loaders = []

    def recording_make_loader(*args, **kwargs):  # the real loader; the test keeps what retrain asked for
        loaders.append(kwargs.get("corruption"))
        return make_loader(*args, **kwargs)

    monkeypatch.setattr(retrain_module, "make_loader", recording_make_loader)
    assert retrain(run, "corm", "--corrupt-probability", "1") == 0
    corruption = next(c for c in loaders if c is not None)
    assert corruption.kind == "noise" and corruption.probability == 1.0
    scores = Propagation.load(run / "propagation.npz").score
    for row in range(len(arrays)):
        image_id = int(arrays.index[row])
        expected = spurious_region(arrays.cam[row].astype(np.float32), scores[row],
                                   [BOX] if image_id == boxed else [], SIZE)
        assert np.array_equal(corruption.region(image_id, SIZE), expected), image_id
    assert np.array_equal(corruption.region(boxed, SIZE), ~box_mask([BOX], SIZE))

    erm, _ = load_checkpoint(run / "model.pt")
    corm, meta = load_checkpoint(run / "slim_model.pt")
    assert meta["mode"] == "corm" and len(meta["train_loss"]) == 2 and meta["images"] == len(arrays)
    assert not torch.equal(corm.backbone[0][0].weight, erm.backbone[0][0].weight)
    verdict_spurious = int((scores < 0.5).sum()) - int(scores[1] < 0.5)
    assert meta["regions"] == {"box": 1, "high_cam": verdict_spurious, "low_cam": len(arrays) - 1 - verdict_spurious}
    slim = json.loads((run / "metrics.json").read_text())["slim"]
    assert slim["mode"] == "corm" and 0 <= slim["core_acc"] <= 1 and 0 <= slim["val"]["core_acc"] <= 1


def masks_and_places_removed(data: Path, out: Path) -> Path:
    """A copy of the dataset that has neither masks nor places: what nothing that trains may need."""
    shutil.copytree(data / "images", out / "images")
    shutil.copy(data / "dataset.json", out / "dataset.json")
    with (data / "metadata.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    (out / "metadata.csv").write_text("img_filename,y,split\n" + "".join(
        f"{r['img_filename']},{r['y']},{r['split']}\n" for r in rows))
    return out


def pointed_at(run: Path, data: Path) -> Path:
    config = Run(run).load_config()
    config.data.root = str(data)
    Run(run).save_config(config)
    return run


def test_neither_mode_reads_masks_or_places_to_train_and_the_report_shows_both(run: Path, tiny_data: Path,
                                                                               tmp_path: Path) -> None:
    blind = pointed_at(Path(shutil.copytree(run, tmp_path / "blind")),
                       masks_and_places_removed(tiny_data, tmp_path / "blind-data"))
    for mode in ("low-spuriosity", "corm"):
        assert retrain(run, mode) == 0 and retrain(blind, mode) == 0
        seen, unseen = (torch.load(r / "slim_model.pt", weights_only=True)["model"] for r in (run, blind))
        assert all(torch.equal(seen[k], unseen[k]) for k in seen), mode
        assert main(["report", "--run", str(run), "--quiet"]) == 0  # the checkpoint is an ordinary model

    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["modes"]) == {"low-spuriosity", "corm"}  # each mode's last report, side by side
    for summary in metrics["modes"].values():
        assert {"worst_group_acc", "mean_acc", "core_acc", "aiou"} <= set(summary)
        assert set(summary["bias_gap"]) == {"disc", "triangle"}
    assert metrics["modes"]["corm"]["core_acc"] == metrics["slim"]["core_acc"]
    page = (run / "report.html").read_text()
    assert "Retraining modes" in page and "low-spuriosity" in page and "bias gap triangle" in page


def test_low_spuriosity_keeps_each_class_s_least_spurious_images() -> None:
    labels = np.repeat([0, 1], 10)
    spurious = np.concatenate([np.arange(10)[::-1], np.arange(10)]) / 10  # class 0 least spurious last
    assert least_spurious_rows(labels, spurious, 0.5).tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert least_spurious_rows(labels, spurious, 0.1).tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # >= 5 each
    assert least_spurious_rows(labels, spurious, 0.8).tolist() == [*range(2, 10), *range(10, 18)]
    assert least_spurious_rows(labels[:13], spurious[:13], 0.1).tolist() == [5, 6, 7, 8, 9, 10, 11, 12]  # all it has
    assert worst_class_accuracy(np.array([0, 0, 1, 0]), np.array([0, 0, 1, 1])) == 0.5


def test_spuriosity_is_typicality_where_the_verdict_places_the_shortcut() -> None:
    """Class 0 (attention judged core): the cue is in what the model ignores; class 1 (spurious): in what it
    attends to. The image unlike its class there is the least spurious; the other space does not matter."""
    usual, unusual = [1.0, 0.0], [0.0, 1.0]
    f_att = np.array([usual, usual, usual, usual, unusual, usual])  # class 1's odd one out: row 4
    f_rev = np.array([usual, unusual, usual, unusual, unusual, unusual])  # class 0's: row 1
    n = len(f_att)
    arrays = AttentionArrays(index=np.arange(n), y=np.array([0, 0, 0, 1, 1, 1]), pred=np.zeros(n, int),
                             confidence=np.ones(n), entropy=np.zeros(n), features=np.zeros((n, 2)), f_att=f_att,
                             f_rev=f_rev, cam=np.zeros((n, 2, 2), np.float16), class_names=("a", "b"))
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.3])
    spurious = spuriosity(arrays, scores)
    assert np.argmin(spurious[:3]) == 1 and 3 + np.argmin(spurious[3:]) == 4
    assert least_spurious_rows(arrays.y, spurious, 0.1).tolist() == list(range(6))  # <= 5 per class: all of them
    flipped = spuriosity(arrays, 1 - scores)  # the opposite verdicts read the other spaces
    assert 3 + np.argmin(flipped[3:]) != 4


def test_low_spuriosity_chooses_the_share_on_validation_worst_class(run: Path) -> None:
    assert retrain(run, "low-spuriosity") == 0
    model, _ = load_checkpoint(run / "model.pt")
    head_model, meta = load_checkpoint(run / "slim_model.pt")
    val_worst = {float(share): acc for share, acc in meta["val_worst_class"].items()}
    assert set(val_worst) == set(retrain_module.SPURIOSITY_SHARES)
    assert meta["share"] == max(val_worst, key=lambda share: (val_worst[share], share))  # ties: the larger share
    arrays = AttentionArrays.load(run / "attention.npz")
    scores = Propagation.load(run / "propagation.npz").score
    rows = least_spurious_rows(arrays.y, spuriosity(arrays, scores), meta["share"])
    assert meta["images"] == len(rows)
    expected, _ = retrain_last_layer(model, arrays.features[rows], arrays.y[rows], seed=0)
    assert torch.allclose(head_model.head.weight, expected.head.weight)  # the head of exactly those images
    for name, parameter in model.backbone.state_dict().items():  # frozen features
        assert torch.equal(head_model.backbone.state_dict()[name], parameter)
    slim = json.loads((run / "metrics.json").read_text())["slim"]
    assert slim["mode"] == "low-spuriosity" and slim["val_worst_class"] == meta["val_worst_class"]


def test_corm_resumes_to_the_same_model(run: Path, tmp_path: Path, monkeypatch) -> None:
    """The corruption draws from the random states an epoch checkpoint keeps, so a resumed corm is the same."""
    undisturbed = Path(shutil.copytree(run, tmp_path / "undisturbed"))
    assert retrain(undisturbed, "corm") == 0
    original, count = ImageDataset.__getitem__, {"images": 0}

    def interrupted(self, i):
        if count["images"] == 160 + 10:  # into the second epoch
            raise KeyboardInterrupt
        count["images"] += 1
        return original(self, i)

    with monkeypatch.context() as patch:
        patch.setattr(ImageDataset, "__getitem__", interrupted)
        assert retrain(run, "corm") == 130
    assert (run / ".resume" / "retrain.pt").exists()
    assert retrain(run, "corm") == 0
    left, right = (torch.load(r / "slim_model.pt", weights_only=True)["model"] for r in (run, undisturbed))
    assert all(torch.equal(left[k], right[k]) for k in left)
