"""Stages at scale (issue 12): propagation, sampling and the dataset check, against the way they worked before.

* **propagate**: ``propagate()`` on random attention vectors (``--dims``-d, two classes, 2 % answered, half
  core), ``--sizes`` images per class. Classes above ``DENSE_SPREAD_LIMIT`` spread on a sparse k-nearest-neighbour
  RBF graph; the dense graph (the exact kernel below the limit) is measured beside it up to ``--dense-max``.
* **sample**: ``pick_near_centroids`` with k = 3 % of the class (SLIM's budget at the top of its range) on the
  same vectors: mini-batch k-means and a neighbour query above ``EXACT_KMEANS_LIMIT`` distances, full k-means
  and the dense n x k distance matrix (the way below it) up to ``--dense-max``.
* **write**: the end of ``embed`` for ``--write-sizes`` images (512-d vectors, 7 x 7 maps, in the pass's shards of
  512 rows): ``attention.npz`` written field by field from the shards and the 2-D embedding (PCA here) fit on at
  most ``EMBED_FIT_ROWS`` rows, against stacking every row in memory and ``np.savez`` (the way before);
* **check**: ``load_dataset`` on a folder of ``--check-images`` small PNGs: the first check (every file opened,
  in parallel threads) against a later stage's (the run's manifest trusted for unchanged files) and against
  opening every file one by one, as every stage did before.

Each measurement runs in a fresh child process, so its peak resident memory is its own (the interpreter, numpy,
scikit-learn and torch included: ~0.4 GB of it is the imports).

* **agreement**: on the synthetic family's real attention (the runs ``benchmarks/wga.py`` builds), the verdicts
  (score >= ``CORE_CUT``) the sparse graph gives against the dense one, and each against the true verdicts
  (AIoU >= 0.5; evaluation only), with the simulated annotator's 2 % answers; and whether the fresh retraining's
  cells (:func:`pipeline.slim.weights.spurious_space_cells`) come out the same: where they do, the retrained
  model is the dense graph's, bit for bit, so its worst-group accuracy needs no new training to compare.

* **presets** (``--preset celeba|imagenet``): SLIM's stages end to end at a real dataset's size, on synthetic
  attention with planted structure (:func:`plant`), memory-mapped and read class by class as the pipeline reads
  ``attention.npz``: ``sample`` (the default 2 % budget), ``propagate`` (answers from the planted verdicts of the
  sampled images, as the simulated annotator gives them), ``curate`` (the default subset) and ``weights`` (the
  fresh retraining's cells). Run at ``--growth-sizes`` images too, to fit how total time grows; each stage's
  quality is scored against the planted truth. The JSON has ``targets_met`` for the issue's targets.
  ``--preset-dims`` narrows the vectors where the disk cannot hold them (ImageNet's f and f_rev at 2,048-d: 21 GB).

    python benchmarks/scale.py --sizes 10000 20000 50000 100000 --sample-sizes 10000 20000 --out bench-out/scale.json
    python benchmarks/scale.py --preset celeba --out bench-out/scale-celeba.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core import data as data_module
from pipeline.core.attention_arrays import AttentionArrays, save_streamed
from pipeline.core.config import SampleConfig
from pipeline.core.data import load_dataset
from pipeline.core.io import atomic_write_json
from pipeline.core.synth import VARIANTS
from pipeline.core.verdicts import AIOU_CORE, CORE_CUT
from pipeline.slim import clustering
from pipeline.slim import propagate as propagation_module
from pipeline.slim.curate import curate, default_subset_size
from pipeline.slim.propagate import Answers, Propagation, propagate
from pipeline.slim.sample import select
from pipeline.slim.weights import cell_balanced_weights, spurious_space_cells

ANSWERED_SHARE = 0.02  # the default sampling budget
SAMPLED_SHARE = 0.03  # the top of SLIM's "few percent": the largest k sampling meets
STAGES = ("propagate", "sample", "write", "check")
WRITE_DIMS, WRITE_MAP = 512, 7  # ResNet-18's features and map at 224 px
PRESET_STAGES = ("sample", "propagate", "curate", "weights")  # each reads what the one before it wrote
MAX_GROWTH_EXPONENT = 1.2  # the target: total time may grow a little faster than the images, not ~n^2
QUALITY_TOLERANCE = 0.02  # the target: propagation accuracy within 2 points of the 10,000-image figure
GB = 2**30
# Planted attention, per class: each image's attention lies a share LAMBDA of the way from a background direction
# (2 per class: the majority's and the minority's, the spurious feature's two values) to an object direction
# (OBJECT_MODES per class: how the object varies), f_rev the rest; the planted verdict is core where LAMBDA >= 0.5,
# as the annotator's AIoU >= 0.5 rule. LAMBDA = sigmoid(z), z ~ N(+-CORE_LEAN, LAMBDA_SPREAD): every other class
# leans core (71 % core), the rest spurious, and many images sit near the cut, so propagation has errors to make.
OBJECT_MODES = 3
MINORITY_SHARE = 0.1  # images with the spurious feature's rare value: the group SLIM's balancing must lift
CORE_LEAN, LAMBDA_SPREAD = 0.85, 1.5
NOISE = 1.0  # norm of each vector's isotropic noise, as large as a mode's: scattered over every dimension
ERROR_RATE = {False: 0.02, True: 0.3}  # the reference model's training errors, majority vs minority (the shortcut)
PLANT_CHUNK = 65_536  # rows generated and written at a time: 0.5 GB per vector field at 2,048-d
MEMORY_POLL_S = 0.05  # how often a stage's private memory is read: its peaks last far longer


@dataclass(frozen=True)
class Preset:
    """A dataset's shape: its size, its classes, the attention vectors' width, and the issue's targets for it."""

    name: str
    images: int
    class_shares: tuple[float, ...]  # classes grow with the dataset (CelebA); empty: classes of fixed size
    classes: int
    dims: int
    max_seconds: float  # sample + propagate + curate + weights, on 2 cores
    max_rss_gb: float

    def class_sizes(self, images: int) -> np.ndarray:
        """Images per class at ``images`` in all: the shares kept (CelebA), or ImageNet's class size kept and
        fewer classes, so a smaller run is a slice of the real one."""
        classes = len(self.class_shares) or max(2, round(images * self.classes / self.images))
        shares = np.array(self.class_shares) if self.class_shares else np.full(classes, 1 / classes)
        sizes = np.floor(shares * images).astype(int)
        sizes[: images - sizes.sum()] += 1  # the rounding's remainder, one image per class
        return sizes


