"""Fault scenarios of the long stages (``benchmarks/faults.py`` runs them; their quick versions are tests).

- ``kill_stages``: ``train``, ``embed``, ``curate`` and ``retrain`` run as ``python -m pipeline`` subprocesses
  and get ``SIGKILL`` at a seeded random point (a random time into the stage, or a random moment after its
  first epoch checkpoint / attention shard appeared). After each kill every artifact in the run must still
  read back whole; the re-run must complete and give exactly an undisturbed run's result (model weights,
  attention arrays, ``curated.csv`` and ``propagation.npz``, the retrained model), and leave no ``.resume/``.
- ``full_disk``: a stage run under a file-size limit (``RLIMIT_FSIZE``, what ``ulimit -f`` sets; SIGXFSZ ignored,
  so writes fail with EFBIG as on a full disk) must stop with the one-line error, leave every existing file
  as it was and no temporary file; freed of the limit, the re-run gives the undisturbed result.
- ``corrupt_artifacts``: ``attention.npz``, ``model.pt``, ``propagation.npz``, ``stages.json`` (and, full size,
  ``config.json`` and ``slim_model.pt``) truncated or overwritten with garbage: the command that reads it exits
  2 with one line naming the file and what to re-run, and changes no file. A torn epoch checkpoint or
  attention shard is a cache: the stage warns, recomputes it and gives the undisturbed result.

    python benchmarks/faults_stages.py --work bench-out/faults-stages [--quick] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from faultkit import ScenarioResult

from pipeline.cli import main as cli_main
from pipeline.core.io import TEMP_SUFFIX
from pipeline.core.synth import SynthSpec, generate

REPO = Path(__file__).resolve().parents[1]
QUICK_SPEC = SynthSpec(n_train=160, n_val=40, n_test=40, image_size=32, seed=3)  # the tests' tiny dataset
FULL_SPEC = SynthSpec(n_train=800, n_val=100, n_test=100, image_size=32, seed=3)  # a few seconds per stage
EPOCHS = {True: 3, False: 4}  # several epochs: a kill can land between checkpoints
KILLS_PER_STAGE = {True: 1, False: 3}  # quick: one kill per stage; full: three seeded kill points per stage
EMBED_BATCH = 16  # small batches: the tiny pass has ten shards to be killed between
ANSWERS_PER_CLASS = 6  # answered images per class, by the mask rule (AIoU >= 0.5 is core)
STAGE_TIMEOUT_S = 600.0  # an undisturbed stage of the full-size scenario takes well under a minute
POLL_S = 0.01  # how often a waiting kill looks for its trigger file
KILL_ATTEMPTS = 4  # a kill that came after the stage had finished is tried again, twice as early
EXPECTED = "expected"  # folder of the work dir holding each stage's undisturbed outputs
LIMIT_SHARE = 0.5  # the full-disk limit: half the size of the artifact the stage rewrites


# --- running the CLI ----------------------------------------------------------------------------------------
def cli_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def cli_env() -> dict[str, str]:
    """The environment of a stage subprocess: this checkout importable, no colour or progress noise."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run_cli(args: Sequence[str], preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` to completion (bounded by ``STAGE_TIMEOUT_S``)."""
    return subprocess.run(cli_command(args), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=STAGE_TIMEOUT_S, check=False, preexec_fn=preexec)


def startup_seconds() -> float:
    """How long a stage subprocess takes to start (imports) before it does any work."""
    started = time.perf_counter()
    subprocess.run(cli_command(["--version"]), cwd=REPO, env=cli_env(), capture_output=True,
                   timeout=STAGE_TIMEOUT_S, check=True)
    return time.perf_counter() - started


