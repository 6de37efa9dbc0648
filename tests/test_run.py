"""Run state: atomic writes and the stage bookkeeping that makes re-runs cheap."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import RunConfig, fingerprint
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write, atomic_write_json, read_json
from pipeline.core.run import Run


def test_interrupted_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"old": 1})

    def explode(handle) -> None:
        handle.write(b'{"new": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, explode)
    assert read_json(target) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    """Other processes (a Label Studio serving local files, a container) must be able to read artifacts."""
    import os
    import stat

    target = tmp_path / "a.json"
    atomic_write_json(target, {})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_config_round_trips_and_ignores_unknown_keys(tmp_path: Path) -> None:
    run = Run(tmp_path)
    config = RunConfig()
    config.train.arch, config.sample.per_class, config.device = "resnet18", 7, "cpu"
    run.save_config(config)
    loaded = run.load_config()
    assert loaded == config
    raw = read_json(run.config_path)
    raw["train"]["from_the_future"] = True
    atomic_write_json(run.config_path, raw)
    assert run.load_config() == config


def test_stage_is_done_only_with_same_fingerprint_and_outputs(tmp_path: Path) -> None:
    run = Run(tmp_path)
    output = tmp_path / "out.bin"
    stamp = fingerprint("stage", RunConfig().train)
    assert not run.is_done("stage", stamp, [output])
    output.write_bytes(b"x")
    run.mark_done("stage", stamp)
    assert run.is_done("stage", stamp, [output])
    assert not run.is_done("stage", fingerprint("stage", {"epochs": 99}), [output])
    output.unlink()
    assert not run.is_done("stage", stamp, [output])


def test_missing_run_and_missing_artifact_say_which_command_to_run(tmp_path: Path) -> None:
    run = Run(tmp_path / "nowhere")
    with pytest.raises(PipelineError, match="not a run directory"):
        run.load_config()
    with pytest.raises(PipelineError, match="run `python -m pipeline embed"):
        run.require(run.attention_path, "embed --run RUN")


def test_corrupt_json_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PipelineError, match="not valid JSON"):
        Run(tmp_path).load_config()