PRESETS = {preset.name: preset for preset in (
    Preset("celeba", 162_770, (0.86, 0.14), 2, 2048, 5 * 60, 4.0),  # blond hair: 14 % of CelebA's training split
    Preset("imagenet", 1_281_167, (), 1000, 2048, 45 * 60, 8.0),
)}


def random_arrays(per_class: int, dims: int, seed: int = 0) -> AttentionArrays:
    """Two classes of ``per_class`` random attention vectors (f and f_rev ``dims``-d each), as ``embed`` writes."""
    rng = np.random.default_rng(seed)
    n = 2 * per_class
    vectors = rng.normal(size=(n, dims)).astype(np.float32)
    return AttentionArrays(index=np.arange(n), y=np.repeat([0, 1], per_class), pred=np.zeros(n, dtype=int),
                           confidence=np.ones(n), entropy=np.zeros(n), features=vectors, f_att=vectors,
                           f_rev=rng.normal(size=(n, dims)).astype(np.float32),
                           cam=np.zeros((n, 1, 1), dtype=np.float16), class_names=("a", "b"))


def image_folder(root: Path, count: int) -> Path:
    """A class-per-folder tree of ``count`` 32 px PNGs (two classes), made once per size."""
    if not root.exists():
        rng = np.random.default_rng(0)
        partial = root.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        for i in range(count):
            folder = partial / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:07d}.png")
        partial.rename(root)
    return root


