"""Counterfactual augmentation (ASPIRE-style): each class's core region on the other classes' backgrounds, added
to the training images of every retraining mode."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.cli import main
from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.config import ADDED_CORRUPT_PROBABILITY, CORM_CORRUPT_PROBABILITY, RetrainConfig
from pipeline.core.data import load_dataset, load_rgb
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.model.loaders import make_loader
from pipeline.model.networks import load_checkpoint
from pipeline.slim import counterfactual as counterfactual_module
from pipeline.slim import retrain as retrain_module
from pipeline.slim.counterfactual import (
    BACKGROUND_MIN_CONFIDENCE,
    Background,
    CompositeEditor,
    auto_augmentation,
    background_pixels,
    background_rows,
    class_sources,
    donor_rows,
    generate_run,
    load_editor,
    located_rows,
    object_pixels,
    plan,
    read_counterfactuals,
    write_counterfactuals,
)
from pipeline.slim.propagate import Propagation
from pipeline.slim.regions import SpuriousRegions, run_regions

SHARE = RetrainConfig.counterfactual_share  # the default share of each class generated


@pytest.fixture()
def run(answered_run: Path) -> Path:
    return answered_run


def manifest(run: Path) -> list[dict[str, str]]:
    with (run / "counterfactuals" / "metadata.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_composite_fills_the_region_from_the_first_background_that_has_background_there() -> None:
    rgb = np.zeros((2, 2, 3), np.float32)
    replace = np.array([[True, True], [True, False]])
    first = Background(np.full((2, 2, 3), 0.5, np.float32), np.array([[True, False], [False, True]]))
    second = Background(np.ones((2, 2, 3), np.float32), np.ones((2, 2), bool))
    out = CompositeEditor().edit(rgb, replace, [first, second], "disc")
    assert out[..., 0].tolist() == [[0.5, 1.0], [1.0, 0.0]]  # kept pixel untouched; first background wins
    assert rgb.max() == 0.0  # the input is not modified


def test_a_background_s_object_hole_is_widened_to_a_box_and_a_region_at_the_edge_keeps_its_shape() -> None:
    """A hole shaped like the other class's object would draw that shape into the counterfactual."""
    cam = np.zeros((2, 8, 8), np.float32)
    cam[0, 3:5, 2:6] = cam[0, 2:6, 3:5] = 1.0  # attention judged core: a plus-shaped object in the middle
    cam[1, 0:3, 0:3] = cam[1, 3, 0] = 1.0  # the same kind of region against the corner
    regions = SpuriousRegions(np.array([7, 9]), cam, np.array([1.0, 1.0]), {})
    middle, corner = background_pixels(regions, 7, 64), background_pixels(regions, 9, 64)
    hole = ~middle
    rows, columns = np.flatnonzero(hole.any(axis=1)), np.flatnonzero(hole.any(axis=0))
    assert hole[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1].all()  # the hole is its bounding box
    assert hole.sum() == len(rows) * len(columns) and 0 < hole.mean() < 0.5
    eroded = ndimage.binary_erosion(regions(9, 64), iterations=4, border_value=1)  # BACKGROUND_MARGIN at 64 px
    assert np.array_equal(corner, eroded)  # not boxed: its box would be most of the picture's side


def striped_picture_with_a_disc(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 64 px picture like the synthetic sets': a noisy striped texture, a flat-coloured disc; and the disc."""
    rng = np.random.default_rng(seed)
    rows = np.arange(64)[:, None] * np.ones((1, 64))
    texture = 0.45 + 0.1 * np.sin(rows / 2.0)[..., None] * np.array([1.0, 0.6, 1.0])
    rgb = np.clip(texture + rng.normal(0, 0.03, (64, 64, 3)), 0, 1)
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 30) ** 2 + (xx - 34) ** 2 <= 10 ** 2
    rgb[disc] = (0.2, 0.8, 0.4)
    return rgb, disc


def test_the_kept_region_is_cut_to_the_object_inside_its_box() -> None:
    rgb, disc = striped_picture_with_a_disc(seed=0)
    box = np.zeros_like(disc)
    box[18:43, 22:47] = True  # the disc's bounding box, a pixel wider: 1 - pi/4 of it is background
    kept = object_pixels(rgb, box)
    assert not (kept & ~box).any()  # only ever cut down
    assert (kept & disc).sum() >= 0.98 * disc.sum()  # the whole object stays
    assert (kept & ~disc).sum() <= 0.05 * (box & ~disc).sum()  # the box's corners go
    assert np.array_equal(kept, object_pixels(rgb, box))  # seeded: the same picture gives the same bytes


