"""ERM training: checkpoint and per-group metrics written, re-runs reused, bad options refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.core.data import TEST, load_dataset
from pipeline.model.evaluate import group_metrics
from pipeline.model.networks import build_model, load_checkpoint, load_weights, resolve_device


def test_train_writes_checkpoint_and_group_metrics(trained_run: Path, tiny_data: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())["erm"]
    assert set(metrics) >= {"val", "worst_group_acc", "mean_acc", "per_group", "train_loss"}
    assert len(metrics["train_loss"]) == 2
    test = metrics
    assert set(test["per_group"]) == {"disc|place0", "disc|place1", "triangle|place0", "triangle|place1"}
    accs = [g["acc"] for g in test["per_group"].values()]
    assert test["worst_group_acc"] == min(accs)
    assert sum(g["n"] for g in test["per_group"].values()) == test["n"] == 40
    model, meta = load_checkpoint(trained_run / "model.pt")
    assert meta["arch"] == "smallcnn" and meta["image_size"] == 32 and meta["class_names"] == ["disc", "triangle"]
    # the saved model reproduces the reported test accuracy
    image_set = load_dataset(tiny_data)
    from pipeline.model.evaluate import predict
    from pipeline.model.loaders import make_loader

    samples = image_set.split(TEST)
    probs, _ = predict(model, make_loader(image_set, samples, 32, 16, 0), torch.device("cpu"), progress=False)
    assert group_metrics(image_set, samples, probs.argmax(1))["avg_acc"] == pytest.approx(test["avg_acc"])


def test_train_again_reuses_the_model(trained_run: Path, capsys) -> None:
    stamp = (trained_run / "model.pt").stat().st_mtime_ns
    assert main(["train", "--run", str(trained_run), "--quiet"]) == 0
    assert "reusing" in capsys.readouterr().out
    assert (trained_run / "model.pt").stat().st_mtime_ns == stamp


def test_group_metrics_by_hand(tiny_data: Path) -> None:
    image_set = load_dataset(tiny_data)
    samples = image_set.split(TEST)
    labels = np.array([s.y for s in samples])
    predictions = labels.copy()
    wrong_group = next(image_set.group_of(s) for s in samples)
    for i, s in enumerate(samples):
        if image_set.group_of(s) == wrong_group:
            predictions[i] = 1 - labels[i]
    metrics = group_metrics(image_set, samples, predictions)
    assert metrics["worst_group_acc"] == 0.0
    assert metrics["per_group"][image_set.group_name(wrong_group)]["acc"] == 0.0
    in_group = sum(image_set.group_of(s) == wrong_group for s in samples)
    assert metrics["avg_acc"] == pytest.approx(1 - in_group / len(samples))
    train_counts = np.bincount([image_set.group_of(s) for s in image_set.split(0)], minlength=4)
    assert metrics["mean_acc"] == pytest.approx(1 - train_counts[wrong_group] / train_counts.sum())


def test_new_run_needs_data(tmp_path: Path, capsys) -> None:
    assert main(["train", "--run", str(tmp_path / "r"), "--quiet"]) == 2
    assert "pass --data DIR" in capsys.readouterr().err


def test_cuda_requested_without_gpu_is_an_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_pretrained_never_downloads(tmp_path: Path, monkeypatch, tiny_data: Path, capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    code = main(["train", "--data", str(tiny_data), "--run", str(tmp_path / "r"), "--arch", "resnet18",
                 "--pretrained", "--quiet"])
    assert code == 2
    assert "not in the torch cache" in capsys.readouterr().err
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").rglob("*.pth"))


def test_pretrained_loads_from_the_torch_cache(tmp_path: Path, monkeypatch) -> None:
    """A file already in the cache is used as ImageNet weights (here: a random ResNet-18 saved there)."""
    from torchvision.models import ResNet18_Weights, resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = resnet18(weights=None)
    cached = tmp_path / "hub" / "checkpoints" / Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    model = build_model("resnet18", 2, imagenet=True)
    assert torch.equal(model.backbone[0].weight, reference.conv1.weight)


def test_weights_file_is_loaded_and_bad_ones_refused(tmp_path: Path, trained_run: Path) -> None:
    from pipeline.core.errors import PipelineError

    source, _ = load_checkpoint(trained_run / "model.pt")
    fresh = build_model("smallcnn", 2)
    load_weights(fresh, trained_run / "model.pt")
    assert torch.equal(fresh.backbone[0][0].weight, source.backbone[0][0].weight)
    with pytest.raises(PipelineError, match="does not exist"):
        load_weights(fresh, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(PipelineError, match="not a readable torch checkpoint"):
        load_weights(fresh, tmp_path / "junk.pt")
    with pytest.raises(PipelineError, match="no tensors that fit"):
        load_weights(build_model("resnet18", 2), trained_run / "model.pt")
