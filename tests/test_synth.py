"""The synthetic default and its harder family: deterministic, masks true to the objects, the correlation and
minority share they promise, the default's images unchanged by the family."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.core.data import TEST, TRAIN, load_dataset
from pipeline.core.errors import PipelineError
from pipeline.core.synth import (
    BOLD_OUTLINE_PX,
    GLYPHS,
    STYLES,
    VARIANTS,
    SynthSpec,
    _rim,
    carries_bold,
    generate,
    object_style,
    render,
)

HARDER = [name for name in VARIANTS if name != "default"]


def test_generation_is_deterministic(tmp_path: Path) -> None:
    spec = SynthSpec(n_train=12, n_val=4, n_test=4, image_size=32, seed=9)
    a, b = generate(tmp_path / "a", spec, progress=False), generate(tmp_path / "b", spec, progress=False)
    assert (a / "metadata.csv").read_text() == (b / "metadata.csv").read_text()
    for name in ("images/00000.png", "masks/00011.png", "images/00019.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    other = generate(tmp_path / "c", SynthSpec(n_train=12, n_val=4, n_test=4, image_size=32, seed=10), progress=False)
    assert (a / "images/00000.png").read_bytes() != (other / "images/00000.png").read_bytes()


def test_rerun_with_same_spec_reuses_the_dataset(tmp_path: Path) -> None:
    spec = SynthSpec(n_train=6, n_val=2, n_test=2, image_size=32)
    out = generate(tmp_path / "d", spec, progress=False)
    stamp = (out / "metadata.csv").stat().st_mtime_ns
    generate(out, spec, progress=False)
    assert (out / "metadata.csv").stat().st_mtime_ns == stamp


def test_mask_marks_exactly_the_object(tiny_data: Path) -> None:
    """Inside the mask one flat (shaded, noisy) colour; outside, the striped background texture."""
    image_set = load_dataset(tiny_data)
    for sample in image_set.samples[:20]:
        rgb = np.asarray(Image.open(tiny_data / sample.filename), np.float32)
        mask = np.asarray(Image.open(tiny_data / sample.mask_filename)) > 127
        assert 0.02 < mask.mean() < 0.35
        inside, outside = rgb[mask], rgb[~mask]
        assert inside.std(axis=0).mean() < 12 < outside.std(axis=0).mean()


def test_place_follows_class_with_corr_in_train_and_not_in_test(tmp_path: Path) -> None:
    out = generate(tmp_path / "c", SynthSpec(n_train=1000, n_val=10, n_test=1000, image_size=32, corr=0.9),
                   progress=False)
    image_set = load_dataset(out)
    agree_train = np.mean([s.place == s.y for s in image_set.split(TRAIN)])
    agree_test = np.mean([s.place == s.y for s in image_set.split(TEST)])
    assert 0.87 < agree_train < 0.93
    assert 0.44 < agree_test < 0.56


def test_more_classes_use_more_shapes_and_places(tmp_path: Path) -> None:
    out = generate(tmp_path / "m", SynthSpec(n_train=60, n_val=6, n_test=6, classes=4, image_size=32),
                   progress=False)
    image_set = load_dataset(out)
    assert image_set.class_names == ["disc", "triangle", "square", "star"]
    assert image_set.num_places == 4 and image_set.num_groups == 16


@pytest.mark.parametrize(
    "spec, message",
    [
        (SynthSpec(classes=1), "--classes"),
        (SynthSpec(corr=1.5), "--corr"),
        (SynthSpec(image_size=8), "--image-size"),
        (SynthSpec(n_val=1), "at least 2"),
        (SynthSpec(faint=1.5), "--faint"),
        (SynthSpec(faint=0.7, bold=0.5), "--bold"),
        (SynthSpec(variant="waterbirds"), "--variant"),
    ],
)
def test_bad_spec_is_refused(tmp_path: Path, spec: SynthSpec, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        generate(tmp_path / "x", spec, progress=False)
    assert not (tmp_path / "x" / "metadata.csv").exists()


def _file_size_limit() -> None:
    """In the child: a 1 kB file-size limit stands in for a full disk (writes past it fail with EFBIG)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # ignored dispositions survive exec
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))


