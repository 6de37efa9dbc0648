"""Counterfactual training images (ASPIRE, Ghosh et al.): each class shown *without* the cue it is confounded with.

ASPIRE edits images with a language-guided editor and a personalised text-to-image model. The default editor
here needs no weights: it keeps the object of an image whose object is located (an annotator's box, or the
high-CAM region of attention judged core, cut to the object's outline by colour with GrabCut) and replaces the
rest (:mod:`pipeline.slim.regions`) with the background of located images of the *other* classes that the
reference model surely reads as their class, taken a margin away from *their* object. The class no longer agrees
with the background: exactly the images the minority groups are short of. A class whose object is located
nowhere, or whose other classes' objects are, gets none (draw boxes to give it some).

``retrain --augment counterfactual`` adds them to the training images of every mode. Annotators can check a
sample in Label Studio ("does this still show a <class>?", :mod:`pipeline.labelstudio.verify`); an image they
reject is never trained on. A generative editor plugs in through ``--editor module:Class`` (see
:class:`Editor` and docs/counterfactuals.md); nothing is downloaded.

The images are a dataset folder of their own (``RUN/counterfactuals``: metadata.csv, images/, dataset.json), so
the loaders read them like any dataset. Each image's ``key`` is the digest of its bytes: answers stay attached
to exactly the picture that was checked, across regenerations.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import itertools
import json
import logging
import math
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.config import AUTO_COUNTERFACTUAL_MODES, RunConfig, fingerprint
from pipeline.core.data import TRAIN, ImageSet, Sample, load_dataset, load_rgb, resolve_image_size
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, atomic_write_csv, atomic_write_json
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.slim.propagate import propagate_run
from pipeline.slim.regions import SpuriousRegions, run_regions

log = logging.getLogger(__name__)
STAGE = "counterfactuals"
# backgrounds tried per image, in order, until its spurious region is filled: one core-judged image of another
# class covers most of it (its object is the only hole), a spurious-judged one only where its model looked
BACKGROUNDS_PER_IMAGE = 8
# a background image's usable pixels stop this share of the side short of its estimated object (4 px at 64 px):
# the CAM region's edge is blurry, and without the margin rims of the other class's object were pasted in
BACKGROUND_MARGIN = 1 / 16
# a background image's class must be what the reference model predicts for it with at least this probability
# (:func:`background_rows`): its own class's cue, not a minority image's borrowed one
BACKGROUND_MIN_CONFIDENCE = 0.9
MIN_FILLED = 0.5  # share of an image's region its backgrounds must fill: below it, the image is mostly itself
ATTEMPTS = 4  # candidates tried per image wanted before a class settles for fewer
MIN_REGION = 0.02  # share of the image a region must cover to be worth replacing (flat maps localise nothing)
# GrabCut's rounds of colour-model fitting when the kept region is cut down to the object; OpenCV's own example
# uses 5, and more change nothing measurable at these sizes
GRABCUT_ITERATIONS = 5
# a cut that keeps less than this share of the region has not found the object (object and background alike in
# colour, or an attended region that misses it): that donor lends nothing (:func:`object_pixels`)
MIN_OBJECT_SHARE = 0.05
# what the kept region's cut is: part of the images' stamp, so a changed cut remakes them
OBJECT_CUT = f"grabcut-{GRABCUT_ITERATIONS}"
FILL = "mirrors"  # how a background's own object hole is filled (:func:`mirrors`): in the stamp likewise
# which images lend their object and their background (:func:`object_pixels`, :func:`background_rows`):
# in the stamp likewise
DONORS = "cut-located-sure-backgrounds"
COLUMNS = ("img_filename", "y", "split", "key", "donor", "backgrounds", "filled", "source")


class NoCounterfactuals(PipelineError):
    """Not one counterfactual could be made: an error where they were asked for, ``none`` for ``auto``."""


@dataclass(frozen=True)
class Background:
    """An image of another class and the pixels of it that are background (its likely-spurious region)."""

    rgb: np.ndarray  # (H, W, 3) float in [0, 1]
    usable: np.ndarray  # (H, W) bool


class Editor(Protocol):
    """What generates a counterfactual: the extension point for generative editors.

    ``setup()`` loads whatever the editor needs (weights from a local path the user configured: never a
    download); ``edit`` returns the image with ``replace`` (True: the likely-spurious pixels) changed so the
    class's cue is gone, e.g. inpainted with the other classes' backgrounds as reference. ``class_name`` is the
    image's class, for a text prompt.
    """

    name: str

    def setup(self) -> None: ...

    def edit(self, rgb: np.ndarray, replace: np.ndarray, backgrounds: Sequence[Background],
             class_name: str) -> np.ndarray: ...


class CompositeEditor:
    """The default editor: each replaced pixel from the first background that has background there (each image
    comes with its mirror images, :func:`mirrors`); pixels no background covers keep their own value."""

    name = "composite"

    def setup(self) -> None:
        """Nothing to load."""

    def edit(self, rgb: np.ndarray, replace: np.ndarray, backgrounds: Sequence[Background],
             class_name: str) -> np.ndarray:
        out = rgb.copy()
        todo = replace.copy()
        for background in backgrounds:
            take = todo & background.usable
            out[take] = background.rgb[take]
            todo &= ~take
        return out


def load_editor(spec: str | None) -> Editor:
    """``None``: :class:`CompositeEditor`; ``module:Class``: that class, constructed with no arguments (its
    settings from its own environment or files), then ``setup()``."""
    if not spec:
        editor: Editor = CompositeEditor()
    else:
        module_name, _, class_name = spec.partition(":")
        try:
            editor = getattr(importlib.import_module(module_name), class_name)()
        except (ImportError, AttributeError, ValueError) as exc:
            raise PipelineError(f"--editor {spec!r} cannot be loaded ({exc}); give an importable module:Class") from None
    editor.setup()
    return editor


@dataclass(frozen=True)
class Plan:
    """One counterfactual to make: ``donor``'s core region kept, ``backgrounds`` (other classes) filling the rest."""

    y: int
    donor: int  # image id
    backgrounds: tuple[int, ...]  # image ids, in fill order
    flips: tuple[bool, ...]  # whether each background is mirrored left-right
    source: str  # the donor's region rule: box or low_cam (attention judged core)


