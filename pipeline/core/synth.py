"""The embedded default dataset: a Waterbirds-like generator that needs no download.

Each image is a shape (the *core* feature: its class) on a textured background of one of several *places*
(the *spurious* feature). In the training split the place agrees with the class with probability ``corr``;
in val and test the place is drawn independently, so a model that learned the background fails on the
minority groups exactly as Waterbirds' ERM does. Every image comes with its true foreground mask.

Each image is drawn from its own RNG stream keyed by (seed, index), so the dataset is deterministic and the
same index gives the same image whatever the other options.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.core.config import option
from pipeline.core.data import TEST, TRAIN, VAL
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, no_space_is_an_error

SHAPES = ("disc", "triangle", "square", "star", "cross", "hexagon")


@dataclass(frozen=True)
class SynthSpec:
    """Everything that determines the generated dataset."""

    n_train: int = option(2400, "training images")
    n_val: int = option(600, "validation images")
    n_test: int = option(1200, "test images")
    classes: int = option(2, f"number of classes (shapes), 2-{len(SHAPES)}")
    corr: float = option(0.95, "P(place agrees with class) in train; val/test are independent")
    image_size: int = option(64, "image side in pixels")
    seed: int = option(0, "generator seed")


def generate(out: str | Path, spec: SynthSpec, progress: bool = True) -> Path:
    """Write the dataset to ``out`` (images/, masks/, metadata.csv, dataset.json); reuse it if identical."""
    _validate(spec)
    out = Path(out).expanduser().resolve()
    info_path, meta_path = out / "dataset.json", out / "metadata.csv"
    info = {"generator": "pipeline.core.synth", "spec": asdict(spec), "class_names": list(SHAPES[: spec.classes]),
            "image_size": spec.image_size}
    if meta_path.exists() and info_path.exists() and json.loads(info_path.read_text()) == info:
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    splits = [TRAIN] * spec.n_train + [VAL] * spec.n_val + [TEST] * spec.n_test
    rows = ["img_filename,y,split,place,mask_filename"]
    with no_space_is_an_error(out):  # pictures are written in place (thousands of fsyncs would cost more)
        for index, split in enumerate(tqdm(splits, desc="synth", disable=not progress, unit="img")):
            rng = np.random.default_rng([spec.seed, index])
            y = int(rng.integers(spec.classes))
            place = _draw_place(rng, y, spec.classes, spec.corr if split == TRAIN else None)
            image, mask = render(rng, y, place, spec.classes, spec.image_size)
            name = f"{index:05d}.png"
            Image.fromarray(image).save(out / "images" / name)
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / name)
            rows.append(f"images/{name},{y},{split},{place},masks/{name}")
    # metadata last: a generator killed half-way leaves no metadata.csv, so it is never mistaken for a dataset
    atomic_write_bytes(info_path, (json.dumps(info, indent=2) + "\n").encode())
    atomic_write_bytes(meta_path, ("\n".join(rows) + "\n").encode())
    return out


def _validate(spec: SynthSpec) -> None:
    if not 2 <= spec.classes <= len(SHAPES):
        raise PipelineError(f"--classes must be between 2 and {len(SHAPES)}, got {spec.classes}")
    if not 0.0 <= spec.corr <= 1.0:
        raise PipelineError(f"--corr must be a probability in [0, 1], got {spec.corr}")
    if spec.image_size < 32:
        raise PipelineError(f"--image-size must be at least 32 pixels, got {spec.image_size}")
    if min(spec.n_train, spec.n_val, spec.n_test) < spec.classes:
        raise PipelineError(f"each split needs at least {spec.classes} images (one per class)")


def _draw_place(rng: np.random.Generator, y: int, places: int, corr: float | None) -> int:
    """The place agrees with the class with probability ``corr``; ``None`` means independent."""
    if corr is None:
        return int(rng.integers(places))
    if rng.random() < corr:
        return y
    return int((y + rng.integers(1, places)) % places)


def render(rng: np.random.Generator, y: int, place: int, places: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One ``size x size`` RGB uint8 image and its boolean foreground mask."""
    background = _background(rng, place, places, size)
    mask = _shape_mask(rng, SHAPES[y], size)
    hue = rng.random()  # the object's colour says nothing about its class
    colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 0.9), rng.uniform(0.55, 0.95)), np.float32)
    shading = 0.85 + 0.15 * _noise_field(rng, size, cells=3)
    obj = colour[None, None, :] * shading[..., None]
    image = np.where(mask[..., None], obj, background)
    image = image + rng.normal(0.0, 0.03, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), mask


def _background(rng: np.random.Generator, place: int, places: int, size: int) -> np.ndarray:
    """A place is a hue family plus a stripe orientation, with random blobs: easy to see, hard to miss."""
    hue = (0.28 + place / places + rng.normal(0.0, 0.03)) % 1.0
    base = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.35, 0.7), 1.0), np.float32)
    angle = math.pi * place / places + rng.normal(0.0, 0.15)
    period = rng.uniform(6.0, 12.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    stripes = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + rng.uniform(0, 6.3))
    value = 0.55 + 0.12 * stripes + 0.2 * (_noise_field(rng, size, cells=4) - 0.5)
    return np.clip(base[None, None, :] * value[..., None], 0.0, 1.0)


def _noise_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((size, size), Image.BILINEAR), np.float32) / 255.0


def _shape_mask(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    radius = size * rng.uniform(0.14, 0.22)
    margin = radius + 1
    cx, cy = rng.uniform(margin, size - margin, 2)
    rotation = rng.uniform(0, 2 * math.pi)
    vertices = _polygon(shape, rng)
    points = [
        (cx + radius * r * math.cos(a + rotation), cy + radius * r * math.sin(a + rotation)) for a, r in vertices
    ]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    return np.asarray(canvas) > 127


def _polygon(shape: str, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Vertices as (angle, radius factor) pairs around the shape's centre."""
    def regular(n: int) -> list[tuple[float, float]]:
        return [(2 * math.pi * i / n, 1.0) for i in range(n)]

    if shape == "disc":
        squash = rng.uniform(0.8, 1.0)
        return [(a, 1.0 / math.sqrt(math.cos(a) ** 2 + (math.sin(a) / squash) ** 2)) for a, _ in regular(32)]
    if shape == "triangle":
        return regular(3)
    if shape == "square":
        return regular(4)
    if shape == "hexagon":
        return regular(6)
    if shape == "star":
        return [(a, 1.0 if i % 2 == 0 else 0.45) for i, (a, _) in enumerate(regular(10))]
    # cross: a plus sign as 12 vertices
    arm = 0.35
    corners = [(arm, 1.0), (arm, arm), (1.0, arm), (1.0, -arm), (arm, -arm), (arm, -1.0),
               (-arm, -1.0), (-arm, -arm), (-1.0, -arm), (-1.0, arm), (-arm, arm), (-arm, 1.0)]
    return [(math.atan2(v, u), math.hypot(u, v)) for u, v in corners]