def child(stage: str, size: int, dims: int, dense: bool, folder: str) -> dict:
    """One measurement, in this process: seconds and peak resident memory."""
    result: dict = {"stage": stage, "size": size, "way": "before" if dense else "now"}
    if stage == "write":
        result["seconds"] = write_attention(size, Path(folder), before=dense)
    elif stage == "check":
        root = Path(folder)
        manifest = root.parent / f"{root.name}-manifest.json"
        if dense:  # before: every file opened, one by one, by every stage
            data_module.CHECK_THREADS = 1
            manifest = None
        started = time.perf_counter()
        load_dataset(root, manifest)
        result["seconds"] = round(time.perf_counter() - started, 2)
        if manifest is not None:
            started = time.perf_counter()
            load_dataset(root, manifest)  # a later stage: the manifest trusted
            result["later_stage_seconds"] = round(time.perf_counter() - started, 2)
            manifest.unlink()
    else:
        arrays = random_arrays(size, dims)
        started = time.perf_counter()
        if stage == "propagate":
            if dense:
                propagation_module.DENSE_SPREAD_LIMIT = 10**9
            rng = np.random.default_rng(1)
            answered = rng.choice(len(arrays), int(ANSWERED_SHARE * len(arrays)), replace=False)
            propagate(arrays, Answers({int(i): int(k % 2) for k, i in enumerate(answered)}))
        else:
            if dense:
                clustering.EXACT_KMEANS_LIMIT = 10**18
            points = arrays.representation()[arrays.for_class(0)]
            clustering.pick_near_centroids(points, int(SAMPLED_SHARE * size), seed=0)
        result["seconds"] = round(time.perf_counter() - started, 2)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return result


def write_attention(rows: int, scratch: Path, before: bool) -> float:
    """Seconds to turn ``rows`` images' shards into ``attention.npz``, now (streamed) or before (stacked)."""
    # the attention pass's modules load torch: imported here only, so the stage children's memory is their own
    from pipeline.model.attention import SHARD_IMAGES, AttentionShards
    from pipeline.model.embed import embed_2d, embed_2d_streamed

    rng = np.random.default_rng(0)
    shards = AttentionShards(scratch / f"shards-{rows}", "k", SHARD_IMAGES)
    shards.folder.mkdir(parents=True, exist_ok=True)
    count = shards.write(({"index": np.arange(start, start + n), "y": np.arange(n) % 2,
                           "features": rng.normal(size=(n, WRITE_DIMS)).astype(np.float32),
                           "f_att": rng.normal(size=(n, WRITE_DIMS)).astype(np.float32),
                           "f_rev": rng.normal(size=(n, WRITE_DIMS)).astype(np.float32),
                           "cam": rng.random((n, WRITE_MAP, WRITE_MAP)).astype(np.float16)}
                          for start in range(0, rows, SHARD_IMAGES) for n in [min(SHARD_IMAGES, rows - start)]), 0)
    path = scratch / f"attention-{rows}.npz"
    started = time.perf_counter()
    if before:
        stacked = {key: np.concatenate(list(shards.column(count, key))) for key in shards.load(0)}
        stacked.update(emb_att=embed_2d(stacked["f_att"], "pca", 0), emb_rev=embed_2d(stacked["f_rev"], "pca", 0))
        np.savez(path, **stacked)
    else:
        whole = {f"emb_{side}": embed_2d_streamed(lambda side=side: shards.column(count, f"f_{side}"), rows, "pca", 0)
                 for side in ("att", "rev")}
        save_streamed(path, lambda key: shards.column(count, key), shards.load(0), rows, whole)
    seconds = time.perf_counter() - started
    shutil.rmtree(shards.folder)
    path.unlink()
    return round(seconds, 2)