def test_a_cut_that_finds_no_object_gives_none_rather_than_the_region() -> None:
    """Kept whole, a region the cut fails on is mostly the donor's own background: its cue."""
    rgb, disc = striped_picture_with_a_disc(seed=1)
    assert object_pixels(rgb, np.ones_like(disc)) is None  # no background to learn from
    assert object_pixels(rgb, np.zeros_like(disc)) is None


def test_backgrounds_are_located_images_whose_own_cue_the_reference_model_reads_surely(run: Path, caplog) -> None:
    """An image whose object is not located would lend its object along with its background; a minority image
    (the other class's object on this class's background), what the reference model gets wrong or is unsure of,
    would paste a class back onto its own cue. Without any clean background a class gets no counterfactuals."""
    arrays = AttentionArrays.load(run / "attention.npz")
    regions = run_regions(Run(run), arrays, Propagation.load(run / "propagation.npz").score)
    others = arrays.for_class(0)
    arrays.pred[others] = arrays.y[others]
    arrays.confidence[others] = 0.99
    located = located_rows(arrays, regions, others)
    assert 6 < len(located) < len(others)  # the fixture has both kinds
    assert np.array_equal(background_rows(arrays, regions, 1), located)
    arrays.pred[located[:3]] = 1  # wrong
    arrays.confidence[located[3:6]] = BACKGROUND_MIN_CONFIDENCE / 2  # right, unsure
    assert np.array_equal(background_rows(arrays, regions, 1), located[6:])
    arrays.confidence[others] = 0.5  # nobody sure (a weak reference model): every located image
    assert np.array_equal(background_rows(arrays, regions, 1), located)
    score = regions.score.copy()
    score[others] = 0.0  # every class-0 verdict spurious, no box: class 1's donors stay, its backgrounds go
    unlocated = SpuriousRegions(arrays.index, arrays.cam, score, {})
    size = load_dataset(Run(run).load_config().data.root).native_size
    assert len(donor_rows(arrays, unlocated, 1, size)) and not len(background_rows(arrays, unlocated, 1))
    with caplog.at_level("WARNING", logger="pipeline.slim.counterfactual"):
        assert not plan(arrays, unlocated, class_sources(arrays, unlocated, size), SHARE, seed=0)
    assert "none can lend a background without its object" in caplog.text


def test_an_editor_is_loaded_from_module_and_class_and_a_bad_one_is_one_line() -> None:
    assert load_editor(None).name == "composite"
    assert load_editor("pipeline.slim.counterfactual:CompositeEditor").name == "composite"
    with pytest.raises(PipelineError, match="module:Class"):
        load_editor("no_such_module:Editor")


