"""The run directory: its layout, atomic writes, and which stages are already done.

This is the only module that knows file names inside a run. Every write goes to a temporary file in the same
directory and is renamed into place, so a command killed half-way leaves either the old artifact or the new one,
never a torn file. ``stages.json`` records, per stage, the fingerprint of the inputs that produced its outputs;
a re-run with the same fingerprint reuses them instead of recomputing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline.config import RunConfig
from pipeline.errors import PipelineError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(fileobj)`` on a temp file, fsync it, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc.msg}); delete it and re-run the stage") from exc


class Run:
    """A run directory: config, checkpoints and artifacts of one SLIM loop."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    # --- layout -------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def stages_path(self) -> Path:
        return self.root / "stages.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.root / "model.pt"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def attention_path(self) -> Path:
        return self.root / "attention.npz"

    @property
    def labels_path(self) -> Path:
        """SQLite database of Label Studio tasks and annotations (see :mod:`pipeline.store`)."""
        return self.root / "labels.sqlite"

    @property
    def labelstudio_dir(self) -> Path:
        """Data folder of the local Label Studio that ``demo`` starts for this run."""
        return self.root / "label-studio"

    @property
    def propagation_path(self) -> Path:
        """Propagated attention-correctness scores and certainties of the training images."""
        return self.root / "propagation.npz"

    @property
    def curated_path(self) -> Path:
        return self.root / "curated.csv"

    @property
    def slim_checkpoint_path(self) -> Path:
        return self.root / "slim_model.pt"

    @property
    def report_path(self) -> Path:
        return self.root / "report.html"

    def selection_path(self, round_: int) -> Path:
        return self.root / f"selection_round{round_}.csv"

    def overlay_dir(self, round_: int) -> Path:
        return self.root / "overlays" / f"round{round_}"

    def view_path(self, round_: int, image_id: int, kind: str) -> Path:
        """An image's rendered view: ``overview`` (three panels), or a task's ``image`` / ``attention``."""
        suffix = "" if kind == "overview" else f"_{kind}"
        return self.overlay_dir(round_) / f"{image_id:06d}{suffix}.png"

    # --- config -------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.config_path.exists()

    def load_config(self) -> RunConfig:
        if not self.config_path.exists():
            raise PipelineError(
                f"{self.root} is not a run directory (no config.json); start one with "
                f"`python -m pipeline train --data DIR --run {self.root}`"
            )
        return RunConfig.from_dict(read_json(self.config_path))

    def save_config(self, config: RunConfig) -> None:
        atomic_write_json(self.config_path, config.to_dict())

    def load_metrics(self) -> dict:
        return read_json(self.metrics_path) if self.metrics_path.exists() else {}

    # --- stage bookkeeping --------------------------------------------------------------------------
    def _stages(self) -> dict[str, str]:
        return read_json(self.stages_path) if self.stages_path.exists() else {}

    def stage_fingerprint(self, stage: str) -> str | None:
        return self._stages().get(stage)

    def is_done(self, stage: str, fingerprint: str, outputs: Sequence[Path]) -> bool:
        """True when ``stage`` last ran with the same inputs and all its outputs are still there."""
        return self.stage_fingerprint(stage) == fingerprint and all(p.exists() for p in outputs)

    def mark_done(self, stage: str, fingerprint: str) -> None:
        stages = self._stages()
        stages[stage] = fingerprint
        atomic_write_json(self.stages_path, stages)

    def require(self, path: Path, command: str) -> Path:
        """Fail with the command that produces ``path`` when an earlier stage has not run yet."""
        if not path.exists():
            raise PipelineError(f"{path.name} is missing in {self.root}; run `python -m pipeline {command}` first")
        return path

    # --- artifacts ----------------------------------------------------------------------------------
    def save_arrays(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        atomic_write(path, lambda handle: np.savez(handle, **arrays))

    def load_arrays(self, path: Path, command: str) -> dict[str, np.ndarray]:
        with np.load(self.require(path, command), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}

    def save_csv(self, path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        atomic_write_bytes(path, text.getvalue().encode())

    def load_csv(self, path: Path, command: str) -> list[dict[str, str]]:
        with self.require(path, command).open(newline="") as handle:
            return list(csv.DictReader(handle))
