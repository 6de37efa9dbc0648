"""torchrun with 2 CPU processes (gloo), as the README documents it: ``embed`` sharded by rank gives the same
arrays as one process, ``train`` and ``retrain`` (DDP) models of the same quality, and the stages that run in
one process refuse to start under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.cli import main
from pipeline.core.synth import SynthSpec, generate
from pipeline.core.world import World
from pipeline.model.distributed import RankShare, block_of, share_of_batch

# No correlation between class and place: a model learns the shapes in a few epochs, so the two trainings'
# accuracies say something about quality (on the spurious tiny set both sit at 0 % worst-group).
LEARNABLE = SynthSpec(n_train=320, n_val=40, n_test=80, image_size=32, seed=3, corr=0.5)
EPOCHS = 8


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m pipeline ARGS``, one thread per process (2 cores here)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "pipeline", *args], check=False, capture_output=True, text=True, timeout=600,
                          env=env)


def test_rank_shares_cover_the_single_process_order() -> None:
    order = list(range(10))
    shares = [list(RankShare(order, World(rank, 3))) for rank in range(3)]
    assert [len(s) for s in shares] == [4, 4, 4]  # padded so every rank takes as many steps
    dealt = [shares[rank][step] for step in range(4) for rank in range(3)]
    assert dealt == order + order[:2]
    assert [block_of(7, World(rank, 2)) for rank in range(2)] == [range(3), range(3, 7)]
    assert share_of_batch(64, World(0, 2)) == 32


def test_two_process_embed_equals_one_process(trained_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    done = torchrun("embed", "--run-dir", str(run), "--force", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "process 0 of 2 (gloo)" in done.stdout
    with np.load(trained_run / "attention.npz") as one, np.load(run / "attention.npz") as two:
        assert one.files == two.files
        for key in one.files:
            if one[key].dtype.kind in "fiu":
                np.testing.assert_allclose(two[key], one[key], atol=1e-5, err_msg=key)
            else:
                assert (two[key] == one[key]).all(), key
    assert not (run / ".resume" / "embed").exists() or not any((run / ".resume" / "embed").iterdir())


def test_two_process_training_matches_one_process(tmp_path: Path) -> None:
    data = generate(tmp_path / "data", LEARNABLE, progress=False)
    common = ["--data", str(data), "--epochs", str(EPOCHS), "--quiet"]
    assert main(["train", "--run", str(tmp_path / "one"), *common]) == 0
    done = torchrun("train", "--run-dir", str(tmp_path / "two"), *common)
    assert done.returncode == 0, done.stderr
    one, two = (json.loads((tmp_path / name / "metrics.json").read_text())["erm"] for name in ("one", "two"))
    assert len(two["train_loss"]) == EPOCHS
    # the same global batches in the same order, split over two ranks: the loss curves follow each other
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], atol=0.06)
    assert two["train_loss"][-1] < 0.8 * two["train_loss"][0]  # it learned
    assert abs(two["mean_acc"] - one["mean_acc"]) <= 0.1
    assert abs(two["worst_group_acc"] - one["worst_group_acc"]) <= 0.15


def test_two_process_retrain_writes_the_slim_model(answered_run: Path) -> None:
    done = torchrun("retrain", "--run-dir", str(answered_run), "--quiet")
    assert done.returncode == 0, done.stderr
    slim = json.loads((answered_run / "metrics.json").read_text())["slim"]
    assert slim["mode"] == "fresh" and len(slim["train_loss"]) == 2
    assert (answered_run / "slim_model.pt").exists()


def test_single_process_commands_refuse_torchrun(trained_run: Path, monkeypatch, capsys) -> None:
    """Under a real torchrun for one command; then every other one, in this process, with the environment
    torchrun gives its first process (what the refusal reads: starting two processes per command costs ~25 s)."""
    done = torchrun("sample", "--run-dir", str(trained_run))
    assert done.returncode != 0
    assert "`sample` runs in one process; start it with python -m pipeline, not torchrun" in done.stderr
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for command in ("propagate", "curate", "report", "push", "pull"):
        assert main([command, "--run", str(trained_run)]) == 2
        assert f"`{command}` runs in one process; start it with python -m pipeline, not torchrun" \
            in capsys.readouterr().err
