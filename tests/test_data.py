"""Loading datasets: both layouts, and a one-line error for each kind of bad input."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.core import data as data_module
from pipeline.core.data import TEST, TRAIN, VAL, load_dataset
from pipeline.core.errors import PipelineError


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_metadata(root: Path, edit) -> None:
    lines = (root / "metadata.csv").read_text().splitlines()
    (root / "metadata.csv").write_text("\n".join(edit(lines)) + "\n")


def test_metadata_folder_loads_rows_groups_and_masks(tiny_data: Path) -> None:
    image_set = load_dataset(tiny_data)
    assert len(image_set.samples) == 240
    assert [len(image_set.split(s)) for s in (TRAIN, VAL, TEST)] == [160, 40, 40]
    assert image_set.class_names == ["disc", "triangle"]
    assert image_set.has_place and image_set.has_masks
    assert image_set.num_groups == 4
    assert image_set.native_size == 32
    sample = image_set.samples[7]
    assert image_set.group_of(sample) == sample.y * 2 + sample.place
    assert image_set.group_name(3) == "triangle|place1"


def test_class_folder_tree_without_splits_is_split_deterministically(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(30):
            Image.new("RGB", (16, 16), (i, 0, 0)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    image_set = load_dataset(tmp_path)
    assert image_set.class_names == ["cat", "dog"]
    assert len(image_set.samples) == 60
    assert not image_set.has_place and not image_set.has_masks
    splits = [s.split for s in image_set.samples]
    assert set(splits) == {TRAIN, VAL, TEST}
    assert splits == [s.split for s in load_dataset(tmp_path).samples]
    # without place, groups are the classes
    assert image_set.num_groups == 2 and image_set.group_name(1) == "dog"


@pytest.mark.parametrize(("sides", "expected"), [((40, 40, 48), 40), ((300, 500, 640), 224)])
def test_image_size_without_dataset_json_comes_from_the_images(tmp_path: Path, sides, expected) -> None:
    """Small images are trained at their own size (not blown up to 224), large photos at 224."""
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i, side in enumerate(sides):
            Image.new("RGB", (side + 10, side), (i, 0, 0)).save(tmp_path / name / f"{i}.png")
    assert load_dataset(tmp_path).native_size == expected


def test_class_folder_tree_with_split_folders(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "x.png")
    image_set = load_dataset(tmp_path)
    assert [(s.split, s.y) for s in image_set.samples] == [(TRAIN, 0), (TRAIN, 1), (TEST, 0), (TEST, 1)]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ls: [ls[0].replace("y,", "label,")] + ls[1:], "missing column(s) y"),
        (lambda ls: ls[:1] + [ls[1].replace("images/00000.png", "images/nope.png")] + ls[2:], "image not found"),
        (lambda ls: ls[:1] + [ls[1].replace(",0,", ",zero,", 1)] + ls[2:], "must be integers"),
        (lambda ls: ls[:1] + [ls[1].split(",")[0] + ",1,7," + ",".join(ls[1].split(",")[3:])] + ls[2:],
         "split must be 0 (train), 1 (val) or 2 (test)"),
        (lambda ls: ls[:1] + [line for line in ls[1:] if not (line.split(",")[1] == "1" and line.split(",")[2] == "0")],
         "class 1 (triangle) has no training images"),
        (lambda ls: ls[:1], "has no rows"),
    ],
)
def test_bad_metadata_gives_one_clear_line(tiny_data: Path, tmp_path: Path, edit, message: str, capsys) -> None:
    root = copy_dataset(tiny_data, tmp_path / "d")
    rewrite_metadata(root, edit)
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(root)
    # the same through the CLI: exit status 2, one line on stderr, nothing written to the run
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--run", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not (run / "model.pt").exists()


def test_unreadable_image_is_reported_with_its_path(tiny_data: Path, tmp_path: Path) -> None:
    root = copy_dataset(tiny_data, tmp_path / "d")
    (root / "images" / "00005.png").write_bytes(b"this is not a png")
    with pytest.raises(PipelineError, match=r"cannot read image .*00005\.png"):
        load_dataset(root)


def test_a_runs_manifest_opens_only_new_or_changed_files(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    """The first load checks every file and records it; later loads trust unchanged files (same size and mtime)
    and re-open only the changed ones, so a file damaged after the first check is still caught."""
    root = copy_dataset(tiny_data, tmp_path / "d")
    manifest = tmp_path / "run" / "manifest.json"
    manifest.parent.mkdir()
    opened: list[str] = []
    real_side = data_module._image_side
    monkeypatch.setattr(data_module, "_image_side", lambda path: opened.append(path.name) or real_side(path))
    first = load_dataset(root, manifest)
    assert len(opened) == 480 and manifest.exists()  # 240 images and their masks
    opened.clear()
    assert load_dataset(root, manifest).native_size == first.native_size and opened == []
    image = root / "images" / "00007.png"
    Image.open(image).convert("RGB").resize((40, 40)).save(image)
    assert load_dataset(root, manifest) and opened == ["00007.png"]
    opened.clear()
    image.write_bytes(b"damaged")
    with pytest.raises(PipelineError, match=r"cannot read image .*00007\.png"):
        load_dataset(root, manifest)
    manifest.write_text("{ torn")  # only a cache: unreadable means check everything again
    image.unlink()
    shutil.copy(tiny_data / "images" / "00007.png", image)
    opened.clear()
    assert load_dataset(root, manifest) and len(opened) == 480


def test_training_skips_an_image_damaged_after_the_check_and_counts_it(tiny_data: Path, tmp_path: Path,
                                                                       caplog) -> None:
    root = copy_dataset(tiny_data, tmp_path / "d")
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--run", str(run), "--epochs", "1", "--quiet"]) == 0
    train_image = next(s for s in load_dataset(root).samples if s.split == TRAIN)
    damaged = root / train_image.filename
    size = damaged.stat()
    damaged.write_bytes(damaged.read_bytes()[:60])  # truncated past its header: caught only when decoded
    os.utime(damaged, ns=(size.st_atime_ns, size.st_mtime_ns))
    damaged_size = damaged.stat().st_size
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["files"][train_image.filename][0] = damaged_size  # as if it had been damaged before the check
    (run / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--run", str(run), "--epochs", "2", "--force", "--quiet"]) == 0
    assert f"skipped image {train_image.index}" in caplog.text
    assert re.search(r"epoch 2: 1 of 160 image draws skipped as unreadable", caplog.text)


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        load_dataset(tmp_path / "absent")


def test_empty_folder_is_neither_layout(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="neither metadata.csv nor class folders"):
        load_dataset(tmp_path)


def test_images_are_normalised_and_masks_aligned(tiny_data: Path) -> None:
    from pipeline.model.loaders import ImageDataset

    image_set = load_dataset(tiny_data)
    dataset = ImageDataset(image_set, image_set.split(TRAIN)[:3], size=48, with_masks=True)
    image, y, index, mask = dataset[1]
    assert image.shape == (3, 48, 48) and mask.shape == (48, 48)
    assert y == image_set.samples[index].y
    assert 0 < mask.float().mean() < 0.5  # an object, smaller than the image
    no_masks = ImageDataset(image_set, image_set.split(TRAIN)[:1], size=32)
    assert no_masks[0][3].numel() == 0
    assert np.isfinite(image.numpy()).all()
