"""The command line: every sub-command documents its options; the whole first half runs end to end."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import LABEL_STUDIO_COMMANDS, STAGES, build_parser
from pipeline.core.config import RunConfig

COMMANDS = ("synth", *(stage.name for stage in STAGES), *(spec.name for spec in LABEL_STUDIO_COMMANDS), "labelstudio",
            "demo")


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def documented_options(text: str) -> dict[str, str]:
    """``--flag`` -> its help words, read from the ``options:`` section of a ``--help`` page."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.split("options:", 1)[1].splitlines():
        match = re.match(r"^  (-[-\w]+|-\w, --[-\w]+)(?: [^ ].*?)?(?: {2,}(.*))?$", line)
        if match:
            flag = match.group(1).split(", ")[-1]
            entries[flag] = match.group(2) or ""
        elif flag and line.startswith(" " * 4):
            entries[flag] += " " + line.strip()
    return entries


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_option(command: str, capsys) -> None:
    options = documented_options(help_text(command, capsys))
    assert "--help" in options and len(options) > 2
    for flag, words in options.items():
        assert len(words.split()) >= 2, f"{command} {flag} has no help text"


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)
def test_every_setting_of_a_stage_is_a_flag(stage, capsys) -> None:
    """The flags come from the config dataclasses: each field a stage exposes is on its help page."""
    options = documented_options(help_text(stage.name, capsys))
    for section, names in stage.sections.items():
        section_cls = type(getattr(RunConfig(), section)) if section else RunConfig
        for field in dataclasses.fields(section_cls):
            if "help" in field.metadata and (names is None or field.name in names):
                flag = field.metadata["flag"] or "--" + field.name.replace("_", "-")
                assert flag in options and field.metadata["help"].split()[0] in options[flag], flag


def test_help_of_the_first_stages_names_their_key_options(capsys) -> None:
    expected = {"synth": ["--corr", "--n-train", "--classes", "--image-size"],
                "train": ["--data", "--run", "--arch", "--epochs", "--weights", "--pretrained", "--device"],
                "embed": ["--run", "--cam", "--threshold", "--embedding", "--device"],
                "sample": ["--run", "--per-class", "--fraction", "--round", "--space"]}
    for command, flags in expected.items():
        assert set(flags) <= set(documented_options(help_text(command, capsys))), command


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
