"""The stages' fault scenarios, quick versions: kill -9 at random points, a full disk, damaged artifacts."""

from __future__ import annotations

from pathlib import Path

import faults_stages


def test_killed_stages_rerun_to_the_undisturbed_result(tmp_path: Path) -> None:
    result = faults_stages.scenario_kill_stages(tmp_path, seed=0, quick=True)
    assert result.ok, result.to_dict()
    assert [k["stage"] for k in result.detail["kills"]] == ["train", "embed", "curate", "retrain --mode fresh"]
    assert result.faults_injected == 4  # each stage killed once, while it was running


def test_full_disk_is_one_line_and_keeps_every_file(tmp_path: Path) -> None:
    result = faults_stages.scenario_full_disk(tmp_path, quick=True)
    assert result.ok, result.to_dict()
    assert result.faults_injected == 2


def test_damaged_artifacts_are_refused_in_one_line_and_left_as_they_were(tmp_path: Path) -> None:
    result = faults_stages.scenario_corrupt_artifacts(tmp_path, quick=True)
    assert result.ok, result.to_dict()
    assert result.faults_injected == 4  # attention.npz, model.pt, propagation.npz, stages.json
