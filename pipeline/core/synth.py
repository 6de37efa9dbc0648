"""The embedded default dataset (a Waterbirds-like generator that needs no download) and its harder family.

Each image is a shape (the *core* feature: its class) on a textured background of one of several *places*
(the *spurious* feature). In the training split the place agrees with the class with probability ``corr``;
in val and test the place is drawn independently, so a model that learned the background fails on the
minority groups exactly as Waterbirds' ERM does. Every image comes with its true foreground mask.

Defaults tuned on one dataset need not carry over, so ``--variant`` names a family of harder sets, each a
preset of orthogonal options (any of which can also be given on its own):

* ``mixed``: ``--faint`` and ``--bold``: a share of each class's images has a small, low-contrast object, and
  a share of every other class's images a large, high-contrast, dark-rimmed one, so the reference model
  attends to the object in some images of every class and to the background in others;
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
from PIL import Image, ImageDraw, ImageFilter
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
    """What a ``--variant`` preset sets: the values ``corr``, ``core``, ``faint`` and ``bold`` take when not
    given."""

    corr: float
    core: str
    faint: float
    bold: float = 0.0


# Each preset changes one kind of difficulty against the default, so a result that holds on one and not on
# another says which kind of difficulty broke it. Values calibrated with benchmarks/calibrate.py
# (BENCHMARKS.md).
VARIANTS = {
    "default": Variant(corr=0.95, core="shapes", faint=0.0),
    # 25 % faint in every class, 40 % bold in every other: ERM attends to the object (AIoU >= 0.5) on 61-69 %
    # of discs (81-90 % of clear ones, 7-11 % of faint ones) and 42-44 % of triangles (97-100 % of bold ones,
    # 3-11 % of clear ones, no faint one), seeds 0 and 1; without bold objects nearly every triangle was on the
    # background. 30-40 % faint left ERM's worst group at corr 0.5 at 89-91 % (faint discs are its errors)
    "mixed": Variant(corr=0.95, core="shapes", faint=0.25, bold=0.4),
    "glyphs": Variant(corr=0.95, core="glyphs", faint=0.0),
    "minority": Variant(corr=0.97, core="shapes", faint=0.0),  # each minority group ~1.5 % of training
}
FAMILY_FIELDS = ("variant", "core", "faint", "bold")  # added with the family: dataset.json names them if set

FAINT_SCALE = 0.6  # a faint object's size against a default one's: ~11-17 px across at 64 px
FAINT_CONTRAST = 0.3  # share of its colour's difference from the background mean that a faint object keeps
# the largest that still fits a glyph: at the top of its range, 1.25 half-heights plus pen are half the image
BOLD_SCALE = 1.2
BOLD_CONTRAST = 1.5  # a bold object's colour is pushed this far from the background mean (then clipped)
BOLD_OUTLINE_PX = 2  # width of a bold object's dark rim (inside its mask): an edge no background has
OUTLINE_SHADE = 0.2  # the rim is the object's own colour this dark, so its hue says nothing of the class
# an image's style (faint, bold or clear) is drawn from its own RNG stream, so the other images are the
# default's exactly; one draw decides both, so faint and bold are exclusive and adding bold objects leaves the
# faint ones as they were
STYLE_STREAM = 1


@dataclass(frozen=True)
class Style:
    """How an object is drawn: its size factor, its contrast against the background and its rim's width."""

    scale: float = 1.0
    contrast: float = 1.0
    outline: int = 0


