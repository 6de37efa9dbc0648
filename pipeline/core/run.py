"""The run directory: its layout, its config and metrics, and which stages are already done.

This is the only module that knows file names inside a run. Every write is atomic (:mod:`pipeline.core.io`),
so a command killed half-way leaves either the old artifact or the new one, never a torn file.
``stages.json`` records, per stage, the fingerprint of the inputs that produced its outputs; a re-run with the
same fingerprint reuses them instead of recomputing.

Long stages keep what they have finished so far under ``.resume/`` (``train.pt`` / ``retrain.pt``: the last
epoch; ``embed/``: completed shards of the attention pass). It is a cache: each entry is keyed by the stage's
fingerprint, a torn or stale one is discarded, and the stage removes it once its artifact is written.
"""

from __future__ import annotations

import csv
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from pipeline.core.config import RunConfig
from pipeline.core.errors import PipelineError
from pipeline.core.io import TEMP_SUFFIX, atomic_write_csv, atomic_write_json, read_json

SELECTION_NAME = re.compile(r"selection_round(\d+)\.csv")
RESUME_DIR = ".resume"
MODEL, ATTENTION, PROPAGATION = "model.pt", "attention.npz", "propagation.npz"
CURATED, SLIM_MODEL, REPORT = "curated.csv", "slim_model.pt", "report.html"
MANIFEST = "manifest.json"
# the stage that writes each artifact: what to re-run when it is torn ("retrain" ignores --force, harmlessly)
PRODUCERS = {MODEL: "train", ATTENTION: "embed", PROPAGATION: "propagate", CURATED: "curate",
             SLIM_MODEL: "retrain", REPORT: "report"}


def recovery_hint(path: Path) -> str:
    """What to run to rebuild the run artifact ``path`` (the run is the file's folder)."""
    stage = PRODUCERS.get(path.name)
    if stage is None:
        return "restore it from a backup or re-create it"
    return f"re-run `python -m pipeline {stage} --run {path.parent} --force`"


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn a failure to parse the artifact ``path`` into the one-line error naming it and its fix.

    Readers (numpy, zipfile, torch, pickle) fail on a torn file with many exception types; which one is an
    implementation detail, so anything but our own errors (and running out of memory) is reported as corruption.
    """
    try:
        yield
    except (PipelineError, MemoryError):
        raise
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; {recovery_hint(path)}") from None
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise PipelineError(f"{path} is corrupt or truncated ({exc.__class__.__name__}); "
                            f"{recovery_hint(path)}") from None


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
    def manifest_path(self) -> Path:
        """The dataset's files as last checked (size, mtime, image side): later stages open only changed ones."""
        return self.root / MANIFEST

    @property
    def checkpoint_path(self) -> Path:
        return self.root / MODEL

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def attention_path(self) -> Path:
        return self.root / ATTENTION

    @property
    def labels_path(self) -> Path:
        """SQLite database of Label Studio tasks and annotations (see :mod:`pipeline.core.store`)."""
        return self.root / "labels.sqlite"

    @property
    def labelstudio_dir(self) -> Path:
        """Data folder of the local Label Studio that ``demo`` starts for this run."""
        return self.root / "label-studio"

    @property
    def propagation_path(self) -> Path:
        """Propagated attention-correctness scores and certainties of the training images."""
        return self.root / PROPAGATION

    @property
    def curated_path(self) -> Path:
        return self.root / CURATED

    @property
    def slim_checkpoint_path(self) -> Path:
        return self.root / SLIM_MODEL

    @property
    def report_path(self) -> Path:
        return self.root / REPORT

    @property
    def counterfactual_dir(self) -> Path:
        """Generated counterfactual training images: a dataset folder (metadata.csv, images/, dataset.json)."""
        return self.root / "counterfactuals"

    def resume_path(self, stage: str) -> Path:
        """The epoch checkpoint a killed ``stage`` (``train``, ``retrain``) resumes from."""
        return self.root / RESUME_DIR / f"{stage}.pt"

    def shard_dir(self, stage: str) -> Path:
        """Completed shards of a killed streaming ``stage`` (``embed``)."""
        return self.root / RESUME_DIR / stage

    def discard_resume(self, stage: str) -> None:
        """Forget what ``stage`` kept to resume from, once its artifact is written.

        Also the temporary files of checkpoint writes a kill interrupted: only this stage writes them.
        """
        checkpoint = self.resume_path(stage)
        checkpoint.unlink(missing_ok=True)
        for torn in checkpoint.parent.glob(f".{checkpoint.name}.*{TEMP_SUFFIX}"):
            torn.unlink(missing_ok=True)
        shutil.rmtree(self.shard_dir(stage), ignore_errors=True)
        with suppress(OSError):  # the folder goes with its last entry; another stage's entries keep it
            (self.root / RESUME_DIR).rmdir()

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
        raw = read_json(self.config_path, f"restore it, or start the run again with `python -m pipeline train "
                                          f"--data DIR --run {self.root}`")
        if not isinstance(raw, dict):
            raise PipelineError(f"{self.config_path} is not a run config (a JSON object); restore it or start "
                                f"the run again with `python -m pipeline train --data DIR --run {self.root}`")
        return RunConfig.from_dict(raw)

    def save_config(self, config: RunConfig) -> None:
        atomic_write_json(self.config_path, config.to_dict())

    def load_metrics(self) -> dict:
        return read_json(self.metrics_path) if self.metrics_path.exists() else {}

    # --- stage bookkeeping --------------------------------------------------------------------------
    def _stages(self) -> dict[str, str]:
        if not self.stages_path.exists():
            return {}
        remedy = "delete it and re-run the stages (their outputs are recomputed)"
        stages = read_json(self.stages_path, remedy)
        if not isinstance(stages, dict):
            raise PipelineError(f"{self.stages_path} is not a stage record (a JSON object); {remedy}")
        return stages

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

    def update_metrics(self, **sections: Any) -> dict:
        """Replace the given top-level sections of ``metrics.json`` (others are kept); returns the whole."""
        metrics = self.load_metrics()
        metrics.update(sections)
        atomic_write_json(self.metrics_path, metrics)
        return metrics

    def rounds(self) -> list[int]:
        """Annotation rounds that have a selection, in order."""
        found = (SELECTION_NAME.fullmatch(p.name) for p in self.root.glob("selection_round*.csv"))
        return sorted(int(m.group(1)) for m in found if m)

    # --- artifacts ----------------------------------------------------------------------------------
    def save_csv(self, path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        atomic_write_csv(path, header, rows)

    def load_csv(self, path: Path, command: str) -> list[dict[str, str]]:
        with self.require(path, command).open(newline="") as handle:
            return list(csv.DictReader(handle))
