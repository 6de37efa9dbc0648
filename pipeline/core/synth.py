"""The embedded default dataset (a Waterbirds-like generator that needs no download) and its harder family.

Each image is a shape (the *core* feature: its class) on a textured background of one of several *places*
(the *spurious* feature). In the training split the place agrees with the class with probability ``corr``;
in val and test the place is drawn independently, so a model that learned the background fails on the
minority groups exactly as Waterbirds' ERM does. Every image comes with its true foreground mask.

Defaults tuned on one dataset need not carry over, so ``--variant`` names a family of harder sets, each a
preset of three orthogonal options (any of which can also be given on its own):

* ``mixed``: ``--faint``: a share of each class's images has a small, low-contrast object, so the reference
  model attends to the object in some images of a class and to the background in others;
* ``glyphs``: ``--core glyphs``: hand-drawn strokes of two similar characters (a one and a seven) of varying
  thickness and slant instead of clean polygons;
* ``minority``: ``--corr 0.97``: each minority group is about 1.5 % of training, near Waterbirds' smallest.

Each image is drawn from its own RNG stream keyed by (seed, index), so the dataset is deterministic and the
same index has the same class whatever the other options. The default variant's images are exactly those of
the generator before the family existed (a regression test pins their digest).
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.core.config import option
from pipeline.core.data import TEST, TRAIN, VAL
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, no_space_is_an_error

SHAPES = ("disc", "triangle", "square", "star", "cross", "hexagon")
# the first two are the pair the default two classes use: both mostly one long near-vertical stroke
GLYPHS = ("one", "seven", "four", "two", "five", "three")
CORES = {"shapes": SHAPES, "glyphs": GLYPHS}


@dataclass(frozen=True)
class Variant:
    """What a ``--variant`` preset sets: the values ``corr``, ``core`` and ``faint`` take when not given."""

    corr: float
    core: str
    faint: float


# Each preset changes one thing against the default, so a result that holds on one and not another says which
# kind of difficulty broke it. Values calibrated with benchmarks/calibrate.py (BENCHMARKS.md).
VARIANTS = {
    "default": Variant(corr=0.95, core="shapes", faint=0.0),
    "mixed": Variant(corr=0.95, core="shapes", faint=0.4),  # 40 % faint: both kinds common in every class
    "glyphs": Variant(corr=0.95, core="glyphs", faint=0.0),
    "minority": Variant(corr=0.97, core="shapes", faint=0.0),  # each minority group ~1.5 % of training
}
FAMILY_FIELDS = ("variant", "core", "faint")  # added with the family: dataset.json names them only when set

FAINT_SCALE = 0.6  # a faint object's size against a default one's: ~11-17 px across at 64 px
FAINT_CONTRAST = 0.3  # share of its colour's difference from the background mean that a faint object keeps
FAINT_STREAM = 1  # faintness is drawn from its own RNG stream, so the other images are the default's exactly


@dataclass(frozen=True)
class SynthSpec:
    """Everything that determines the generated dataset; ``None`` means "the variant's" (:meth:`resolved`)."""

    n_train: int = option(2400, "training images")
    n_val: int = option(600, "validation images")
    n_test: int = option(1200, "test images")
    classes: int = option(2, f"number of classes (shapes or glyphs), 2-{len(SHAPES)}")
    corr: float | None = option(None, "P(place agrees with class) in train; val/test are independent "
                                      "(default: the variant's, 0.95; 0.97 for minority)")
    image_size: int = option(64, "image side in pixels")
    seed: int = option(0, "generator seed")
    variant: str = option("default", "preset of the harder family: mixed (faint objects in every class), "
                                     "glyphs (hand-drawn similar characters), minority (corr 0.97)",
                          choices=tuple(VARIANTS))
    core: str | None = option(None, "what a class is drawn as: shapes (polygons) or glyphs (hand-drawn "
                                    "strokes) (default: the variant's)", choices=tuple(CORES))
    faint: float | None = option(None, "share of each class's images whose object is small and low-contrast, "
                                       "so the model finds the background easier there (default: the "
                                       "variant's)")

    def resolved(self) -> SynthSpec:
        """This spec with every option left to the variant (``None``) filled in from its preset."""
        if self.variant not in VARIANTS:
            raise PipelineError(f"--variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        preset = VARIANTS[self.variant]
        return replace(self, corr=preset.corr if self.corr is None else self.corr,
                       core=preset.core if self.core is None else self.core,
                       faint=preset.faint if self.faint is None else self.faint)

    @property
    def class_names(self) -> list[str]:
        """The names of the classes drawn (shapes or glyphs)."""
        return list(CORES[self.resolved().core][: self.classes])


def generate(out: str | Path, spec: SynthSpec, progress: bool = True) -> Path:
    """Write the dataset to ``out`` (images/, masks/, metadata.csv, dataset.json); reuse it if identical."""
    spec = spec.resolved()
    _validate(spec)
    out = Path(out).expanduser().resolve()
    info_path, meta_path = out / "dataset.json", out / "metadata.csv"
    info = {"generator": "pipeline.core.synth", "spec": _recorded(spec), "class_names": spec.class_names,
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
            scale, contrast = _object_style(spec, index)
            image, mask = render(rng, y, place, spec.classes, spec.image_size, spec.core, scale, contrast)
            name = f"{index:05d}.png"
            Image.fromarray(image).save(out / "images" / name)
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / name)
            rows.append(f"images/{name},{y},{split},{place},masks/{name}")
    # metadata last: a generator killed half-way leaves no metadata.csv, so it is never mistaken for a dataset
    atomic_write_bytes(info_path, (json.dumps(info, indent=2) + "\n").encode())
    atomic_write_bytes(meta_path, ("\n".join(rows) + "\n").encode())
    return out


def _recorded(spec: SynthSpec) -> dict:
    """The resolved spec as dataset.json records it: the family's options only where they differ from the
    default's, so a default dataset's dataset.json is the one written before the family existed and datasets
    already on disk are reused rather than regenerated."""
    baseline = asdict(SynthSpec().resolved())
    return {k: v for k, v in asdict(spec).items() if k not in FAMILY_FIELDS or v != baseline[k]}


def is_faint(spec: SynthSpec, index: int) -> bool:
    """Whether image ``index`` has a small, low-contrast object (drawn apart from the image's own stream)."""
    faint = spec.resolved().faint
    return bool(faint) and bool(np.random.default_rng([spec.seed, index, FAINT_STREAM]).random() < faint)


def _object_style(spec: SynthSpec, index: int) -> tuple[float, float]:
    """(size factor, contrast) of image ``index``'s object: the default's, or faint (``--faint``)."""
    return (FAINT_SCALE, FAINT_CONTRAST) if is_faint(spec, index) else (1.0, 1.0)


def _validate(spec: SynthSpec) -> None:
    if not 2 <= spec.classes <= len(SHAPES):
        raise PipelineError(f"--classes must be between 2 and {len(SHAPES)}, got {spec.classes}")
    if not 0.0 <= spec.corr <= 1.0:
        raise PipelineError(f"--corr must be a probability in [0, 1], got {spec.corr}")
    if not 0.0 <= spec.faint <= 1.0:
        raise PipelineError(f"--faint must be a share in [0, 1], got {spec.faint}")
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


def render(rng: np.random.Generator, y: int, place: int, places: int, size: int, core: str = "shapes",
           scale: float = 1.0, contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One ``size x size`` RGB uint8 image and its boolean foreground mask.

    ``scale`` sizes the object; ``contrast`` < 1 pulls its colour towards the background's mean colour.
    """
    background = _background(rng, place, places, size)
    if core == "glyphs":
        mask = _glyph_mask(rng, GLYPHS[y], size, scale)
    else:
        mask = _shape_mask(rng, SHAPES[y], size, scale)
    hue = rng.random()  # the object's colour says nothing about its class
    colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 0.9), rng.uniform(0.55, 0.95)), np.float32)
    if contrast < 1.0:
        mean = background.reshape(-1, 3).mean(axis=0)
        colour = (mean + contrast * (colour - mean)).astype(np.float32)
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


def _shape_mask(rng: np.random.Generator, shape: str, size: int, scale: float = 1.0) -> np.ndarray:
    radius = size * rng.uniform(0.14, 0.22) * scale
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


GLYPH_SLANT = 0.35  # most shear either way: x moves by up to 35 % of the height, like hurried handwriting
GLYPH_WOBBLE = 0.05  # jitter of each stroke point, in glyph half-heights: a hand, not a ruler
MIN_STROKE_PX = 2  # thinner strokes vanish when the image is resized or blurred


def _glyph_mask(rng: np.random.Generator, glyph: str, size: int, scale: float = 1.0) -> np.ndarray:
    """A hand-drawn character: its strokes slanted, rotated, wobbled and drawn with a random pen width.

    The pose is drawn before the strokes' wobble, so two glyphs drawn from the same RNG state share their pose
    and differ only in what makes them different characters.
    """
    half_height = size * rng.uniform(0.17, 0.25) * scale
    width = half_height * rng.uniform(0.8, 1.2)
    slant = rng.uniform(-GLYPH_SLANT, GLYPH_SLANT)
    rotation = rng.uniform(-0.25, 0.25)
    pen = max(MIN_STROKE_PX, round(size * rng.uniform(0.045, 0.1) * scale))
    margin = 1.25 * half_height + pen
    cx, cy = rng.uniform(margin, size - margin, 2)
    cos, sin = math.cos(rotation), math.sin(rotation)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for stroke in _strokes(glyph):
        unit = np.asarray(stroke) + rng.normal(0.0, GLYPH_WOBBLE, (len(stroke), 2))
        u = (unit[:, 0] - slant * unit[:, 1]) * width  # negative y is up: a positive slant leans right
        v = unit[:, 1] * half_height
        points = [(cx + cos * a - sin * b, cy + sin * a + cos * b) for a, b in zip(u, v)]
        draw.line(points, fill=255, width=pen, joint="curve")
        for x, y in (points[0], points[-1]):  # round pen ends
            draw.ellipse((x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2), fill=255)
    return np.asarray(canvas) > 127


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float, steps: int = 8) -> list:
    """Points along an elliptical arc, angles in degrees, clockwise on screen (y grows downwards)."""
    angles = np.radians(np.linspace(start, end, steps + 1))
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


def _strokes(glyph: str) -> list[list[tuple[float, float]]]:
    """A glyph's pen strokes in a box x in [-0.5, 0.5], y in [-1, 1] (downwards), as point lists."""
    if glyph == "one":  # a flag and a long down stroke
        return [[(-0.35, -0.5), (0.05, -0.9), (0.05, 0.9)]]
    if glyph == "seven":  # a bar and a long down stroke
        return [[(-0.45, -0.9), (0.45, -0.9), (-0.05, 0.9)]]
    if glyph == "four":
        return [[(0.2, 0.9), (0.2, -0.9), (-0.45, 0.35), (0.45, 0.35)]]
    if glyph == "two":
        return [_arc(0.0, -0.45, 0.42, 0.45, 190, 400) + [(-0.45, 0.9), (0.45, 0.9)]]
    if glyph == "five":
        return [[(0.4, -0.9), (-0.35, -0.9), (-0.4, -0.1)] + _arc(0.0, 0.4, 0.45, 0.5, -120, 150)]
    # three: two bowls, open to the left
    return [_arc(0.0, -0.48, 0.4, 0.42, 200, 450), _arc(0.0, 0.45, 0.45, 0.45, -90, 160)]