def located_rows(arrays: AttentionArrays, regions: SpuriousRegions, rows: np.ndarray) -> np.ndarray:
    """Those of ``rows`` whose object is located: a box, or attention judged core (the high-CAM region is the
    object). A spurious-judged image's attended region is the cue but may hold part of the object too."""
    return rows[[regions.source(int(arrays.index[r])) != "high_cam" for r in rows]]


def donor_rows(arrays: AttentionArrays, regions: SpuriousRegions, y: int, size: int) -> np.ndarray:
    """Images of class ``y`` to keep the core of: located ones whose replaced region is not negligible.

    None for a class all of whose attention was judged spurious and that has no boxes: replacing its attended
    region would erase the object as often as the cue (seen on the synthetic default's triangles).
    """
    located = located_rows(arrays, regions, arrays.for_class(y))
    return np.array([r for r in located if regions(int(arrays.index[r]), size).mean() >= MIN_REGION], dtype=int)


def background_rows(arrays: AttentionArrays, regions: SpuriousRegions, y: int) -> np.ndarray:
    """Images of the other classes to take ``y``'s backgrounds from: those whose object is located (a box, or
    attention judged core) and whose cue the reference model reads as their own class (right, with
    ``BACKGROUND_MIN_CONFIDENCE``); every located one where the model is sure of none (a weak reference model).
    Empty where none is located: then ``y`` gets no counterfactuals.

    Why located: a background lends everything but its object, so where the object is not known it is lent too.
    An image whose attention was judged spurious has only its attended region to give, and on the synthetic
    family that region held 23-26 % of the object (`default`, `minority` triangles) and 49-72 % (`glyphs`): the
    other class's shape, pasted into the image labelled this class (one seed's `glyphs` fell 19 points below
    SLIM). Located backgrounds lent 0-2 %.

    Why the confidence: located images are the answered and core-judged ones, and both over-represent the
    minority groups (sampling isolates them; attention finds the object where the background disagrees): on the
    synthetic family 29-66 % of a class's located images showed the *other* class's background, so up to 39 % of
    the counterfactuals were pasted back onto their own class's cue. The reference model is wrong or unsure on
    most minority images; right and sure, 0-6 % of them are.
    """
    located = located_rows(arrays, regions, np.flatnonzero(arrays.y != y))
    right = arrays.pred[located] == arrays.y[located]
    sure = located[right & (arrays.confidence[located] >= BACKGROUND_MIN_CONFIDENCE)]
    return sure if len(sure) else located