def test_each_class_s_core_on_other_classes_backgrounds(run: Path) -> None:
    folder = generate_run(Run(run), Run(run).load_config())
    rows = manifest(run)
    arrays = AttentionArrays.load(run / "attention.npz")
    config = Run(run).load_config()
    image_set = load_dataset(config.data.root)
    regions = run_regions(Run(run), arrays, Propagation.load(run / "propagation.npz").score)
    size = image_set.native_size
    for y in arrays.classes:  # the share of every class that has an object to cut, labelled as its donor
        cuttable = [object_pixels(load_rgb(image_set.root / image_set.samples[int(arrays.index[r])].filename, size),
                                  ~regions(int(arrays.index[r]), size)) is not None
                     for r in donor_rows(arrays, regions, y, size)]
        made = sum(int(r["y"]) == y for r in rows)
        assert made == (math.ceil(SHARE * len(arrays.for_class(y))) if any(cuttable) else 0)
    assert rows
    for row in rows[:: max(1, len(rows) // 6)]:  # a few: every pixel is the donor's or a background's
        donor, backgrounds = int(row["donor"]), [int(b) for b in row["backgrounds"].split()]
        assert image_set.samples[donor].y == int(row["y"])
        assert all(image_set.samples[b].y != int(row["y"]) for b in backgrounds)
        made = load_rgb(folder / row["img_filename"], size)
        original = load_rgb(image_set.root / image_set.samples[donor].filename, size)
        kept = object_pixels(original, ~regions(donor, size))
        assert kept is not None and not (kept & regions(donor, size)).any()  # the object, cut from its region
        assert np.allclose(made[kept], original[kept], atol=1 / 255)
        replaced = ~kept
        candidates = [load_rgb(image_set.root / image_set.samples[b].filename, size) for b in backgrounds]
        candidates = [c[::rows, ::columns] for c in candidates for rows in (1, -1) for columns in (1, -1)]
        from_background = np.zeros(replaced.shape, bool)
        for candidate in candidates:
            from_background |= np.abs(made - candidate).max(axis=2) <= 1 / 255
        changed = replaced & (np.abs(made - original).max(axis=2) > 1 / 255)
        assert from_background[changed].all()
        assert float(row["filled"]) >= 0.5  # MIN_FILLED: a candidate filled less is skipped


def test_generation_is_reused_until_what_it_depends_on_changes(run: Path) -> None:
    config = Run(run).load_config()
    generate_run(Run(run), config)
    first = manifest(run)
    stamp = (run / "counterfactuals" / "metadata.csv").stat().st_mtime_ns
    generate_run(Run(run), config)
    assert (run / "counterfactuals" / "metadata.csv").stat().st_mtime_ns == stamp
    config.retrain.counterfactual_share = 2 * SHARE
    generate_run(Run(run), config)  # other settings: remade whole, in place
    assert len(manifest(run)) > len(first)
    assert not (run / "counterfactuals.new").exists()
    config.retrain.counterfactual_share = 0.0
    with pytest.raises(PipelineError, match="counterfactual-share"):
        generate_run(Run(run), config)


def test_rejected_counterfactuals_are_left_out(run: Path) -> None:
    folder = generate_run(Run(run), Run(run).load_config())
    keys = [r["key"] for r in manifest(run)]
    kept = read_counterfactuals(folder, {keys[0], keys[3]})
    assert len(kept) == len(keys) - 2 and kept.rejected == 2 and keys[0] not in kept.keys


def test_a_class_whose_object_is_located_nowhere_is_left_out_and_the_others_are_read(run: Path) -> None:
    """``plan`` skips such a class (no box, no attention judged core); the set still loads for training."""
    config = Run(run).load_config()
    arrays = AttentionArrays.load(run / "attention.npz")
    regions = run_regions(Run(run), arrays, Propagation.load(run / "propagation.npz").score)
    image_set = load_dataset(config.data.root)
    sources = class_sources(arrays, regions, image_set.native_size)
    *_, last = plan(arrays, regions, sources, SHARE, seed=0)  # the fixture's triangles: cut well
    made = write_counterfactuals(run / "counterfactuals", [last], image_set, regions, load_editor(None),
                                 image_set.native_size)
    cf = read_counterfactuals(run / "counterfactuals")
    assert len(cf) == made > 0 and set(cf.labels.tolist()) == {last.y}
    assert cf.image_set.class_names == image_set.class_names  # labels keep the dataset's class numbering


def test_auto_adds_counterfactuals_wherever_a_class_can_have_them(run: Path, monkeypatch, capsys) -> None:
    """Some class with a located object and another class's located backgrounds: counterfactuals; none
    anywhere (every verdict spurious, no box): none, rather than an error. The choice and the generation read
    the same sources: each class's donors are measured once (a pass over its located images' maps). The modes
    that train on the curated subset get none from ``auto`` (they were measured to lose accuracy with them) and
    a warning when asked for them."""
    arrays = AttentionArrays.load(run / "attention.npz")
    regions = run_regions(Run(run), arrays, Propagation.load(run / "propagation.npz").score)
    size = load_dataset(Run(run).load_config().data.root).native_size
    assert auto_augmentation(arrays, class_sources(arrays, regions, size)) == "counterfactual"  # CSV answers, no boxes
    unlocated = SpuriousRegions(arrays.index, arrays.cam, np.zeros(len(arrays)), {})
    assert auto_augmentation(arrays, class_sources(arrays, unlocated, size)) == "none"
    measured = []
    monkeypatch.setattr(counterfactual_module, "donor_rows",
                        lambda *args: measured.append(args[2]) or donor_rows(*args))
    shutil.rmtree(run / "counterfactuals", ignore_errors=True)  # made anew by this retraining
    assert main(["retrain", "--run", str(run), "--mode", "low-spuriosity", "--quiet"]) == 0  # auto: the default
    assert sorted(measured) == sorted(arrays.classes.tolist())
    _, meta = load_checkpoint(run / "slim_model.pt")
    assert meta["augment"] == "counterfactual" and meta["counterfactuals"]["images"] > 0
    assert main(["retrain", "--run", str(run), "--mode", "low-spuriosity", "--augment", "none", "--quiet"]) == 0
    _, meta = load_checkpoint(run / "slim_model.pt")
    assert meta["augment"] == "none" and "counterfactuals" not in meta
    assert main(["curate", "--run", str(run), "--subset-size", "40", "--quiet"]) == 0
    for mode in ("last-layer", "full"):
        assert main(["retrain", "--run", str(run), "--mode", mode, "--epochs", "1", "--quiet"]) == 0
        _, meta = load_checkpoint(run / "slim_model.pt")
        assert meta["mode"] == mode and meta["augment"] == "none" and "counterfactuals" not in meta
    assert "lowered worst-group accuracy" not in capsys.readouterr().err  # auto chose: nothing to warn of
    assert main(["retrain", "--run", str(run), "--mode", "last-layer", "--augment", "counterfactual", "--quiet"]) == 0
    _, meta = load_checkpoint(run / "slim_model.pt")
    assert meta["augment"] == "counterfactual" and meta["counterfactuals"]["images"] > 0  # asked for: trained with
    assert "lowered worst-group accuracy" in capsys.readouterr().err


def test_auto_trains_without_where_not_one_image_comes_out_and_asked_for_it_is_one_line(run: Path, monkeypatch,
                                                                                        capsys) -> None:
    """Every candidate rejected (no background may fill enough): ``auto`` retrains without them, warned;
    ``counterfactual`` stops with the one-line error, nothing retrained."""
    monkeypatch.setattr(counterfactual_module, "MIN_FILLED", 1.01)
    assert main(["retrain", "--run", str(run), "--mode", "low-spuriosity", "--quiet"]) == 0
    _, meta = load_checkpoint(run / "slim_model.pt")
    assert meta["augment"] == "none" and "none after all" in capsys.readouterr().err
    (run / "slim_model.pt").unlink()
    assert main(["retrain", "--run", str(run), "--mode", "low-spuriosity", "--augment", "counterfactual",
                 "--quiet"]) != 0
    assert "no counterfactual could be made" in capsys.readouterr().err and not (run / "slim_model.pt").exists()


def test_head_refit_modes_learn_from_the_counterfactuals_features(run: Path) -> None:
    assert main(["retrain", "--run", str(run), "--mode", "low-spuriosity", "--augment", "counterfactual",
                 "--quiet"]) == 0
    model, meta = load_checkpoint(run / "slim_model.pt")
    reference, _ = load_checkpoint(run / "model.pt")
    cf = read_counterfactuals(run / "counterfactuals")
    assert meta["augment"] == "counterfactual" and meta["counterfactuals"]["images"] == len(cf)
    arrays = AttentionArrays.load(run / "attention.npz")
    spurious = retrain_module.spuriosity(arrays, Propagation.load(run / "propagation.npz").score)
    rows = retrain_module.least_spurious_rows(arrays.y, spurious, meta["share"])
    frozen = retrain_module.frozen_attention(reference, cf.image_set, cf.samples, meta["image_size"],
                                             Run(run).load_config(), torch.device("cpu"))
    assert meta["images"] == len(rows) + len(cf)
    expected, _ = retrain_module.retrain_last_layer(reference, np.concatenate([arrays.features[rows], frozen.features]),
                                                    np.concatenate([arrays.y[rows], frozen.y]), seed=0)
    assert torch.allclose(model.head.weight, expected.head.weight)
    assert main(["report", "--run", str(run), "--quiet"]) == 0  # the mode's own row, and a panel of the images
    metrics = json.loads((run / "metrics.json").read_text())
    assert "low-spuriosity+counterfactual" in metrics["modes"]
    page = (run / "report.html").read_text()
    assert "Counterfactual training images" in page and f"plus {len(cf)} counterfactual images" in page


def test_training_modes_draw_the_counterfactuals_uncorrupted(run: Path, monkeypatch) -> None:
    seen = []

    def recording_make_loader(*args, **kwargs):  # the real loader; the test keeps what retrain asked for
        loader = make_loader(*args, **kwargs)
        seen.append((kwargs.get("corruption"), kwargs.get("extra"), len(loader.sampler)))
        return loader

    monkeypatch.setattr(retrain_module, "make_loader", recording_make_loader)
    assert main(["retrain", "--run", str(run), "--mode", "corm", "--augment", "counterfactual", "--epochs", "1",
                 "--quiet"]) == 0
    corruption, extra, draws = seen[0]
    cf = read_counterfactuals(run / "counterfactuals")
    (image_set, samples), = extra
    assert corruption is not None and image_set.root == cf.image_set.root and len(samples) == len(cf)
    arrays = AttentionArrays.load(run / "attention.npz")
    assert draws == len(arrays) + len(cf)  # one epoch: as many draws as images, counterfactuals included


def test_corrupting_follows_the_counterfactuals_unless_told_and_only_where_images_are_trained_on() -> None:
    assert retrain_module.corrupts("fresh", "auto", "counterfactual")
    assert not retrain_module.corrupts("fresh", "auto", "none")
    assert retrain_module.corrupts("full", "yes", "none") and not retrain_module.corrupts("fresh", "no", "counterfactual")
    assert not retrain_module.corrupts("corm", "yes", "none")  # corm corrupts on its own, whatever --corrupt says
    assert not retrain_module.corrupts("last-layer", "auto", "counterfactual")  # frozen features: nothing to corrupt
    with pytest.raises(PipelineError, match="--corrupt yes needs a mode that trains on images"):
        retrain_module.corrupts("low-spuriosity", "yes", "counterfactual")
    unset, given = RetrainConfig(), RetrainConfig(corrupt_probability=0.75)
    assert unset.corrupt_share("corm") == CORM_CORRUPT_PROBABILITY  # each its measured default, unless given
    assert unset.corrupt_share("fresh") == unset.corrupt_share("full") == ADDED_CORRUPT_PROBABILITY
    assert given.corrupt_share("corm") == given.corrupt_share("fresh") == 0.75


def test_fresh_with_counterfactuals_corrupts_its_draws_as_corm_does(run: Path, monkeypatch, capsys) -> None:
    """``--corrupt auto`` (the default) with the counterfactuals ``--augment auto`` adds: the dataset's draws are
    corrupted in the rule's region, the counterfactuals drawn as made; the report keeps it as a row of its own.
    ``--corrupt no`` trains the same draws natural; ``yes`` on a head refit is a one-line error."""
    seen = []

    def recording_make_loader(*args, **kwargs):  # the real loader; the test keeps what retrain asked for
        seen.append(kwargs.get("corruption"))
        return make_loader(*args, **kwargs)

    monkeypatch.setattr(retrain_module, "make_loader", recording_make_loader)
    assert main(["retrain", "--run", str(run), "--mode", "fresh", "--quiet"]) == 0
    corruption = seen[0]
    arrays = AttentionArrays.load(run / "attention.npz")
    regions = run_regions(Run(run), arrays, Propagation.load(run / "propagation.npz").score)
    assert corruption.kind == "noise" and corruption.probability == ADDED_CORRUPT_PROBABILITY
    for image_id in arrays.index[:5]:
        assert np.array_equal(corruption.region(int(image_id), 32), regions(int(image_id), 32))
    _, meta = load_checkpoint(run / "slim_model.pt")
    assert meta["augment"] == "counterfactual" and meta["corruption"] == "noise"
    assert sum(meta["regions"].values()) == len(arrays)
    assert main(["report", "--run", str(run), "--quiet"]) == 0
    assert "fresh+counterfactual+corrupted" in json.loads((run / "metrics.json").read_text())["modes"]
    assert f"{ADDED_CORRUPT_PROBABILITY:.0%} of the draws corrupted by noise" in (run / "report.html").read_text()

    seen.clear()
    assert main(["retrain", "--run", str(run), "--mode", "fresh", "--corrupt", "no", "--quiet"]) == 0
    _, meta = load_checkpoint(run / "slim_model.pt")
    assert seen[0] is None and meta["augment"] == "counterfactual" and "corruption" not in meta
    capsys.readouterr()
    assert main(["retrain", "--run", str(run), "--mode", "last-layer", "--corrupt", "yes", "--quiet"]) != 0
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--corrupt yes needs a mode that trains on images" in error
