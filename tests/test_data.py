"""Loading datasets: both layouts, and a one-line error for each kind of bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
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


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        load_dataset(tmp_path / "absent")


def test_empty_folder_is_neither_layout(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="neither metadata.csv nor class folders"):
        load_dataset(tmp_path)


def test_images_are_normalised_and_masks_aligned(tiny_data: Path) -> None:
    from pipeline.core.data import ImageDataset

    image_set = load_dataset(tiny_data)
    dataset = ImageDataset(image_set, image_set.split(TRAIN)[:3], size=48, with_masks=True)
    image, y, index, mask = dataset[1]
    assert image.shape == (3, 48, 48) and mask.shape == (48, 48)
    assert y == image_set.samples[index].y
    assert 0 < mask.float().mean() < 0.5  # an object, smaller than the image
    no_masks = ImageDataset(image_set, image_set.split(TRAIN)[:1], size=32)
    assert no_masks[0][3].numel() == 0
    assert np.isfinite(image.numpy()).all()