# --- comparing artifacts ------------------------------------------------------------------------------------
def same_blob(a: object, b: object) -> bool:
    """Equal nested checkpoint contents: tensors bit for bit, everything else by ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_blob(a[k], b[k]) for k in a)
    return a == b


def read_artifact(path: Path) -> object:
    """The contents of a run file by its kind; raises when it does not read back whole."""
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            return list(csv.reader(handle))
    return path.read_bytes()


def same_artifact(a: Path, b: Path) -> bool:
    if not (a.exists() and b.exists()):
        return False
    if a.suffix == ".npz":
        left, right = read_artifact(a), read_artifact(b)
        return left.keys() == right.keys() and all(np.array_equal(left[k], right[k]) for k in left)
    if a.suffix == ".pt":
        return same_blob(read_artifact(a), read_artifact(b))
    return a.read_bytes() == b.read_bytes()


def run_files(run: Path) -> list[Path]:
    """Every file of the run, caches included, temporaries excluded."""
    return sorted(p for p in run.rglob("*") if p.is_file() and not p.name.endswith(TEMP_SUFFIX))


def torn_files(run: Path) -> list[str]:
    """Files of the run that do not read back whole (there must be none, whenever a stage was killed)."""
    torn = []
    for path in run_files(run):
        try:
            read_artifact(path)
        except Exception:  # noqa: BLE001 - any failure to read is what this counts
            torn.append(str(path.relative_to(run)))
    return torn


def temp_files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob(f"*{TEMP_SUFFIX}"))


def digests(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run_files(run)}


# --- the stages ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageCase:
    """One stage as the scenarios run it: its flags, what it produces and what can trigger a kill."""

    name: str
    flags: tuple[str, ...]  # after ``STAGE --run RUN``
    outputs: tuple[str, ...]  # files that must equal the undisturbed run's
    trigger: str | None = None  # glob (in the run) of the cache file a kill may wait for

    def args(self, run: Path) -> list[str]:
        return [self.name, "--run", str(run), "--quiet", *self.flags]

    @property
    def label(self) -> str:
        """The stage's name, with its mode where one stage runs in two (``retrain --mode full``)."""
        return f"{self.name} --mode {self.flags[self.flags.index('--mode') + 1]}" if "--mode" in self.flags \
            else self.name

    def expected(self, work: Path) -> Path:
        """Where the undisturbed run left a copy of this stage's outputs (a later stage may rewrite them)."""
        return work / EXPECTED / self.label.replace(" --mode ", "-")

    def equals_undisturbed(self, run: Path, work: Path) -> bool:
        return all(same_artifact(run / name, self.expected(work) / name) for name in self.outputs)


def stage_cases(data: Path, answers: Path, quick: bool) -> list[StageCase]:
    """The stages in loop order; ``--force`` so that every kill of a stage makes it recompute."""
    epochs = str(EPOCHS[quick])
    cases = [
        StageCase("train", ("--data", str(data), "--epochs", epochs, "--force"), ("model.pt",), ".resume/train.pt"),
        StageCase("embed", ("--embedding", "pca", "--precision", "fp32", "--batch-size", str(EMBED_BATCH),
                            "--force"), ("attention.npz",), ".resume/embed/*.npz"),
        StageCase("curate", ("--labels", str(answers), "--subset-size", "40"), ("curated.csv", "propagation.npz"),
                  "propagation.npz"),
        StageCase("retrain", ("--mode", "fresh"), ("slim_model.pt",), ".resume/retrain.pt"),
    ]
    if not quick:  # before fresh, so that the reference run ends in the default mode, as the quick one does
        cases.insert(3, StageCase("retrain", ("--mode", "full", "--epochs", epochs), ("slim_model.pt",),
                                  ".resume/retrain.pt"))
    return cases


def write_answers(run: Path, path: Path) -> None:
    """A careful annotator's answers for the first images of each class: core where AIoU >= 0.5."""
    with np.load(run / "attention.npz") as npz:
        index, y, aiou = npz["index"], npz["y"], npz["aiou"]
    rows = [f"{int(index[r])},{'core' if aiou[r] >= 0.5 else 'spurious'}"
            for c in np.unique(y) for r in np.flatnonzero(y == c)[:ANSWERS_PER_CLASS]]
    path.write_text("image_id,label\n" + "\n".join(rows) + "\n")


