"""The stages' fault scenarios, quick versions: kill -9 at random points, a full disk, damaged artifacts.

The three compare against one undisturbed run, made once for the module in a shared work folder (each scenario
works on copies of it, in folders of its own there).
"""

from __future__ import annotations

from pathlib import Path

import faults_stages
import pytest


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults-stages")


@pytest.fixture(scope="module")
def reference(work: Path) -> faults_stages.Reference:
    return faults_stages.undisturbed_run(work, quick=True)


def test_killed_stages_rerun_to_the_undisturbed_result(work: Path, reference: faults_stages.Reference) -> None:
    result = faults_stages.scenario_kill_stages(work, seed=0, quick=True, reference=reference)
    assert result.ok, result.to_dict()
    assert [k["stage"] for k in result.detail["kills"]] == ["train", "embed", "curate", "retrain --mode fresh"]
    assert result.faults_injected == 4  # each stage killed once, while it was running


def test_full_disk_is_one_line_and_keeps_every_file(work: Path, reference: faults_stages.Reference) -> None:
    result = faults_stages.scenario_full_disk(work, quick=True, reference=reference)
    assert result.ok, result.to_dict()
    assert result.faults_injected == 2


def test_damaged_artifacts_are_refused_in_one_line_and_left_as_they_were(work: Path,
                                                                         reference: faults_stages.Reference) -> None:
    result = faults_stages.scenario_corrupt_artifacts(work, quick=True, reference=reference)
    assert result.ok, result.to_dict()
    assert result.faults_injected == 4  # attention.npz, model.pt, propagation.npz, stages.json