def agreement(work: Path, variants: list[str], seeds: list[int]) -> list[dict]:
    """Sparse against dense verdicts on the family's attention (every class forced onto the sparse graph)."""
    from wga import build, simulated_answers

    rows = []
    for variant in variants:
        for seed in seeds:
            run = build(work, seed, variant)
            arrays = AttentionArrays.load(run.attention_path)
            answers = simulated_answers(run, arrays, 0.0, seed).answers
            dense, _ = propagate(arrays, answers)
            limit = propagation_module.DENSE_SPREAD_LIMIT
            propagation_module.DENSE_SPREAD_LIMIT = 0
            try:
                knn, _ = propagate(arrays, answers)
            finally:
                propagation_module.DENSE_SPREAD_LIMIT = limit
            truth = arrays.aiou >= AIOU_CORE
            same_cells = np.array_equal(spurious_space_cells(arrays, dense, seed).cells,
                                        spurious_space_cells(arrays, knn, seed).cells)
            rows.append({"variant": variant, "seed": seed, "same_cells": bool(same_cells),
                         "verdicts_agree": float(((dense >= CORE_CUT) == (knn >= CORE_CUT)).mean()),
                         "dense_right": float(((dense >= CORE_CUT) == truth).mean()),
                         "sparse_right": float(((knn >= CORE_CUT) == truth).mean())})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def plant(folder: Path, sizes: np.ndarray, dims: int, seed: int = 0) -> None:
    """Attention data with known verdicts and groups (see ``OBJECT_MODES``), as ``.npy`` files in ``folder``.

    Rows mix the classes (as a shuffled dataset's do), so reading one class touches pages all over the file;
    ``f_att`` and ``f_rev`` are written ``PLANT_CHUNK`` rows at a time, never held whole.
    """
    rng = np.random.default_rng(seed)
    n, classes = int(sizes.sum()), len(sizes)
    y = rng.permutation(np.repeat(np.arange(classes), sizes))
    share = 1 / (1 + np.exp(-rng.normal(np.where(y % 2 == 0, CORE_LEAN, -CORE_LEAN), LAMBDA_SPREAD)))
    minority = rng.random(n) < MINORITY_SHARE
    wrong = rng.random(n) < np.where(minority, ERROR_RATE[True], ERROR_RATE[False])
    objects = rng.normal(size=(classes, OBJECT_MODES, dims)).astype(np.float32) / np.sqrt(dims)
    backgrounds = rng.normal(size=(classes, 2, dims)).astype(np.float32) / np.sqrt(dims)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "rows.npz", y=y, pred=np.where(wrong, (y + 1) % classes, y), verdict=share >= 0.5,
             minority=minority)
    mode = rng.integers(OBJECT_MODES, size=n)
    fields = {side: np.lib.format.open_memmap(folder / f"f_{side}.npy", "w+", np.float32, (n, dims))
              for side in ("att", "rev")}
    for start in range(0, n, PLANT_CHUNK):
        rows = slice(start, min(n, start + PLANT_CHUNK))
        chunk = np.random.default_rng([seed, start])
        on = share[rows, None].astype(np.float32)
        obj, background = objects[y[rows], mode[rows]], backgrounds[y[rows], minority[rows].astype(int)]
        for side, weight in (("att", on), ("rev", 1 - on)):
            noise = chunk.normal(scale=NOISE / np.sqrt(dims), size=(len(on), dims)).astype(np.float32)
            fields[side][rows] = weight * obj + (1 - weight) * background + noise
    for field in fields.values():
        field.flush()


def planted_arrays(folder: Path) -> tuple[AttentionArrays, dict[str, np.ndarray]]:
    """The planted data as a stage reads it: ``f_att`` and ``f_rev`` memory-mapped; and the planted truth."""
    with np.load(folder / "rows.npz") as npz:
        truth = {key: npz[key] for key in npz.files}
    n = len(truth["y"])
    f_att = np.load(folder / "f_att.npy", mmap_mode="r")
    arrays = AttentionArrays(index=np.arange(n), y=truth["y"], pred=truth["pred"], confidence=np.ones(n),
                             entropy=np.zeros(n), features=f_att, f_att=f_att,  # features: read by no stage here
                             f_rev=np.load(folder / "f_rev.npy", mmap_mode="r"),
                             cam=np.zeros((n, 1, 1), dtype=np.float16),
                             class_names=tuple(str(c) for c in range(int(truth["y"].max()) + 1)))
    return arrays, truth


def run_stage(stage: str, arrays: AttentionArrays, truth: dict[str, np.ndarray], folder: Path) -> dict[str, float]:
    """One SLIM stage as the pipeline calls it, its output saved in ``folder`` for the next; its quality against
    the planted truth (computed after the clock stops)."""
    minority = truth["minority"]
    if stage == "sample":
        rows = np.array([row for row, _, _ in select(arrays, SampleConfig(), exclude=set())])
        np.save(folder / "picked.npy", rows)
        return {"picked_minority_share": float(minority[rows].mean())}
    if stage == "propagate":
        rows = np.load(folder / "picked.npy")
        answers = Answers({int(arrays.index[r]): int(truth["verdict"][r]) for r in rows})
        scores = Propagation.of(arrays, answers).score
        np.save(folder / "scores.npy", scores)
        return {"propagation_accuracy": float(((scores >= CORE_CUT) == truth["verdict"]).mean())}
    scores = np.load(folder / "scores.npy")
    if stage == "curate":
        size = default_subset_size(len(arrays), len(arrays.classes))
        rows = np.array([pick.row for pick in curate(arrays, scores, size)])
        return {"curated_minority_share": float(minority[rows].mean())}
    weights = cell_balanced_weights(arrays.y, spurious_space_cells(arrays, scores).cells)
    return {"weighted_minority_share": float(weights[minority].sum() / weights.sum())}


