"""The fault suite: inject crashes, kills, a bad network, full disks and corrupt files; count what survived.

Every scenario runs the real tool against real components (a local Label Studio, the real ML backend over
HTTP, the stages as subprocesses), stops by itself and touches only 127.0.0.1. Scenarios live beside this
file by area (``faults_network``: Label Studio killed or the network failing during push and pull;
``faults_backend``: concurrent requests and a corrupt annotation store; ``faults_stages``: ``kill -9`` of
the long stages, a full disk, corrupt artifacts); their ``quick`` versions are also tests.

    python benchmarks/faults.py --out bench-out/faults.json                  # every scenario, full size
    python benchmarks/faults.py --quick --only kill_stages flaky_network     # a subset, test size

The JSON totals ``faults_injected``, ``faults_survived``, ``annotations_lost``, ``duplicate_tasks`` and
``backend_5xx`` over the scenarios, with each scenario's own counts and detail; the goal is survived =
injected and every other total 0. The exit status is 1 when a scenario missed it.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import faults_backend
import faults_network
import faults_stages
from faultkit import ScenarioResult
from machine import describe

from pipeline.core.io import atomic_write_json

Scenario = Callable[..., ScenarioResult]
AREAS = (faults_network, faults_backend, faults_stages)
TOTALS = ("faults_injected", "faults_survived", "annotations_lost", "duplicate_tasks", "backend_5xx")


def all_scenarios() -> dict[str, Scenario]:
    """Every area's scenarios by name, in the order the areas list them."""
    scenarios: dict[str, Scenario] = {}
    for area in AREAS:
        scenarios.update(area.SCENARIOS)
    return scenarios


def run_scenario(name: str, scenario: Scenario, work: Path, seed: int, quick: bool) -> dict:
    """One scenario's result; a scenario that crashes counts as one fault injected and not survived."""
    started = time.perf_counter()
    try:
        result = scenario(work / name, seed=seed, quick=quick)
    except Exception as exc:  # noqa: BLE001 - a broken scenario is reported and the suite goes on
        result = ScenarioResult(name, faults_injected=1, detail={
            "crashed": f"{exc.__class__.__name__}: {exc}", "traceback": traceback.format_exc(limit=5)})
    return {**result.to_dict(), "seconds": round(time.perf_counter() - started, 1)}


def suite(names: Sequence[str], work: Path, seed: int, quick: bool) -> dict:
    scenarios = all_scenarios()
    unknown = sorted(set(names) - set(scenarios))
    if unknown:
        raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(scenarios)}")
    results = []
    for name in names or list(scenarios):
        logging.getLogger(__name__).info("scenario %s ...", name)
        results.append(run_scenario(name, scenarios[name], work, seed, quick))
        print(json.dumps({key: results[-1][key] for key in ("name", "ok", *TOTALS, "seconds")}), flush=True)
    totals = {key: sum(r[key] for r in results) for key in TOTALS}
    return {**totals, "ok": all(r["ok"] for r in results), "quick": quick, "seed": seed,
            "machine": describe(), "scenarios": results}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], metavar="NAME", help="run only these scenarios")
    parser.add_argument("--quick", action="store_true", help="the small versions the tests run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedules")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default="bench-out/faults.json", help="JSON result file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="slim-faults-") as scratch:
        result = suite(args.only, Path(args.work or scratch), args.seed, args.quick)
    atomic_write_json(Path(args.out), result)
    print(json.dumps({key: result[key] for key in ("ok", *TOTALS)}, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
