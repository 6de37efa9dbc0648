"""Datasets: a Waterbirds-style ``metadata.csv`` folder or a plain class-per-folder tree.

Both become an :class:`ImageSet`: a list of :class:`Sample` rows plus what the dataset knows about itself
(class names, whether it has the spurious attribute ``place`` and foreground masks). ``place`` and masks are
carried for *evaluation only*; nothing that chooses images or trains a model may read them.

Plain numpy and PIL: the torch dataset that feeds a network is :class:`pipeline.model.loaders.ImageDataset`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", VAL: "val", TEST: "test"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
REQUIRED_COLUMNS = ("img_filename", "y", "split")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
MANIFEST_VERSION = 1  # bump when the manifest's entries change meaning: older manifests are then re-verified
# threads opening image headers side by side: the check waits on the disk (network file systems above all), and
# PIL's decoders release the GIL
CHECK_THREADS = min(32, 4 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class Sample:
    """One image of the dataset; ``index`` is its stable id within the dataset."""

    index: int
    filename: str
    y: int
    split: int
    place: int | None = None
    mask_filename: str | None = None


@dataclass
class ImageSet:
    """A loaded dataset: rows, class names and what optional columns it has."""

    root: Path
    samples: list[Sample]
    class_names: list[str]
    native_size: int | None = None

    def __post_init__(self) -> None:
        self.has_place = all(s.place is not None for s in self.samples)
        self.has_masks = all(s.mask_filename for s in self.samples)
        self.num_places = max((s.place or 0) for s in self.samples) + 1 if self.has_place else 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, split: int) -> list[Sample]:
        return [s for s in self.samples if s.split == split]

    def group_of(self, sample: Sample) -> int:
        """Group id for evaluation: class x place where ``place`` exists, else the class."""
        return sample.y * self.num_places + sample.place if self.has_place else sample.y

    @property
    def num_groups(self) -> int:
        return self.num_classes * self.num_places if self.has_place else self.num_classes

    def group_name(self, group: int) -> str:
        if not self.has_place:
            return self.class_names[group]
        y, place = divmod(group, self.num_places)
        return f"{self.class_names[y]}|place{place}"

    def fingerprint(self) -> str:
        """Hash of the rows: a changed metadata file invalidates every stage built on it."""
        digest = hashlib.sha256(str(self.root).encode())
        for s in self.samples:
            digest.update(f"{s.index},{s.filename},{s.y},{s.split},{s.place},{s.mask_filename}\n".encode())
        return digest.hexdigest()[:16]


def load_dataset(root: str | Path, manifest: Path | None = None, every_class_trained: bool = True) -> ImageSet:
    """Load ``root`` as a metadata.csv folder if it has one, else as a class-per-folder tree.

    A dataset to train on must hold training images of every class it names; an addition to one (the
    counterfactual set, ``every_class_trained=False``) may lack a class whose object was never located.

    Every image and mask is checked (exists, readable header). With ``manifest`` (the run's), files whose size
    and modification time match what it recorded are trusted, and only new or changed ones are opened: a run's
    stages do not re-open a million images each.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise PipelineError(f"dataset folder {root} does not exist; pass --data DIR (make one with `synth`)")
    info = _read_dataset_info(root)
    if (root / "metadata.csv").exists():
        samples = _read_metadata(root)
        names = info.get("class_names") or [f"class_{i}" for i in range(max(s.y for s in samples) + 1)]
    else:
        samples, names = _read_class_tree(root)
    image_set = ImageSet(root=root, samples=samples, class_names=list(names), native_size=info.get("image_size"))
    _check_classes(image_set, every_class_trained)
    sides = _check_images(image_set, manifest)
    if image_set.native_size is None:
        image_set.native_size = native_side(sides)
    return image_set


def native_side(sides: list[int]) -> int:
    """The side to train at when ``dataset.json`` does not say: the images' own (the median of their shorter
    sides), at most ``DEFAULT_IMAGE_SIZE``.

    Small images are not blown up: a 64 px set trained at 224 px costs ~12x the compute for no extra detail
    (seen as an hour-long ``train`` instead of minutes); photos larger than that are still cut down to the
    size ImageNet-style backbones expect.
    """
    return min(DEFAULT_IMAGE_SIZE, int(np.median(sides))) if sides else DEFAULT_IMAGE_SIZE


def _read_dataset_info(root: Path) -> dict:
    """``dataset.json`` (written by ``synth``) tells class names and the native image size."""
    path = root / "dataset.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _read_metadata(root: Path) -> list[Sample]:
    path = root / "metadata.csv"
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise PipelineError(
                f"{path} is missing column(s) {', '.join(missing)}; it needs {', '.join(REQUIRED_COLUMNS)} "
                "(optional: place, mask_filename)"
            )
        has_place = "place" in columns
        has_mask = "mask_filename" in columns
        samples = []
        for line, row in enumerate(reader, start=2):
            try:
                y, split = int(row["y"]), int(row["split"])
                place = int(row["place"]) if has_place and row["place"] not in ("", None) else None
            except (TypeError, ValueError):
                raise PipelineError(
                    f"{path} line {line}: y, split and place must be integers, got {row!r}"
                ) from None
            if split not in SPLIT_NAMES:
                raise PipelineError(f"{path} line {line}: split must be 0 (train), 1 (val) or 2 (test), got {split}")
            if y < 0:
                raise PipelineError(f"{path} line {line}: y must be a class index >= 0, got {y}")
            mask = (row.get("mask_filename") or None) if has_mask else None
            samples.append(Sample(len(samples), row["img_filename"], y, split, place, mask))
    if not samples:
        raise PipelineError(f"{path} has no rows; add one line per image")
    return samples


def _read_class_tree(root: Path) -> tuple[list[Sample], list[str]]:
    """``root/<class>/*.png`` (all split by a stable hash) or ``root/{train,val,test}/<class>/*.png``."""
    split_dirs = {s: root / name for s, name in SPLIT_NAMES.items() if (root / name).is_dir()}
    trees = split_dirs or {None: root}
    names = sorted({d.name for tree in trees.values() for d in tree.iterdir() if d.is_dir()})
    if not names:
        raise PipelineError(
            f"{root} has neither metadata.csv nor class folders; use <root>/<class>/*.png or a metadata.csv"
        )
    samples: list[Sample] = []
    for split, tree in trees.items():
        for y, name in enumerate(names):
            for path in sorted((tree / name).glob("*")) if (tree / name).is_dir() else []:
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    rel = str(path.relative_to(root))
                    samples.append(Sample(len(samples), rel, y, _hash_split(rel) if split is None else split))
    return samples, names


def _hash_split(name: str) -> int:
    """A deterministic 70/10/20 train/val/test split for trees that do not say which image is which."""
    bucket = int(hashlib.md5(name.encode(), usedforsecurity=False).hexdigest()[:8], 16) % 10
    return TRAIN if bucket < 7 else VAL if bucket < 8 else TEST


def _check_classes(image_set: ImageSet, every_class_trained: bool) -> None:
    train_classes = {s.y for s in image_set.split(TRAIN)}
    for y in range(image_set.num_classes):
        if every_class_trained and y not in train_classes:
            raise PipelineError(
                f"class {y} ({image_set.class_names[y]}) has no training images (split 0); "
                "add some or remove the class"
            )
    if max(s.y for s in image_set.samples) >= image_set.num_classes:
        raise PipelineError(
            f"{image_set.root}/dataset.json names {image_set.num_classes} classes but metadata uses "
            f"y up to {max(s.y for s in image_set.samples)}; fix class_names"
        )


def _check_images(image_set: ImageSet, manifest: Path | None = None) -> list[int]:
    """Every listed image (and mask) must exist and have a readable image header; returns each image's shorter
    side (read from the header the check opens anyway, or from ``manifest`` for unchanged files)."""
    files = {rel: sample.index for sample in image_set.samples
             for rel in (sample.filename, sample.mask_filename) if rel is not None}
    known = _read_manifest(manifest, image_set.root)
    entries: dict[str, list[int]] = {}
    to_open = []
    for rel, index in files.items():
        path = image_set.root / rel
        try:
            stat = path.stat()
        except OSError:
            raise PipelineError(f"image not found: {path} (listed for image {index}); fix the path") from None
        entry = known.get(rel)
        if entry is not None and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
            entries[rel] = entry
        else:
            to_open.append((rel, [stat.st_size, stat.st_mtime_ns]))
    if to_open:
        log.info("checking %d of %d image files (the rest unchanged since the run's manifest)", len(to_open), len(files))
        with ThreadPoolExecutor(CHECK_THREADS) as pool:
            for (rel, stat), side in zip(to_open, pool.map(lambda item: _image_side(image_set.root / item[0]), to_open)):
                entries[rel] = [*stat, side]
        if manifest is not None:
            atomic_write_json(manifest, {"version": MANIFEST_VERSION, "root": str(image_set.root), "files": entries})
    return [entries[s.filename][2] for s in image_set.samples]


def _image_side(path: Path) -> int:
    """The shorter side of a readable image file; an unreadable one is the one-line error naming it."""
    try:
        with Image.open(path) as image:
            image.verify()
            return min(image.size)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise PipelineError(f"cannot read image {path}: {exc}; replace or remove it") from None


def _read_manifest(manifest: Path | None, root: Path) -> dict[str, list[int]]:
    """``rel path -> [size, mtime_ns, shorter side]`` of files checked before; empty when there is none or it is
    from another version or dataset folder (then every file is checked again and the manifest rewritten: it is
    only a cache)."""
    if manifest is None or not manifest.exists():
        return {}
    try:
        recorded = read_json(manifest)
    except PipelineError:
        log.warning("%s is unreadable; checking every image again", manifest)
        return {}
    if not isinstance(recorded, dict) or (recorded.get("version"), recorded.get("root")) != (MANIFEST_VERSION,
                                                                                              str(root)):
        return {}
    return recorded.get("files", {})


def resolve_image_size(image_set: ImageSet, requested: int | None) -> int:
    return requested or image_set.native_size or DEFAULT_IMAGE_SIZE


def rgb_array(image: Image.Image, size: int) -> np.ndarray:
    """``image`` as ``size x size x 3`` float32 in [0, 1]: what overlays and the model both start from.

    The one conversion for dataset files and for pictures the ML backend receives, so an unseen image lands
    in the same attention space as the training images.
    """
    return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0


def load_rgb(path: Path, size: int) -> np.ndarray:
    """The image file at ``path`` as :func:`rgb_array`; an unreadable file is a one-line error naming it."""
    try:
        with Image.open(path) as image:
            return rgb_array(image, size)
    except (UnidentifiedImageError, OSError) as exc:
        raise PipelineError(f"cannot read image {path}: {exc}; replace or remove it") from None


def load_mask(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L").resize((size, size), Image.NEAREST)) > 127
