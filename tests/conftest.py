"""Shared fixtures: a tiny synthetic dataset and a run trained on it, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.synth import SynthSpec, generate

TINY = SynthSpec(n_train=160, n_val=40, n_test=40, image_size=32, seed=3)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "tiny", TINY, progress=False)


@pytest.fixture(scope="session")
def trained_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with a trained model and its attention stage (PCA embedding keeps the session fast)."""
    run = tmp_path_factory.mktemp("runs") / "a"
    assert main(["train", "--data", str(tiny_data), "--run", str(run), "--epochs", "2", "--quiet"]) == 0
    assert main(["embed", "--run", str(run), "--embedding", "pca", "--quiet"]) == 0
    return run