def test_full_disk_while_generating_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "synth"
    done = subprocess.run([sys.executable, "-m", "pipeline", "synth", str(out), "--n-train", "4", "--n-val", "2",
                           "--n-test", "2", "--image-size", "64", "--quiet"], preexec_fn=_file_size_limit,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: no space left on device while writing {out} (EFBIG); free space and re-run"]
    assert not (out / "metadata.csv").exists()


def _digest(root: Path) -> str:
    """metadata.csv, dataset.json and every picture's pixels (decoded: another PNG encoder may pack them)."""
    digest = hashlib.sha256((root / "metadata.csv").read_bytes() + (root / "dataset.json").read_bytes())
    for folder in ("images", "masks"):
        for path in sorted((root / folder).iterdir()):
            pixels = np.asarray(Image.open(path))
            digest.update(f"{path.name}{pixels.shape}{pixels.dtype}".encode() + pixels.tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("spec, expected", [
    (SynthSpec(n_train=16, n_val=4, n_test=4),
     "33c74e30dd4ec78ed2ed6d9014f6b36150c5d080bab18025100177c62ba3b262"),
    (SynthSpec(n_train=12, n_val=3, n_test=3, classes=3, corr=0.8, image_size=32, seed=7),
     "847448cd30f304f44dcc4ae0fe4aec8234b9ec092c4faa2696cbd22a59abe933"),
])
def test_default_dataset_is_the_one_before_the_family(tmp_path: Path, spec: SynthSpec, expected: str) -> None:
    """Regression check: the digests were computed with the generator as it was before the harder variants
    were added (BENCHMARKS' default numbers were measured on those images); they must never change."""
    assert _digest(generate(tmp_path / "d", spec, progress=False)) == expected


@pytest.mark.parametrize("variant", HARDER)
def test_each_variant_generates_deterministically(tmp_path: Path, variant: str) -> None:
    spec = SynthSpec(n_train=24, n_val=4, n_test=4, image_size=32, seed=2, variant=variant)
    a, b = generate(tmp_path / "a", spec, progress=False), generate(tmp_path / "b", spec, progress=False)
    assert _digest(a) == _digest(b)
    default = generate(tmp_path / "default", SynthSpec(n_train=24, n_val=4, n_test=4, image_size=32, seed=2),
                       progress=False)
    assert _digest(a) != _digest(default)
    recorded = json.loads((a / "dataset.json").read_text())["spec"]
    assert recorded["variant"] == variant and recorded["corr"] == VARIANTS[variant].corr
    assert recorded.get("bold", 0.0) == VARIANTS[variant].bold  # named only where the variant sets it


def test_default_dataset_json_names_no_family_option(tmp_path: Path) -> None:
    """So datasets generated before the family are still recognised as current (and reused)."""
    out = generate(tmp_path / "d", SynthSpec(n_train=4, n_val=2, n_test=2, image_size=32), progress=False)
    recorded = json.loads((out / "dataset.json").read_text())["spec"]
    assert set(recorded) == {"n_train", "n_val", "n_test", "classes", "corr", "image_size", "seed"}


def test_options_given_override_the_variant() -> None:
    assert SynthSpec().resolved() == SynthSpec(corr=0.95, core="shapes", faint=0.0, bold=0.0)
    hard = SynthSpec(variant="minority", corr=0.9, core="glyphs", faint=0.2, bold=0.3).resolved()
    assert (hard.corr, hard.core, hard.faint, hard.bold) == (0.9, "glyphs", 0.2, 0.3)
    mixed = SynthSpec(variant="mixed").resolved()
    assert mixed.faint > 0 and mixed.bold > 0  # faint objects in every class, bold ones in every other
    assert SynthSpec(variant="glyphs").class_names == ["one", "seven"]


@pytest.mark.parametrize("variant", ["mixed", "glyphs"])
def test_variant_masks_mark_exactly_the_object(tmp_path: Path, variant: str) -> None:
    """As for the default: one flat colour inside the mask (faint or not; within a bold object's dark rim),
    the striped texture outside."""
    spec = SynthSpec(n_train=40, n_val=2, n_test=2, variant=variant)
    out = generate(tmp_path / variant, spec, progress=False)
    for sample in load_dataset(out).samples:
        rgb = np.asarray(Image.open(out / sample.filename), np.float32)
        mask = np.asarray(Image.open(out / sample.mask_filename)) > 127
        assert 0.003 < mask.mean() < 0.35
        rim = _rim(mask, STYLES[object_style(spec, sample.index, sample.y)].outline)
        inside, outside = rgb[mask & ~rim], rgb[~mask]
        assert inside.std(axis=0).mean() < 12 < outside.std(axis=0).mean()
        if rim.any():
            assert rgb[rim].mean() < 0.5 * inside.mean()


def test_faint_objects_are_the_share_asked_in_every_class_and_smaller(tmp_path: Path) -> None:
    spec = SynthSpec(n_train=200, n_val=2, n_test=2, image_size=32, variant="mixed")
    for y in range(spec.classes):
        share = np.mean([object_style(spec, i, y) == "faint" for i in range(4000)])
        assert abs(share - VARIANTS["mixed"].faint) < 0.03
    image_set = load_dataset(generate(tmp_path / "m", spec, progress=False))
    faint = np.array([object_style(spec, s.index, s.y) == "faint" for s in image_set.samples])
    y = np.array([s.y for s in image_set.samples])
    for cls in range(spec.classes):  # ~100 images a class: within about 3 binomial standard deviations
        assert abs(faint[y == cls].mean() - VARIANTS["mixed"].faint) < 0.13
    area = np.array([(np.asarray(Image.open(image_set.root / s.mask_filename)) > 127).mean()
                     for s in image_set.samples])
    assert area[faint].mean() < 0.5 * area[~faint].mean()
    assert not any(object_style(SynthSpec(), i, y) != "clear" for i in range(200) for y in range(2))


def test_bold_objects_are_the_share_asked_in_every_other_class_larger_and_rimmed(tmp_path: Path) -> None:
    spec = SynthSpec(n_train=300, n_val=2, n_test=2, variant="mixed")
    for y in range(4):
        share = np.mean([object_style(spec, i, y) == "bold" for i in range(4000)])
        assert abs(share - VARIANTS["mixed"].bold) < 0.03 if carries_bold(y) else share == 0
    assert [carries_bold(y) for y in range(4)] == [False, True, False, True]
    image_set = load_dataset(generate(tmp_path / "m", spec, progress=False))
    styles = np.array([object_style(spec, s.index, s.y) for s in image_set.samples])
    y = np.array([s.y for s in image_set.samples])
    assert (styles[y == 0] != "bold").all()
    assert abs((styles[y == 1] == "bold").mean() - VARIANTS["mixed"].bold) < 0.13
    area = np.array([(np.asarray(Image.open(image_set.root / s.mask_filename)) > 127).mean()
                     for s in image_set.samples])
    clear_triangles, bold_triangles = area[(y == 1) & (styles == "clear")], area[styles == "bold"]
    assert bold_triangles.mean() > 1.3 * clear_triangles.mean()  # 1.2 times as wide: 1.44 times the area
    bold = [sample for sample, style in zip(image_set.samples, styles) if style == "bold"]
    for sample in bold:  # a dark rim inside the mask, around the object's flat colour
        rgb = np.asarray(Image.open(image_set.root / sample.filename), np.float32)
        mask = np.asarray(Image.open(image_set.root / sample.mask_filename)) > 127
        rim = _rim(mask, BOLD_OUTLINE_PX)
        assert rim.any() and (mask & ~rim).any()
        assert rgb[rim].mean() < 0.5 * rgb[mask & ~rim].mean()


def test_mixed_changes_only_the_objects_of_its_faint_and_bold_images(tmp_path: Path) -> None:
    """Styles have their own RNG stream: a clear picture is the default's, pixel for pixel, and a faint or
    bold one differs from its default twin only where either picture's object is (background and noise are
    the same); adding bold objects leaves the faint pictures as they were."""
    sizes = {"n_train": 40, "n_val": 2, "n_test": 2, "image_size": 32}
    mixed = SynthSpec(**sizes, variant="mixed")
    a = generate(tmp_path / "mixed", mixed, progress=False)
    b = generate(tmp_path / "default", SynthSpec(**sizes), progress=False)
    c = generate(tmp_path / "faint", SynthSpec(**sizes, faint=VARIANTS["mixed"].faint), progress=False)
    assert (a / "metadata.csv").read_text() == (b / "metadata.csv").read_text()
    styles = {s.index: object_style(mixed, s.index, s.y) for s in load_dataset(a).samples}
    assert {"clear", "faint", "bold"} == set(styles.values())
    for index, style in styles.items():
        name = f"{index:05d}.png"
        pixels = [np.asarray(Image.open(root / "images" / name)) for root in (a, b, c)]
        objects = [np.asarray(Image.open(root / "masks" / name)) > 127 for root in (a, b)]
        differs = (pixels[0] != pixels[1]).any(axis=-1)
        assert differs.any() == (style != "clear")
        assert not (differs & ~objects[0] & ~objects[1]).any()
        assert (pixels[0] == pixels[2]).all() == (style != "bold")


def test_minority_groups_are_the_share_the_spec_says(tmp_path: Path) -> None:
    """97 % agreement over two balanced classes: each minority group (1 - 0.97) / 2 = 1.5 % of training."""
    spec = SynthSpec(n_train=2000, n_val=2, n_test=2, image_size=32, variant="minority")
    train = load_dataset(generate(tmp_path / "w", spec, progress=False)).split(TRAIN)
    minority = [np.mean([s.y == y and s.place != y for s in train]) for y in range(spec.classes)]
    expected = (1 - VARIANTS["minority"].corr) / spec.classes
    assert expected == pytest.approx(0.015)
    for share in minority:
        assert abs(share - expected) < 0.008  # about 3 binomial standard deviations at 2,000 images


def test_glyph_classes_differ_in_shape_not_in_pose() -> None:
    """Two glyphs drawn from the same RNG state share pose, pen and colour: their masks differ only where the
    characters do, and every pair of glyphs differs."""
    overlaps = {}
    for seed in range(20):
        masks = [render(np.random.default_rng(seed), y, 0, 2, 64, "glyphs")[1] for y in range(len(GLYPHS))]
        for a in range(len(masks)):
            for b in range(a + 1, len(masks)):
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                overlaps.setdefault((GLYPHS[a], GLYPHS[b]), []).append(iou)
        again = render(np.random.default_rng(seed), 0, 0, 2, 64, "glyphs")[1]
        assert (again == masks[0]).all()
    for pair, ious in overlaps.items():  # thick pens overlap a lot (a five's bowl is a three's): never alike
        assert np.mean(ious) < 0.55 and max(ious) < 0.8, pair


def test_synth_command_takes_the_family_options(tmp_path: Path) -> None:
    out = tmp_path / "g"
    assert main(["synth", str(out), "--variant", "glyphs", "--faint", "0.5", "--bold", "0.25", "--n-train",
                 "4", "--n-val", "2", "--n-test", "2", "--image-size", "32", "--quiet"]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["class_names"] == ["one", "seven"]
    spec = info["spec"]
    assert (spec["variant"], spec["core"], spec["faint"], spec["bold"]) == ("glyphs", "glyphs", 0.5, 0.25)
