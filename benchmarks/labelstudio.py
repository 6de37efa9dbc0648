"""Throughput of ``push`` and ``pull`` against a real local Label Studio.

Builds a run on the synthetic default with ``--tasks`` training images and selects all of them (a quick
1-epoch model: only the number of tasks matters here), starts a fresh local Label Studio, then times:

* ``push``: creating the project, uploading both pictures of every task and importing the tasks with their
  predictions (``push_tasks_per_s``);
* the simulated annotator answering every task through the API (``annotate_tasks_per_s``, for scale);
* the first ``pull`` of all annotations (``pull_annotations_per_s``) and a second, no-change pull
  (``pull_noop_s``: what an incremental pull costs when nothing changed).

    python benchmarks/labelstudio.py --out bench-out/labelstudio.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch
from runs import attention_run

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json
from pipeline.core.run import Run
from pipeline.core.synth import SynthSpec
from pipeline.labelstudio.annotator import simulate_annotator
from pipeline.labelstudio.client import Settings
from pipeline.labelstudio.pull import pull_run
from pipeline.labelstudio.push import push_run
from pipeline.labelstudio.server import LocalLabelStudio
from pipeline.slim.sample import sample_run


def build_run(work: Path, tasks: int) -> Run:
    """A 1-epoch run with ``tasks`` training images, every one of them selected for annotation."""
    run = attention_run(work / "run", work / "data", SynthSpec(n_train=tasks, n_val=20, n_test=20), epochs=1)
    config = run.load_config()
    config.sample.fraction = 1.0
    config.sample.per_class = None  # as `sample --fraction` does: the fraction replaces a per-class count
    try:
        sample_run(run, config, progress=False)
    except PipelineError as exc:
        raise SystemExit(f"pipeline failed: {exc}") from exc
    return run


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000, help="tasks to push and annotations to pull")
    parser.add_argument("--work", default="bench-out/labelstudio", help="run and server data go here")
    parser.add_argument("--out", default="bench-out/labelstudio.json", help="JSON result file")
    args = parser.parse_args()
    work = Path(args.work)
    run = build_run(work, args.tasks)
    server_dir = work / "server"
    shutil.rmtree(server_dir, ignore_errors=True)
    if run.labels_path.exists():
        run.labels_path.unlink()
    with LocalLabelStudio(server_dir) as login:
        settings = Settings(login.url, login.token)
        pushed, push_s = timed(lambda: push_run(run, settings, progress=False))
        _, annotate_s = timed(lambda: simulate_annotator(run, settings, progress=False))
        pulled, pull_s = timed(lambda: pull_run(run, settings))
        again, noop_s = timed(lambda: pull_run(run, settings))
    result = {
        "tasks": pushed["created"],
        "push_s": round(push_s, 2),
        "push_tasks_per_s": round(pushed["created"] / push_s, 1),
        "annotate_tasks_per_s": round(args.tasks / annotate_s, 1),
        "annotations_pulled": pulled["added"],
        "pull_s": round(pull_s, 2),
        "pull_annotations_per_s": round(pulled["added"] / pull_s, 1),
        "pull_noop_s": round(noop_s, 2),
        "pull_noop_changed_tasks": again["changed_tasks"],
        "label_studio": "local, SQLite, 127.0.0.1 (pipeline.labelstudio.server)",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    result["targets_met"] = {"push_tasks_per_s >= 100": result["push_tasks_per_s"] >= 100,
                             "pull_annotations_per_s >= 500": result["pull_annotations_per_s"] >= 500}
    atomic_write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