def stage_child(stage: str, folder: Path) -> dict:
    """One preset stage, in this process: seconds, CPU seconds, peak resident memory, quality."""
    arrays, truth = planted_arrays(folder)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    quality = run_stage(stage, arrays, truth, folder)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    return {"seconds": round(seconds, 1), "cpu_s": round(cpu, 1),
            "peak_rss_gb": round(status_bytes("self", "VmHWM") / GB, 2), "quality": quality}


def cpu_seconds() -> float:
    """This process's CPU time: what a stage costs whatever else shares the cores (wall seconds do not)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def status_bytes(pid: int | str, field: str) -> int:
    """A memory figure of a process's ``/proc/PID/status``; 0 once it has gone. Its ``VmHWM`` (peak resident
    memory) is the process's own, where ``ru_maxrss`` starts from the parent's peak at the fork."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def watched_child(command: list[str]) -> tuple[str, int]:
    """Run ``command``: its output and its peak private memory, polled from outside. ``ru_maxrss`` also counts the
    pages of the memory-mapped attention file, which the kernel can drop at will; a thread inside the child would
    wait for the interpreter lock through long numpy calls and miss the peaks."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while True:
        try:
            out, err = process.communicate(timeout=MEMORY_POLL_S)
            break
        except subprocess.TimeoutExpired:
            peak = max(peak, status_bytes(process.pid, "RssAnon"))
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command, out, err)
    return out, peak


def preset_size(preset: Preset, images: int, dims: int, scratch: Path) -> dict:
    """Plant ``images`` images of ``preset``'s shape, run every stage in a fresh child, delete the data."""
    folder = scratch / f"{preset.name}-{images}"
    sizes = preset.class_sizes(images)
    started = time.perf_counter()
    plant(folder, sizes, dims)
    result: dict = {"images": images, "classes": len(sizes), "dims": dims,
                    "plant_s": round(time.perf_counter() - started, 1), "stages": {}}
    try:
        for stage in PRESET_STAGES:
            out, private = watched_child([sys.executable, __file__, "--stage-child", stage, str(folder)])
            result["stages"][stage] = {**json.loads(out.strip().splitlines()[-1]),
                                       "peak_private_gb": round(private / GB, 2)}
            print(json.dumps({"images": images, "stage": stage, **result["stages"][stage]}), flush=True)
    finally:
        shutil.rmtree(folder)
    return {**result, **size_totals(result["stages"])}


def size_totals(stages: dict[str, dict]) -> dict:
    """One size's figures over its stages: seconds and CPU seconds summed, the largest peaks, every quality."""
    return {"total_s": round(sum(s["seconds"] for s in stages.values()), 1),
            "total_cpu_s": round(sum(s["cpu_s"] for s in stages.values()), 1),
            "peak_rss_gb": max(s["peak_rss_gb"] for s in stages.values()),
            "peak_private_gb": max(s["peak_private_gb"] for s in stages.values()),
            "quality": {key: value for s in stages.values() for key, value in s["quality"].items()}}


def growth_exponent(runs: list[dict], seconds: str) -> float:
    """The slope of log ``seconds`` against log images: 1 is linear, 2 quadratic."""
    return float(np.polyfit(np.log([r["images"] for r in runs]), np.log([r[seconds] for r in runs]), 1)[0])


def summary(preset: Preset, sizes: list[dict]) -> dict:
    """The issue's figures for the full size (the last of ``sizes``) and whether each target is met. Wall seconds
    are the targets'; CPU seconds (one thread: what the stages cost on cores of their own) are given beside them."""
    full, smallest = sizes[-1], sizes[0]
    accuracy = "propagation_accuracy"
    result = {"sizes": sizes, "stages": full["stages"],
              **{key: full[key] for key in ("total_s", "total_cpu_s", "peak_rss_gb", "peak_private_gb", "quality")},
              "growth_exponent": round(growth_exponent(sizes, "total_s"), 3),
              "growth_exponent_cpu": round(growth_exponent(sizes, "total_cpu_s"), 3)}
    result["targets_met"] = {
        f"total_s <= {preset.max_seconds:g}": full["total_s"] <= preset.max_seconds,
        f"peak_rss_gb <= {preset.max_rss_gb:g}": full["peak_rss_gb"] <= preset.max_rss_gb,
        f"growth_exponent <= {MAX_GROWTH_EXPONENT}": result["growth_exponent"] <= MAX_GROWTH_EXPONENT,
        f"{accuracy} within {QUALITY_TOLERANCE:.0%} of {smallest['images']} images": all(
            abs(r["quality"][accuracy] - smallest["quality"][accuracy]) <= QUALITY_TOLERANCE for r in sizes),
        # beside the targets: the same limits on CPU seconds and on private memory (no mapped file pages)
        f"total_cpu_s <= {preset.max_seconds:g}": full["total_cpu_s"] <= preset.max_seconds,
        f"peak_private_gb <= {preset.max_rss_gb:g}": full["peak_private_gb"] <= preset.max_rss_gb,
        f"growth_exponent_cpu <= {MAX_GROWTH_EXPONENT}": result["growth_exponent_cpu"] <= MAX_GROWTH_EXPONENT,
    }
    return result