@dataclass(frozen=True)
class ClassSources:
    """Where class ``y``'s counterfactuals come from: its donors (:func:`donor_rows`) and the other classes'
    images that lend backgrounds (:func:`background_rows`); both rows of the attention arrays."""

    y: int
    donors: np.ndarray
    backgrounds: np.ndarray

    @property
    def makeable(self) -> bool:
        return bool(len(self.donors) and len(self.backgrounds))


def class_sources(arrays: AttentionArrays, regions: SpuriousRegions, size: int) -> list[ClassSources]:
    """Every class's sources, computed once: ``--augment auto``'s choice and :func:`plan` read the same lists
    (each donor's region is upsampled to ``size`` to be measured, a pass over every located image)."""
    return [ClassSources(int(y), donor_rows(arrays, regions, y, size), background_rows(arrays, regions, y))
            for y in arrays.classes]


@dataclass(frozen=True)
class ClassPlan:
    """How many counterfactuals class ``y`` gets, and an endless seeded stream of candidates to make them from."""

    y: int
    target: int
    candidates: Iterator[Plan]


def candidates(arrays: AttentionArrays, regions: SpuriousRegions, sources: ClassSources,
               rng: np.random.Generator) -> Iterator[Plan]:
    """The class's donors cycled in a seeded random order, each with ``BACKGROUNDS_PER_IMAGE`` random images of
    its backgrounds (all of them where there are fewer)."""
    order = rng.permutation(sources.donors)
    for i in itertools.count():
        donor = int(arrays.index[order[i % len(order)]])
        picks = rng.choice(sources.backgrounds, size=min(BACKGROUNDS_PER_IMAGE, len(sources.backgrounds)),
                           replace=False)
        yield Plan(sources.y, donor, tuple(int(arrays.index[r]) for r in picks),
                   tuple(bool(f) for f in rng.random(len(picks)) < 0.5), regions.source(donor))


def plan(arrays: AttentionArrays, regions: SpuriousRegions, sources: Sequence[ClassSources], share: float,
         seed: int) -> list[ClassPlan]:
    """``ceil(share x class size)`` counterfactuals for every class that has a donor and clean backgrounds."""
    if not 0.0 < share <= 1.0:
        raise PipelineError(f"--counterfactual-share must be in (0, 1], got {share}")
    if len(arrays.classes) < 2:
        raise PipelineError("counterfactuals need at least two classes: backgrounds come from the other classes")
    rng = np.random.default_rng(seed)
    plans = []
    for class_ in sources:
        name = arrays.class_names[class_.y]
        if not len(class_.donors):
            log.warning("class %s: no counterfactuals, its object is located in no image (no box, no attention "
                        "judged core); draw boxes on a few of its images in Label Studio", name)
        elif not len(class_.backgrounds):
            log.warning("class %s: no counterfactuals, no image of the other classes has its object located (no "
                        "box, no attention judged core), so none can lend a background without its object; draw "
                        "boxes on a few images of %s in Label Studio",
                        name, ", ".join(arrays.class_names[c] for c in arrays.classes if c != class_.y))
        else:
            plans.append(ClassPlan(class_.y, math.ceil(share * len(arrays.for_class(class_.y))),
                                   candidates(arrays, regions, class_, rng)))
    return plans


