"""The backend's fault scenarios, quick versions: a concurrent mixed burst, and a damaged labels.sqlite."""

from __future__ import annotations

from pathlib import Path

import faults_backend


def test_concurrent_mixed_requests_get_no_5xx_and_lose_no_answer(trained_run: Path,
                                                                  tmp_path: Path) -> None:
    result = faults_backend.scenario_backend_concurrent(tmp_path, seed=1, quick=True, run=trained_run)
    assert result.ok, result.to_dict()
    assert result.faults_injected == faults_backend.REQUESTS[True] and result.detail["annotations_expected"] > 0
    assert result.detail["background_jobs_failed"] == 0 and result.detail["health_after"] == "UP"


def test_damaged_store_is_refused_in_one_line_and_left_as_it_was(tmp_path: Path) -> None:
    result = faults_backend.scenario_corrupt_store(tmp_path, quick=True)
    assert result.ok, result.to_dict()
    assert result.faults_injected == 6