STYLES = {"clear": Style(), "faint": Style(FAINT_SCALE, FAINT_CONTRAST),
          "bold": Style(BOLD_SCALE, BOLD_CONTRAST, BOLD_OUTLINE_PX)}


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
    variant: str = option("default", "preset of the harder family: mixed (faint objects in every class, bold "
                                     "ones in every other), glyphs (hand-drawn similar characters), minority "
                                     "(corr 0.97)",
                          choices=tuple(VARIANTS))
    core: str | None = option(None, "what a class is drawn as: shapes (polygons) or glyphs (hand-drawn "
                                    "strokes) (default: the variant's)", choices=tuple(CORES))
    faint: float | None = option(None, "share of each class's images whose object is small and low-contrast, "
                                       "so the model finds the background easier there (default: the "
                                       "variant's)")
    bold: float | None = option(None, "share of every other class's images (the second, fourth, ...) "
                                      "whose object is large, high-contrast and dark-rimmed, so the model "
                                      "attends to the object there (default: the variant's)")

    def resolved(self) -> SynthSpec:
        """This spec with every option left to the variant (``None``) filled in from its preset."""
        if self.variant not in VARIANTS:
            raise PipelineError(f"--variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        preset = VARIANTS[self.variant]
        return replace(self, corr=preset.corr if self.corr is None else self.corr,
                       core=preset.core if self.core is None else self.core,
                       faint=preset.faint if self.faint is None else self.faint,
                       bold=preset.bold if self.bold is None else self.bold)

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
            image, mask = render(rng, y, place, spec.classes, spec.image_size, spec.core,
                                 STYLES[object_style(spec, index, y)])
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


def object_style(spec: SynthSpec, index: int, y: int) -> str:
    """The name in :data:`STYLES` of the style of image ``index`` (of class ``y``): faint (``--faint``), bold
    (``--bold``, in a class that carries it) or clear.

    Drawn apart from the image's own stream; one uniform draw is cut into a faint share and a bold share after
    it, so a faint image stays the same whatever the bold share."""
    spec = spec.resolved()
    if not spec.faint and not spec.bold:
        return "clear"
    draw = np.random.default_rng([spec.seed, index, STYLE_STREAM]).random()
    if draw < spec.faint:
        return "faint"
    return "bold" if draw < spec.faint + spec.bold and carries_bold(y) else "clear"


def carries_bold(y: int) -> bool:
    """Whether class ``y`` has bold objects: every other class (the second, the fourth, ...).

    A rim seen in every class says nothing about the class, and the two-class reference model tells one
    class by its object and the other by the background (with a linear head on pooled features one class's
    GradCAM is about the other's negative): 30 % bold objects in both classes left 90 % of the bold triangles'
    attention on the background (seed 0). A rim only the second class carries is evidence for it that lies on
    its object."""
    return y % 2 == 1


def _validate(spec: SynthSpec) -> None:
    if not 2 <= spec.classes <= len(SHAPES):
        raise PipelineError(f"--classes must be between 2 and {len(SHAPES)}, got {spec.classes}")
    if not 0.0 <= spec.corr <= 1.0:
        raise PipelineError(f"--corr must be a probability in [0, 1], got {spec.corr}")
    if not 0.0 <= spec.faint <= 1.0:
        raise PipelineError(f"--faint must be a share in [0, 1], got {spec.faint}")
    if not 0.0 <= spec.bold <= 1.0 - spec.faint:
        raise PipelineError(f"--bold must be a share in [0, 1 - faint] (an object is faint or bold, not "
                            f"both), got {spec.bold} with --faint {spec.faint}")
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
           style: Style = STYLES["clear"]) -> tuple[np.ndarray, np.ndarray]:
    """One ``size x size`` RGB uint8 image and its boolean foreground mask.

    The style's ``scale`` sizes the object; its ``contrast`` pulls the object's colour towards the
    background's mean colour (< 1) or pushes it away (> 1); its ``outline`` darkens a rim that wide inside the
    mask. None of them draws from ``rng``, so an image differs from its clear twin only in its object.
    """
    background = _background(rng, place, places, size)
    if core == "glyphs":
        mask = _glyph_mask(rng, GLYPHS[y], size, style.scale)
    else:
        mask = _shape_mask(rng, SHAPES[y], size, style.scale)
    hue = rng.random()  # the object's colour says nothing about its class
    colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 0.9), rng.uniform(0.55, 0.95)), np.float32)
    if style.contrast != 1.0:
        mean = background.reshape(-1, 3).mean(axis=0)
        colour = np.clip(mean + style.contrast * (colour - mean), 0.0, 1.0).astype(np.float32)
    shading = 0.85 + 0.15 * _noise_field(rng, size, cells=3)
    obj = colour[None, None, :] * shading[..., None]
    if style.outline:
        obj = np.where(_rim(mask, style.outline)[..., None], obj * OUTLINE_SHADE, obj)
    image = np.where(mask[..., None], obj, background)
    image = image + rng.normal(0.0, 0.03, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), mask


def _rim(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's pixels within ``width`` of its edge (the mask less its erosion by a square that wide)."""
    eroded = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * width + 1))
    return mask & ~(np.asarray(eroded) > 127)


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
