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

    python benchmarks/scale.py --sizes 10000 20000 50000 100000 --sample-sizes 10000 20000 --out bench-out/scale.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core import data as data_module
from pipeline.core.data import load_dataset
from pipeline.core.io import atomic_write_json
from pipeline.core.synth import VARIANTS
from pipeline.core.verdicts import CORE_CUT
from pipeline.labelstudio.annotator import AIOU_CORE
from pipeline.model.attention import SHARD_IMAGES, AttentionArrays, AttentionShards, save_streamed
from pipeline.model.embed import embed_2d, embed_2d_streamed
from pipeline.slim import clustering
from pipeline.slim import propagate as propagation_module
from pipeline.slim.propagate import Answers, propagate
from pipeline.slim.weights import spurious_space_cells

ANSWERED_SHARE = 0.02  # the default sampling budget
SAMPLED_SHARE = 0.03  # the top of SLIM's "few percent": the largest k sampling meets
STAGES = ("propagate", "sample", "write", "check")
WRITE_DIMS, WRITE_MAP = 512, 7  # ResNet-18's features and map at 224 px


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
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)  # stage size dims dense folder
    args = parser.parse_args()
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
