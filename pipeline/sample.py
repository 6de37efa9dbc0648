"""SLIM step 4: choose the few images per class that annotators will see.

Per class, k-means on the attention representation with k = the class's budget, and for each centroid the
nearest image not yet chosen: the picks cover the different ways the model attends to that class, so a
handful of answers can be spread to every image. Earlier rounds' picks are never asked again.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.cluster import KMeans
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from pipeline.config import RunConfig, SampleConfig, fingerprint
from pipeline.data import load_dataset
from pipeline.errors import PipelineError
from pipeline.overlays import VIEWS, write_overlays
from pipeline.run import Run

UNCERTAIN_POOL = 3
SELECTION_COLUMNS = ("image_id", "img_filename", "y", "class_name", "pred", "confidence", "round", "cluster",
                     "distance", "overlay")


def attention_representation(arrays: dict[str, np.ndarray], space: str) -> np.ndarray:
    """Rows to cluster: unit-length f and f_rev side by side, or their standardised 2-D embeddings.

    Unit length keeps the two halves equally weighted whatever the activation scale of the backbone.
    """
    if space == "embedding":
        return StandardScaler().fit_transform(np.hstack([arrays["emb_att"], arrays["emb_rev"]]))

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    return np.hstack([unit(arrays["f_att"]), unit(arrays["f_rev"])])


def class_budget(class_size: int, config: SampleConfig) -> int:
    """Images to ask about for a class of ``class_size``: ``per_class`` or ``fraction`` (at least one)."""
    wanted = config.per_class if config.per_class is not None else math.ceil(config.fraction * class_size)
    return max(1, min(wanted, class_size))


def pick_near_centroids(points: np.ndarray, k: int, seed: int) -> list[tuple[int, int, float]]:
    """k-means on ``points``; for each centroid the nearest unchosen point: (row, cluster, distance)."""
    k = min(k, len(points))
    kmeans = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(points)
    distances = kmeans.transform(points)  # (n, k)
    chosen: list[tuple[int, int, float]] = []
    taken: set[int] = set()
    for cluster in np.argsort(distances.min(axis=0)):  # tightest clusters pick first
        for row in np.argsort(distances[:, cluster]):
            if row not in taken:
                taken.add(int(row))
                chosen.append((int(row), int(cluster), float(distances[row, cluster])))
                break
    return chosen


def select(arrays: dict[str, np.ndarray], config: SampleConfig, exclude: set[int],
           certainty: np.ndarray | None = None) -> list[tuple[int, int, float]]:
    """(row in ``arrays``, cluster, distance) for every class, never an image id in ``exclude``.

    With ``certainty`` (a later round, after propagation), only the least certain images compete: the
    ``UNCERTAIN_POOL`` x budget least certain of each class, clustered so the new questions stay diverse.
    """
    points = attention_representation(arrays, config.space)
    picks = []
    for y in np.unique(arrays["y"]):
        rows = np.flatnonzero((arrays["y"] == y) & ~np.isin(arrays["index"], list(exclude)))
        if len(rows) == 0:
            continue
        budget = class_budget(int((arrays["y"] == y).sum()), config)
        if certainty is not None:
            rows = rows[np.argsort(certainty[rows], kind="stable")[: UNCERTAIN_POOL * budget]]
        for row, cluster, distance in pick_near_centroids(points[rows], budget, config.seed):
            picks.append((int(rows[row]), cluster, distance))
    return picks


def validate(config: SampleConfig) -> None:
    if config.per_class is not None and config.per_class < 1:
        raise PipelineError(f"--per-class must be at least 1, got {config.per_class}")
    if config.per_class is None and not 0.0 < config.fraction <= 1.0:
        raise PipelineError(f"--fraction must be in (0, 1], got {config.fraction}")
    if config.round < 1:
        raise PipelineError(f"--round must be 1 or more, got {config.round}")


def earlier_picks(run: Run, round_: int) -> set[int]:
    """Image ids selected in rounds before ``round_``."""
    ids: set[int] = set()
    for earlier in range(1, round_):
        if run.selection_path(earlier).exists():
            ids |= {int(r["image_id"]) for r in run.load_csv(run.selection_path(earlier), "sample")}
    return ids


def sample_run(run: Run, config: RunConfig, force: bool = False, progress: bool = True) -> list[dict[str, str]]:
    """Write ``selection_round{R}.csv`` and one overlay PNG per selected image; reuse them if current."""
    validate(config.sample)
    round_ = config.sample.round
    arrays = run.load_arrays(run.attention_path, "embed --run RUN")
    exclude = earlier_picks(run, round_)
    certainty = None
    if round_ > 1 and run.propagation_path.exists():  # ask where the propagated answer is least sure
        propagation = run.load_arrays(run.propagation_path, "curate --run RUN")
        if np.array_equal(propagation["index"], arrays["index"]):
            certainty = propagation["certainty"]
    selection_path = run.selection_path(round_)
    stamp = fingerprint("sample", run.stage_fingerprint("embed"), config.sample, sorted(exclude),
                        None if certainty is None else certainty.round(6).tolist())
    run.save_config(config)
    if not force and run.is_done(f"sample_round{round_}", stamp, [selection_path]):
        print(f"sample: reusing {selection_path} (same attention and settings; --force re-selects)")
        return run.load_csv(selection_path, "sample")
    image_set = load_dataset(config.data.root)
    picks = select(arrays, config.sample, exclude, certainty)
    rows = []
    for row, cluster, distance in tqdm(picks, desc="overlays", disable=not progress, unit="img"):
        sample = image_set.samples[int(arrays["index"][row])]
        views = {kind: run.view_path(round_, sample.index, kind) for kind in VIEWS}
        write_overlays(image_set.root / sample.filename, arrays["cam"][row], config.embed.threshold, views)
        overlay = views["overview"]
        rows.append([sample.index, sample.filename, sample.y, image_set.class_names[sample.y],
                     int(arrays["pred"][row]), f"{float(arrays['confidence'][row]):.4f}", round_, cluster,
                     f"{distance:.4f}", str(overlay.relative_to(run.root))])
    run.save_csv(selection_path, SELECTION_COLUMNS, rows)
    run.mark_done(f"sample_round{round_}", stamp)
    _print_summary(image_set.class_names, rows, arrays)
    return run.load_csv(selection_path, "sample")


def _print_summary(class_names: list[str], rows: list[list], arrays: dict[str, np.ndarray]) -> None:
    counts = {name: 0 for name in class_names}
    for r in rows:
        counts[r[3]] += 1
    total = len(arrays["y"])
    parts = ", ".join(f"{name}: {n}" for name, n in counts.items())
    print(f"sample: {len(rows)} images to annotate ({len(rows) / total:.1%} of {total}) — {parts}")