def run_preset(preset: Preset, growth_sizes: list[int], dims: int, scratch: Path, out: Path) -> dict:
    """The preset at ``growth_sizes`` and at its full size, written to ``out`` after each size."""
    result: dict = {"preset": preset.name, "images": preset.images, "dims": dims,
                    "threads": os.environ.get("OMP_NUM_THREADS", "all"), "sizes": []}
    for images in sorted({*growth_sizes, preset.images}):
        result["sizes"].append(preset_size(preset, images, dims, scratch))
        atomic_write_json(out, result)
    result.update(summary(preset, result["sizes"]))
    atomic_write_json(out, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--sizes", nargs="+", type=int, default=[10000, 20000, 50000],
                        help="images per class (propagate)")
    parser.add_argument("--sample-sizes", nargs="+", type=int, default=[10000, 20000],
                        help="images per class (sample: k = 3 %% of it, so the old way's n x k grows fast)")
    parser.add_argument("--dims", type=int, default=512)
    parser.add_argument("--dense-max", type=int, default=20000, help="largest class the old way is run on")
    parser.add_argument("--write-sizes", nargs="+", type=int, default=[10000, 100000],
                        help="images (write)")
    parser.add_argument("--check-images", nargs="+", type=int, default=[20000], help="image files (check)")
    parser.add_argument("--synth", nargs="*", default=list(VARIANTS), choices=VARIANTS,
                        help="family sets for the agreement check (none: skip it)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("bench-out/wga"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/scale.json"))
    parser.add_argument("--preset", choices=PRESETS, help="run SLIM's stages at this dataset's size instead")
    parser.add_argument("--growth-sizes", nargs="+", type=int, default=[10_000, 100_000],
                        help="images the preset also runs at, to fit the growth exponent (the first is the quality "
                             "reference)")
    parser.add_argument("--preset-dims", type=int, help="attention vectors' width (default: the preset's)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the planted data lies while its stages run (deleted after)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)  # stage size dims dense folder
    parser.add_argument("--stage-child", nargs=2, help=argparse.SUPPRESS)  # stage folder
    args = parser.parse_args()
    if args.stage_child:
        print(json.dumps(stage_child(args.stage_child[0], Path(args.stage_child[1]))))
        return
    if args.preset:
        preset = PRESETS[args.preset]
        run_preset(preset, args.growth_sizes, args.preset_dims or preset.dims, args.scratch, args.out)
        return
    if args.child:
        stage, size, dims, dense, folder = args.child
        print(json.dumps(child(stage, int(size), int(dims), dense == "1", folder)))
        return
    result: dict = {"measurements": [],
                    "agreement": agreement(args.work, args.synth, args.seeds) if args.synth else []}
    with tempfile.TemporaryDirectory() as scratch:
        jobs = [("propagate", size, "") for size in args.sizes if "propagate" in args.stages]
        jobs += [("sample", size, "") for size in args.sample_sizes if "sample" in args.stages]
        jobs += [("write", size, scratch) for size in args.write_sizes if "write" in args.stages]
        if "check" in args.stages:
            jobs += [("check", n, str(image_folder(Path(scratch) / f"images-{n}", n))) for n in args.check_images]
        for stage, size, folder in jobs:
            for dense in ([True, False] if stage in ("check", "write") or size <= args.dense_max else [False]):
                out = subprocess.run([sys.executable, __file__, "--child", stage, str(size), str(args.dims),
                                      str(int(dense)), folder or "-"], capture_output=True, text=True, check=True)
                result["measurements"].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(result["measurements"][-1]), flush=True)
                atomic_write_json(args.out, result)
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
