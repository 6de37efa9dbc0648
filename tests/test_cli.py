"""The command line: every sub-command documents its options; the whole first half runs end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser


@pytest.mark.parametrize(
    "command, options",
    [
        ("synth", ["--corr", "--n-train", "--classes", "--image-size"]),
        ("train", ["--data", "--run", "--arch", "--epochs", "--weights", "--pretrained", "--device"]),
        ("embed", ["--run", "--cam", "--threshold", "--embedding", "--device"]),
        ("sample", ["--run", "--per-class", "--fraction", "--round", "--space"]),
    ],
)
def test_help_explains_every_option(command: str, options: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text
    # every option has a help text: no bare "--flag VALUE" line without words after it
    for action in build_parser()._subparsers._group_actions[0].choices[command]._actions:
        assert action.help, action.dest


def test_module_entry_point_runs_synth(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "synth", str(tmp_path / "d"), "--n-train", "4", "--n-val", "2",
         "--n-test", "2", "--image-size", "32", "--quiet"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "d" / "metadata.csv").read_text().count("\n") == 9


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", "sample", "--run", str(tmp_path / "x")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