@dataclass(frozen=True)
class Made:
    """A generated image: its PNG bytes and how much of the region the backgrounds filled."""

    png: bytes
    filled: float


def background_pixels(regions: SpuriousRegions, image_id: int, size: int) -> np.ndarray:
    """Where ``image_id`` surely shows background: its likely-spurious region, ``BACKGROUND_MARGIN`` inside,
    each hole in it (its object, away from the edges) widened to the hole's bounding box.

    Why the box: the hole is filled from another picture, and a hole in the object's own outline drew that
    outline, the other class's shape, into the counterfactual (disc-shaped patches in triangle images). A box is
    the same shape for every class.
    """
    usable = ndimage.binary_erosion(regions(image_id, size), iterations=max(1, round(size * BACKGROUND_MARGIN)),
                                    border_value=1)
    holes, _ = ndimage.label(~usable)
    for rows, columns in ndimage.find_objects(holes):
        if rows.start > 0 and columns.start > 0 and rows.stop < size and columns.stop < size:
            usable[rows, columns] = False
    return usable


def object_pixels(rgb: np.ndarray, region: np.ndarray) -> np.ndarray | None:
    """The part of ``region`` (where the donor's object is: a box, or the high-CAM region of attention judged
    core) that shows the object, cut by colour with GrabCut (OpenCV); ``None`` where the cut finds no object.

    Why: a box or an attended region is not the object's outline. Around a disc a box is a third background,
    around a stroke glyph two thirds (synthetic family, masks used for this measurement only); pasted along, that
    background carries the donor's own cue into the image meant to lack it. The pixels outside ``region`` are
    the background GrabCut learns from; inside, it keeps what looks like the object. Measured on 300 boxed
    images per set: background in the kept region 37 -> 1 % (default), 61 -> 6 % (glyphs), the whole object
    kept. Seeded, so the same image gives the same bytes (its key).

    Why ``None`` rather than the whole region: where the cut fails it keeps nothing at all, and the region kept
    whole was measured at 54-71 % background on `glyphs` and `mixed` (attended regions holding a quarter to half
    of the object): the donor's own cue, pasted along.
    """
    if region.all() or not region.any():
        return None
    labels = np.where(region, cv2.GC_PR_FGD, cv2.GC_BGD).astype(np.uint8)
    image = np.ascontiguousarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
    cv2.setRNGSeed(0)
    cv2.grabCut(image, labels, None, np.zeros((1, 65)), np.zeros((1, 65)), GRABCUT_ITERATIONS,
                cv2.GC_INIT_WITH_MASK)
    kept = region & np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD))
    return kept if kept.sum() >= MIN_OBJECT_SHARE * region.sum() else None


def mirrors(background: Background) -> list[Background]:
    """``background`` and its left-right, up-down and half-turn mirror images, in that fill order.

    Why: a background image's own object is a hole in what it can fill. Filled from the next image, the hole
    came out as the other class's object outline in a second texture (disc-shaped patches in triangle
    counterfactuals): a shape cue of the wrong class. A mirror image of the same picture covers the hole with the
    same texture wherever the object is off-centre.
    """
    return [Background(background.rgb[::rows, ::columns], background.usable[::rows, ::columns])
            for rows, columns in ((1, 1), (1, -1), (-1, 1), (-1, -1))]


