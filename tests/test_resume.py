"""Resumable stages: a stage interrupted half-way and re-run ends with exactly an undisturbed run's result.

The interruption is a real one: the image loader raises ``KeyboardInterrupt`` (what Ctrl-C does) after a given
number of images, the command stops as a user would see it, and the re-run starts in a fresh call.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.core.data import TRAIN, load_dataset
from pipeline.model import train as train_module
from pipeline.model.loaders import ImageDataset, make_loader, seed_everything
from pipeline.model.networks import build_model
from pipeline.model.train import Resume, fit

REPO = Path(__file__).resolve().parents[1]


def interrupt_after(monkeypatch: pytest.MonkeyPatch, images: int) -> dict[str, int]:
    """Make the image loader raise ``KeyboardInterrupt`` on image number ``images`` + 1 (negative: never).

    Returns the live count of images loaded, to check how much a resumed stage recomputed.
    """
    original = ImageDataset.__getitem__
    loaded = {"images": 0}

    def getitem(self, i):
        if loaded["images"] == images:
            raise KeyboardInterrupt
        loaded["images"] += 1
        return original(self, i)

    monkeypatch.setattr(ImageDataset, "__getitem__", getitem)
    return loaded


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left), "weights differ"


def assert_same_arrays(a: Path, b: Path) -> None:
    with np.load(a) as left, np.load(b) as right:
        assert sorted(left.files) == sorted(right.files)
        for key in left.files:
            assert np.array_equal(left[key], right[key]), key


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--run", str(run), "--epochs", "2", "--quiet", *extra]


def test_train_resumes_after_an_interruption_to_the_same_weights(tiny_data: Path, trained_run: Path, tmp_path: Path,
                                                                 monkeypatch, capsys) -> None:
    run = tmp_path / "r"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 160 + 40)  # one epoch of 160 images done, the second under way
        assert main(train_args(tiny_data, run)) == 130
    assert (run / ".resume" / "train.pt").exists() and not (run / "model.pt").exists()
    loaded = interrupt_after(monkeypatch, -1)
    assert main(train_args(tiny_data, run)) == 0
    assert "after epoch 1 of 2" in capsys.readouterr().out
    assert_same_weights(run / "model.pt", trained_run / "model.pt")
    assert loaded["images"] == 160 + 40 + 40  # the second epoch only, then the val and test splits
    assert not (run / ".resume").exists()


def test_checkpoint_of_other_settings_is_not_resumed(tiny_data: Path, trained_run: Path, tmp_path: Path,
                                                    monkeypatch, capsys) -> None:
    run = tmp_path / "r"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 160 + 40)
        assert main(train_args(tiny_data, run, "--lr", "0.05")) == 130
    assert main(train_args(tiny_data, run, "--lr", "0.01")) == 0
    assert "written with other settings" in capsys.readouterr().out
    assert_same_weights(run / "model.pt", trained_run / "model.pt")


def test_corrupt_checkpoint_is_discarded_with_a_warning(tiny_data: Path, trained_run: Path, tmp_path: Path,
                                                       capsys) -> None:
    run = tmp_path / "r"
    (run / ".resume").mkdir(parents=True)
    (run / ".resume" / "train.pt").write_bytes(b"PK\x03\x04 torn")
    assert main(train_args(tiny_data, run)) == 0
    assert "discarding the unreadable epoch checkpoint" in capsys.readouterr().err
    assert_same_weights(run / "model.pt", trained_run / "model.pt")


def test_fit_resumes_with_persistent_workers(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    """With worker processes the loader draws its seed once, in epoch 0; a resumed fit must not draw again."""
    image_set = load_dataset(tiny_data)

    def trained(resume: Resume) -> torch.nn.Module:
        seed_everything(0)
        model = build_model("smallcnn", 2)
        loader = make_loader(image_set, image_set.split(TRAIN), 32, 64, 1, shuffle=True, seed=0)
        fit(model, loader, 2, 0.01, 1e-4, torch.device("cpu"), progress=False, resume=resume)
        return model

    undisturbed = trained(Resume(tmp_path / "a.pt", "k"))
    save = train_module.save_epoch_checkpoint

    def killed_after_first_epoch(resume, model, optimizer, schedule, loader, losses) -> None:
        save(resume, model, optimizer, schedule, loader, losses)
        if len(losses) == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "save_epoch_checkpoint", killed_after_first_epoch)
        with pytest.raises(KeyboardInterrupt):
            trained(Resume(tmp_path / "b.pt", "k"))
    resumed = trained(Resume(tmp_path / "b.pt", "k"))
    for left, right in zip(undisturbed.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(left, right)


@pytest.fixture()
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


EMBED = ["--embedding", "pca", "--precision", "fp32", "--force", "--quiet"]  # the fixture's settings


def test_embed_resumes_from_the_finished_shards(run_copy: Path, trained_run: Path, monkeypatch, capsys) -> None:
    with monkeypatch.context() as patch:
        interrupt_after(patch, 128 + 10)  # batches of 128: the first shard is written, the second batch torn
        assert main(["embed", "--run", str(run_copy), *EMBED]) == 130
    assert len(list((run_copy / ".resume" / "embed").glob("*.npz"))) == 1
    loaded = interrupt_after(monkeypatch, -1)
    assert main(["embed", "--run", str(run_copy), *EMBED]) == 0
    assert "resuming after 1 finished shards" in capsys.readouterr().out
    assert loaded["images"] == 160 - 128  # only what the first shard did not hold
    assert_same_arrays(run_copy / "attention.npz", trained_run / "attention.npz")
    assert not (run_copy / ".resume").exists()


def test_corrupt_shard_is_discarded_and_recomputed(run_copy: Path, trained_run: Path, monkeypatch, capsys) -> None:
    with monkeypatch.context() as patch:
        interrupt_after(patch, 128 + 10)
        assert main(["embed", "--run", str(run_copy), *EMBED]) == 130
    shard, = (run_copy / ".resume" / "embed").glob("*.npz")
    shard.write_bytes(shard.read_bytes()[:100])
    loaded = interrupt_after(monkeypatch, -1)
    assert main(["embed", "--run", str(run_copy), *EMBED]) == 0
    assert "discarding the unreadable attention shard" in capsys.readouterr().err
    assert loaded["images"] == 160
    assert_same_arrays(run_copy / "attention.npz", trained_run / "attention.npz")


@pytest.mark.parametrize("mode", ["fresh", "full"])
def test_retrain_resumes_to_the_same_model(run_copy: Path, tmp_path: Path, monkeypatch, mode: str) -> None:
    answers = run_copy / "answers.csv"
    arrays = np.load(run_copy / "attention.npz")
    answers.write_text("image_id,label\n" + "".join(f"{i},{'core' if i % 3 else 'spurious'}\n"
                                                    for i in arrays["index"][:12]))
    assert main(["curate", "--run", str(run_copy), "--labels", str(answers), "--subset-size", "40", "--quiet"]) == 0
    undisturbed = Path(shutil.copytree(run_copy, tmp_path / "undisturbed"))
    args = ["--mode", mode, "--epochs", "2", "--augment", "none", "--quiet"]  # the interrupt counts the images
    assert main(["retrain", "--run", str(undisturbed), *args]) == 0
    with monkeypatch.context() as patch:
        interrupt_after(patch, 40 + 10 if mode == "full" else 160 + 10)  # into the second epoch
        assert main(["retrain", "--run", str(run_copy), *args]) == 130
    assert (run_copy / ".resume" / "retrain.pt").exists()
    assert main(["retrain", "--run", str(run_copy), *args]) == 0
    assert_same_weights(run_copy / "slim_model.pt", undisturbed / "slim_model.pt")
    assert not (run_copy / ".resume").exists()


FULL_DISK_CHILD = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    from pipeline.core.errors import PipelineError
    from pipeline.core.io import atomic_write_bytes
    from pipeline.model.networks import build_model, save_checkpoint

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    folder = Path(sys.argv[1])
    for write in (lambda: atomic_write_bytes(folder / "blob.bin", b"x" * 300_000),
                  lambda: save_checkpoint(build_model("smallcnn", 2), folder / "model.pt", {})):
        try:
            write()
        except PipelineError as exc:
            print(exc)
""")


def test_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path: Path) -> None:
    """A file-size limit in a child process stands in for a full disk: ``write`` fails with EFBIG."""
    (tmp_path / "blob.bin").write_bytes(b"old")
    (tmp_path / "model.pt").write_bytes(b"old model")
    done = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == [f"no space left on device while writing {tmp_path / name} (EFBIG); free space and re-run"
                     for name in ("blob.bin", "model.pt")]
    assert (tmp_path / "blob.bin").read_bytes() == b"old" and (tmp_path / "model.pt").read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "model.pt"]  # no temporary file left