@dataclass(frozen=True)
class Timing:
    """An undisturbed stage's work: how long it took and when its trigger file appeared (seconds from start)."""

    seconds: float
    trigger_at: float | None

    @property
    def after_trigger(self) -> float:
        """How long the stage still worked once its trigger file was there: where a kill can land."""
        return self.seconds - (self.trigger_at or 0.0)


def timed_stage(case: StageCase, run: Path) -> Timing:
    """Run ``case`` in this process (the same code as the CLI subprocess), watching for its trigger file."""
    started = time.perf_counter()
    seen: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and not seen:
            if case.trigger and any(run.glob(case.trigger)):
                seen.append(time.perf_counter() - started)
            time.sleep(POLL_S)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        code = cli_main([*case.args(run), "--log-level", "WARNING"])
    finally:
        stop.set()
        watcher.join()
    if code != 0:
        raise RuntimeError(f"undisturbed `{' '.join(case.args(run))}` failed with exit status {code}")
    return Timing(time.perf_counter() - started, seen[0] if seen else None)


@dataclass(frozen=True)
class Reference:
    """The undisturbed run the scenarios compare against (in ``work``, beside their own copies): its folder, its
    stages, and how long each took. One reference serves every scenario run in the same ``work``."""

    run: Path
    cases: list[StageCase]
    timings: dict[str, Timing]


def undisturbed_run(work: Path, quick: bool) -> Reference:
    """The reference: the stages once each, untouched, their outputs kept aside for comparison."""
    spec = QUICK_SPEC if quick else FULL_SPEC
    data = generate(work / "data", spec, progress=False)
    answers = work / "answers.csv"
    cases = stage_cases(data, answers, quick)
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    timings = {}
    for case in cases:
        if case.name == "curate":
            write_answers(reference, answers)
        timings[case.label] = timed_stage(case, reference)
        case.expected(work).mkdir(parents=True, exist_ok=True)
        for name in case.outputs:
            shutil.copy2(reference / name, case.expected(work) / name)
    return Reference(reference, cases, timings)


# --- kill -9 -------------------------------------------------------------------------------------------------
def kill_once(case: StageCase, run: Path, rng: random.Random, timing: Timing, startup: float | None) -> dict | None:
    """Start the stage and SIGKILL it at a random point; ``None`` when it finished before every attempt.

    ``startup`` given: a random time into the whole subprocess (start-up included); else a random time into
    what the undisturbed stage still did after its trigger file appeared, counted from its appearance here.
    """
    share = 1.0
    for attempt in range(KILL_ATTEMPTS):
        by_file = startup is None and case.trigger is not None
        span = timing.after_trigger if by_file else (startup or 0.0) + timing.seconds
        delay = rng.uniform(0.0, span * share)
        started = time.perf_counter()
        process = subprocess.Popen(cli_command(case.args(run)), cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while by_file and process.poll() is None and not any(run.glob(case.trigger)):
                time.sleep(POLL_S)
            deadline = time.perf_counter() + delay
            while process.poll() is None and time.perf_counter() < deadline:
                time.sleep(POLL_S)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=STAGE_TIMEOUT_S)
                return {"stage": case.label, "trigger": case.trigger if by_file else "time",
                        "delay_s": round(delay, 3), "killed_after_s": round(time.perf_counter() - started, 2),
                        "attempt": attempt + 1}
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=STAGE_TIMEOUT_S)
        share /= 2
    return None