def make(plan_: Plan, image_set: ImageSet, regions: SpuriousRegions, editor: Editor, size: int,
         cut: bool = True) -> Made | None:
    """Render one plan with ``editor``: everything but the donor's object (:func:`object_pixels`) replaced;
    ``None`` where no object can be cut from the donor. ``cut=False`` keeps the whole located region (what the
    benchmarks compare the cut against)."""
    rgb = load_rgb(image_set.root / image_set.samples[plan_.donor].filename, size)
    located = ~regions(plan_.donor, size)
    kept = object_pixels(rgb, located) if cut else located
    if kept is None:
        return None
    replace = ~kept
    backgrounds = []
    for image_id, flip in zip(plan_.backgrounds, plan_.flips):
        other = load_rgb(image_set.root / image_set.samples[image_id].filename, size)
        usable = background_pixels(regions, image_id, size)
        backgrounds += mirrors(Background(other[:, ::-1] if flip else other, usable[:, ::-1] if flip else usable))
    edited = editor.edit(rgb, replace, backgrounds, image_set.class_names[plan_.y])
    covered = np.zeros_like(replace)
    for background in backgrounds:
        covered |= background.usable
    buffer = io.BytesIO()
    Image.fromarray((np.clip(edited, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return Made(buffer.getvalue(), float((replace & covered).sum() / max(int(replace.sum()), 1)))


@dataclass(frozen=True)
class Counterfactuals:
    """The run's generated images that may be trained on (rejected ones left out), as a loadable dataset."""

    image_set: ImageSet
    samples: list[Sample]
    keys: list[str]
    rejected: int

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.y for s in self.samples], dtype=int)

    def digest(self) -> str:
        """Which images these are: part of a retraining's resume key."""
        return hashlib.sha256("\n".join(self.keys).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.samples)


def counterfactual_stamp(run: Run, regions: SpuriousRegions, config: RunConfig, size: int) -> str:
    """What the images depend on: the regions (maps, verdicts, boxes), the settings and the editor."""
    settings = config.retrain
    return fingerprint(STAGE, regions.digest(), settings.counterfactual_share, settings.editor or "composite",
                       settings.seed, size, run.stage_fingerprint("embed"), OBJECT_CUT, FILL, DONORS)


def write_counterfactuals(out: Path, plans: Sequence[ClassPlan], image_set: ImageSet, regions: SpuriousRegions,
                          editor: Editor, size: int, cut: bool = True) -> int:
    """Render each class's ``target`` images into the dataset folder ``out`` (replaced whole: written beside it,
    then swapped in, so a kill leaves either set complete); returns how many images it holds.

    A candidate whose donor has no object to cut, or whose backgrounds fill less than ``MIN_FILLED`` of its
    region, is skipped (it would mostly be the original image); a class gives up after ``ATTEMPTS`` candidates
    per image wanted.
    """
    staging = out.with_name(out.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    rows = []
    for class_plan in plans:
        made_here = 0
        for plan_ in itertools.islice(class_plan.candidates, ATTEMPTS * class_plan.target):
            made = make(plan_, image_set, regions, editor, size, cut)
            if made is None or made.filled < MIN_FILLED:
                continue
            key = hashlib.sha256(made.png).hexdigest()[:20]
            filename = f"images/{key}.png"
            atomic_write_bytes(staging / filename, made.png)
            rows.append((filename, plan_.y, TRAIN, key, plan_.donor, " ".join(map(str, plan_.backgrounds)),
                         f"{made.filled:.4f}", plan_.source))
            made_here += 1
            if made_here == class_plan.target:
                break
        if made_here < class_plan.target:
            log.warning("class %s: %d of %d counterfactuals (its located regions rarely show an object to cut, "
                        "or the other classes' backgrounds rarely cover them; boxes on a few of its images help)",
                        image_set.class_names[class_plan.y], made_here, class_plan.target)
    if not rows:
        raise NoCounterfactuals("no counterfactual could be made: no class has both an image whose object is "
                                "located and can be cut out and other classes' located images to lend backgrounds; "
                                "draw boxes around the object on some images of every class in Label Studio")
    atomic_write_csv(staging / "metadata.csv", COLUMNS, rows)
    atomic_write_json(staging / "dataset.json", {"class_names": list(image_set.class_names), "image_size": size,
                                                 "editor": editor.name, "counterfactual_of": str(image_set.root)})
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    log.info("%d counterfactual images (%s) in %s; backgrounds filled %.1f%% of the replaced regions", len(rows),
             ", ".join(f"{name} {sum(r[1] == y for r in rows)}" for y, name in enumerate(image_set.class_names)),
             out, 100 * np.mean([float(r[6]) for r in rows]))
    return len(rows)


def auto_augmentation(arrays: AttentionArrays, sources: Sequence[ClassSources]) -> str:
    """``--augment auto``'s choice: ``counterfactual`` where at least one class can have them (its object located
    in some image, and some other class's in some of theirs: :func:`plan`'s conditions), else ``none``.

    Why whenever they can be made: measured over the synthetic family, five seeds each (BENCHMARKS.md,
    "Counterfactuals from located backgrounds only"), they lead SLIM alone on the family mean with boxes on
    every answered image (+7.0 +- 2.1 points of worst-group accuracy), on half (+6.5 +- 2.0) and on none
    (+1.6 +- 1.2, every seed up; core accuracy +2.9 +- 3.5): without boxes mostly on the set whose classes are
    attended partly on the object, and on a class with no located background they add nothing. The earlier rule,
    which let unlocated images lend backgrounds, lost 19 points on one set-seed without boxes; with only located
    ones the worst set-seed is 2.8 below SLIM.
    """
    makeable = [arrays.class_names[class_.y] for class_ in sources if class_.makeable]
    chosen = "counterfactual" if makeable else "none"
    log.info("--augment auto: %s (%s)", chosen,
             f"for {', '.join(makeable)}" if makeable else
             "no class has both a located object and other classes' located images to lend backgrounds: no box, "
             "no attention judged core; boxes drawn on a few images of every class make them")
    return chosen


@dataclass(frozen=True)
class RunSources:
    """What a run's counterfactuals are made from, gathered once per ``retrain``: the ``auto`` choice and the
    generation read the same regions and class sources."""

    arrays: AttentionArrays
    regions: SpuriousRegions  # from the run's propagated verdicts and stored boxes
    image_set: ImageSet
    size: int

    @cached_property
    def classes(self) -> list[ClassSources]:
        return class_sources(self.arrays, self.regions, self.size)


def gather_sources(run: Run, config: RunConfig, arrays: AttentionArrays | None = None) -> RunSources:
    """The run's :class:`RunSources` (``arrays`` where the caller has them loaded already)."""
    if arrays is None:
        arrays = AttentionArrays.load(run.require(run.attention_path, "embed --run RUN"))
    regions = run_regions(run, arrays, propagate_run(run, config)[0].score)
    image_set = load_dataset(config.data.root, run.manifest_path)
    return RunSources(arrays, regions, image_set, resolve_image_size(image_set, config.data.image_size))


def augmentation(run: Run, config: RunConfig, arrays: AttentionArrays) -> tuple[str, Counterfactuals | None]:
    """What ``retrain`` adds and the images: ``none``/``counterfactual`` as given, ``auto`` by
    :func:`auto_augmentation` on the run's regions (its propagated verdicts and boxes), and ``none`` after all
    where not one image could be made (every donor's cut failed, or no background filled enough).

    ``auto`` adds them only in ``AUTO_COUNTERFACTUAL_MODES``. Why: measured over the synthetic family
    (BENCHMARKS.md, "Counterfactuals in the other modes"), they help where the model learns from every image
    (``fresh``, ``corm``) or from a share of them chosen on validation (``low-spuriosity``), and cost worst-group
    and mean accuracy where it learns from the curated subset (``last-layer``, ``full``), which they outnumber
    five to one.
    """
    requested, mode = config.retrain.augment, config.retrain.mode
    if requested == "none":
        return "none", None
    if mode not in AUTO_COUNTERFACTUAL_MODES:
        helped = ", ".join(AUTO_COUNTERFACTUAL_MODES)
        if requested == "auto":
            log.info("--augment auto: none (in --mode %s counterfactuals were measured to lower worst-group "
                     "accuracy; they help in %s)", mode, helped)
            return "none", None
        log.warning("--augment counterfactual with --mode %s: on the synthetic family this lowered worst-group "
                    "accuracy (BENCHMARKS.md, \"Counterfactuals in the other modes\"); they help in %s", mode, helped)
    sources = gather_sources(run, config, arrays)
    if requested == "auto" and auto_augmentation(arrays, sources.classes) == "none":
        return "none", None
    try:
        return "counterfactual", load_counterfactuals(run, config, sources)
    except NoCounterfactuals as error:
        if requested != "auto":
            raise
        log.warning("--augment auto: none after all (%s)", error)
        return "none", None


def generate_run(run: Run, config: RunConfig, force: bool = False, sources: RunSources | None = None) -> Path:
    """The ``counterfactuals`` stage: (re)make ``RUN/counterfactuals`` from the run's regions unless current
    (``sources`` where the caller gathered them already)."""
    if sources is None:
        sources = gather_sources(run, config)
    stamp = counterfactual_stamp(run, sources.regions, config, sources.size)
    if not force and run.is_done(STAGE, stamp, [run.counterfactual_dir / "metadata.csv"]):
        log.info("reusing %s (same regions and settings; --force remakes them)", run.counterfactual_dir)
        return run.counterfactual_dir
    plans = plan(sources.arrays, sources.regions, sources.classes, config.retrain.counterfactual_share,
                 config.retrain.seed)
    write_counterfactuals(run.counterfactual_dir, plans, sources.image_set, sources.regions,
                          load_editor(config.retrain.editor), sources.size)
    run.mark_done(STAGE, stamp)
    return run.counterfactual_dir


def manifest(run: Run) -> list[dict[str, str]]:
    """The rows of ``RUN/counterfactuals/metadata.csv`` (key, class, donor, backgrounds, filled share, source)."""
    return run.load_csv(run.counterfactual_dir / "metadata.csv", "counterfactuals --run RUN")


def rejected_keys(run: Run) -> set[str]:
    """Keys of the counterfactuals an annotator said no longer show their class."""
    if not run.labels_path.exists():
        return set()
    store = AnnotationStore(run.labels_path)
    try:
        return {key for key, accepted in store.counterfactual_checks().items() if not accepted}
    finally:
        store.close()


def read_counterfactuals(folder: Path, rejected: set[str] = frozenset()) -> Counterfactuals:
    """The counterfactual dataset in ``folder``, without the ``rejected`` keys (a class may have none)."""
    image_set = load_dataset(folder, every_class_trained=False)
    with (folder / "metadata.csv").open(newline="") as handle:
        keys = [row["key"] for row in csv.DictReader(handle)]
    kept = [(sample, key) for sample, key in zip(image_set.samples, keys) if key not in rejected]
    if len(kept) < len(keys):
        log.info("%d counterfactual(s) rejected by annotators are left out", len(keys) - len(kept))
    return Counterfactuals(image_set, [s for s, _ in kept], [k for _, k in kept], len(keys) - len(kept))


def load_counterfactuals(run: Run, config: RunConfig, sources: RunSources | None = None) -> Counterfactuals:
    """The run's counterfactuals (made or remade when stale), without the ones annotators rejected."""
    return read_counterfactuals(generate_run(run, config, sources=sources), rejected_keys(run))


def describe(run: Run) -> dict:
    """What the report and the CLI say about the run's counterfactuals: counts per class and source, checks."""
    rows = manifest(run)
    names = json.loads((run.counterfactual_dir / "dataset.json").read_text())["class_names"]
    rejected = rejected_keys(run)
    return {"images": len(rows), "rejected": sum(r["key"] in rejected for r in rows),
            "per_class": {name: sum(int(r["y"]) == y for r in rows) for y, name in enumerate(names)},
            "sources": {s: sum(r["source"] == s for r in rows) for s in sorted({r["source"] for r in rows})},
            "filled": float(np.mean([float(r["filled"]) for r in rows])) if rows else 0.0}
