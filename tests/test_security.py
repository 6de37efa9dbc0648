"""Static security check: bandit finds nothing of medium or high severity in the tool's code.

A finding that is accepted carries a ``# nosec BXXX`` comment with the reason beside the code it concerns.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bandit_finds_no_medium_or_high_issue() -> None:
    result = subprocess.run([sys.executable, "-m", "bandit", "-q", "-r", "pipeline", "ml_backend",
                             "--severity-level", "medium", "--format", "custom",
                             "--msg-template", "{relpath}:{line}: {test_id} {severity} {msg}"],
                            check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