def scenario_kill_stages(work: Path, seed: int = 0, quick: bool = True,
                         reference: Reference | None = None) -> ScenarioResult:
    """``kill -9`` of each long stage at seeded random points; the re-run must equal an undisturbed run
    (``reference``, made in ``work`` when not given).

    Quick: one kill per stage, after its first epoch checkpoint / shard (curate: after it wrote the
    propagation). Full: three per stage, alternating that with a random time into the whole subprocess.
    """
    result = ScenarioResult("kill_stages")
    rng = random.Random(seed)
    reference = reference or undisturbed_run(work, quick)
    cases, timings = reference.cases, reference.timings
    startup = None if quick else startup_seconds()
    killed = work / "killed"
    shutil.rmtree(killed, ignore_errors=True)
    kills = []
    for case in cases:
        for k in range(KILLS_PER_STAGE[quick]):
            record = kill_once(case, killed, rng, timings[case.label], None if k % 2 == 0 else startup)
            if record is None:  # the stage completed: nothing was injected
                kills.append({"stage": case.label, "note": "finished before every kill attempt"})
                continue
            result.faults_injected += 1
            record["torn_after_kill"] = torn_files(killed)
            rerun = run_cli(case.args(killed))
            record.update(rerun_rc=rerun.returncode, resumed="resuming" in rerun.stdout,
                          equal=case.equals_undisturbed(killed, work),
                          resume_left=(killed / ".resume").exists(), temp_files_left=len(temp_files(killed)))
            if rerun.returncode == 0 and record["equal"] and not record["torn_after_kill"] \
                    and not record["resume_left"]:
                result.faults_survived += 1
            else:
                record["stderr"] = rerun.stderr.strip()[-500:]
            kills.append(record)
    result.detail = {"kills": kills, "resumed": sum(bool(k.get("resumed")) for k in kills),
                     "undisturbed_s": {label: round(t.seconds, 2) for label, t in timings.items()},
                     "subprocess_startup_s": None if startup is None else round(startup, 2)}
    return result


# --- a full disk ---------------------------------------------------------------------------------------------
def file_size_limit(limit: int) -> Callable[[], None]:
    """A child's set-up: writes past ``limit`` bytes fail with EFBIG (SIGXFSZ ignored, not fatal)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> bool:
    """Exit 2 and exactly one line on stderr, ``error: ...`` containing every needle."""
    lines = done.stderr.strip().splitlines()
    return done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") \
        and all(n in lines[0] for n in needles)


def scenario_full_disk(work: Path, seed: int = 0, quick: bool = True,
                       reference: Reference | None = None) -> ScenarioResult:
    """Each stage that rewrites a big artifact, under a file-size limit below that artifact's size."""
    result = ScenarioResult("full_disk")
    reference = reference or undisturbed_run(work, quick)
    artifact = {"train": "model.pt", "embed": "attention.npz", "retrain": "slim_model.pt"}
    chosen = [c for c in reference.cases if c.name in artifact and not (quick and c.name == "retrain")]
    runs = []
    for case in chosen:
        run = work / f"full-{case.name}-{len(runs)}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(reference.run, run)
        before = digests(run)
        limit = int((run / artifact[case.name]).stat().st_size * LIMIT_SHARE)
        done = run_cli(case.args(run), preexec=file_size_limit(limit))
        result.faults_injected += 1
        after = digests(run)  # new files are caches the stage finished (attention shards): kept, they help
        record = {"stage": case.label, "limit_bytes": limit, "stderr": done.stderr.strip(),
                  "one_line": one_line_error(done, "no space left on device while writing", "free space and re-run"),
                  "files_unchanged": all(after.get(name) == digest for name, digest in before.items()),
                  "temp_files_left": temp_files(run)}
        recovered = run_cli(case.args(run)) if not quick else None
        if recovered is not None:
            record["recovered"] = recovered.returncode == 0 and case.equals_undisturbed(run, work)
        if record["one_line"] and record["files_unchanged"] and not record["temp_files_left"] \
                and record.get("recovered", True):
            result.faults_survived += 1
        runs.append(record)
    result.detail = {"cases": runs}
    return result


# --- corrupt artifacts ---------------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(random.Random(path.name).randbytes(max(64, path.stat().st_size)))


DAMAGES = {"truncated": truncate, "garbage": garbage}


