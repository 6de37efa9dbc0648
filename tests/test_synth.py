"""The synthetic default: deterministic, masks true to the objects, the correlation it promises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.data import TEST, TRAIN, load_dataset
from pipeline.core.errors import PipelineError
from pipeline.core.synth import SynthSpec, generate


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