@dataclass(frozen=True)
class CorruptCase:
    """A damaged artifact and the command that reads it."""

    file: str
    damage: str
    command: tuple[str, ...]  # the stage and its flags after ``--run RUN``
    quick: bool = True  # part of the quick (test) version


def corrupt_cases(answers: Path) -> list[CorruptCase]:
    return [
        CorruptCase("attention.npz", "truncated", ("curate", "--labels", str(answers))),
        CorruptCase("attention.npz", "garbage", ("retrain", "--mode", "fresh"), quick=False),
        CorruptCase("model.pt", "truncated", ("embed", "--force")),
        CorruptCase("model.pt", "garbage", ("retrain", "--mode", "last-layer"), quick=False),
        CorruptCase("propagation.npz", "garbage", ("retrain", "--mode", "fresh")),
        CorruptCase("propagation.npz", "truncated", ("sample", "--round", "2"), quick=False),
        CorruptCase("stages.json", "garbage", ("embed",)),
        CorruptCase("stages.json", "truncated", ("train",), quick=False),
        CorruptCase("config.json", "truncated", ("embed",), quick=False),
        CorruptCase("slim_model.pt", "truncated", ("report",), quick=False),
    ]


def cache_case(case: StageCase, reference: Path, work: Path) -> dict:
    """A torn cache file (epoch checkpoint, attention shard) is discarded with a warning and recomputed.

    The cache is made for real: the stage is killed once its first cache file appears, which is then torn.
    """
    run = work / f"cache-{case.name}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(reference, run)
    record = kill_once(case, run, random.Random(0), Timing(0.0, 0.0), startup=None) or {"stage": case.label}
    cached = sorted(run.glob(case.trigger or ""))
    if cached:
        truncate(cached[0])
    done = run_cli(case.args(run))
    warned = "discarding the unreadable" in done.stderr
    record.update(file=str(cached[0].relative_to(run)) if cached else None, rc=done.returncode, warned=warned,
                  equal=case.equals_undisturbed(run, work))
    record["survived"] = bool(cached) and done.returncode == 0 and warned and record["equal"]
    return record


def scenario_corrupt_artifacts(work: Path, seed: int = 0, quick: bool = True,
                               reference: Reference | None = None) -> ScenarioResult:
    """Damaged artifacts are refused in one line that names them, and nothing is changed; torn caches redone."""
    result = ScenarioResult("corrupt_artifacts")
    reference = reference or undisturbed_run(work, quick)
    records = []
    for case in (c for c in corrupt_cases(work / "answers.csv") if c.quick or not quick):
        run = work / f"corrupt-{case.file}-{case.damage}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(reference.run, run)
        DAMAGES[case.damage](run / case.file)
        before = digests(run)
        done = run_cli([case.command[0], "--run", str(run), "--quiet", *case.command[1:]])
        result.faults_injected += 1
        record = {"file": case.file, "damage": case.damage, "command": " ".join(case.command),
                  "stderr": done.stderr.strip(), "one_line": one_line_error(done, str(run.resolve() / case.file)),
                  "files_unchanged": digests(run) == before}
        result.faults_survived += record["one_line"] and record["files_unchanged"]
        records.append(record)
    for case in [] if quick else [c for c in reference.cases if c.name in ("train", "embed", "retrain")]:
        result.faults_injected += 1
        records.append(cache_case(case, reference.run, work))
        result.faults_survived += records[-1]["survived"]
    result.detail = {"cases": records}
    return result


SCENARIOS = {"kill_stages": scenario_kill_stages, "full_disk": scenario_full_disk,
             "corrupt_artifacts": scenario_corrupt_artifacts}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="scratch folder")
    parser.add_argument("--quick", action="store_true", help="the small versions the tests run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    args = parser.parse_args(argv)
    results = [SCENARIOS[name](Path(args.work) / name, seed=args.seed, quick=args.quick) for name in args.only]
    print(json.dumps([r.to_dict() for r in results], indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
