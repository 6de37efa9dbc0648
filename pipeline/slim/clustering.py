"""Clustering shared by the SLIM stages: k-means picks near centroids, and k chosen by the elbow.

``sample`` picks the image nearest each centroid so a few questions cover the ways the model attends to a
class; ``curate`` picks diverse members of a cell the same way; ``curate`` and the retraining weights split a
class into clusters with k chosen by the elbow of the inertia curve.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from pipeline.core.attention_arrays import RepresentationRows

K_RANGE = range(2, 6)  # clusters per class for curation: at least two values of a feature, at most five
PICK_INITS = 4  # k-means restarts when picking: enough for stable picks at a few percent of a class
ELBOW_INITS = 3  # restarts per k on the inertia curve: only its shape matters
# Up to this many point-centroid distances (n x k; 40 MB in float64) full k-means and its dense distance matrix
# are cheap, and every benchmark's class is below it. Above it (CelebA's large class at 3 %: 140k x 4,200 = 5.9e8,
# 4.7 GB), mini-batch k-means and a nearest-neighbour query of the centroids, which need no n x k matrix.
EXACT_KMEANS_LIMIT = 5_000_000
MINIBATCH_SIZE = 4096  # points per mini-batch step: several times k's typical size here, as scikit-learn advises
NEAREST_CANDIDATES = 8  # points fetched per centroid; more only where all of them were already taken
# Above EXACT_KMEANS_LIMIT the picks are made on the points' first PROJECTED_DIMS principal axes: k-means costs
# n x k x dims per pass, and at the attention vectors' width (2 x 1,024 to 2 x 2,048) that was 378 s for 50,000 images
# at k = 1,500 and would miss CelebA's 5 minutes. 32 is the projection propagation's kernel already compares images in.
PROJECTED_DIMS = 32
PROJECTION_FIT_ROWS = 20_000  # rows the projection is fitted on: its leading axes settle long before
PROJECTION_CHUNK = 16_384  # rows standardised and projected at a time: 128 MB of temporaries at 2,048-d
# Above this many coordinates (rows x dims) the elbow clusters the standardised points' principal axes too: its 19
# k-means fits cost ~0.35 us per coordinate (6 s for 8,600 x 2,048-d on one core), 100 s per space for CelebA's large
# class and ~40 min over ImageNet's classes. Every benchmark's class so far is below it (at most 5,026 x 128 = 0.64 M).
ELBOW_EXACT_LIMIT = 1_000_000


def pick_near_centroids(points: np.ndarray | RepresentationRows, k: int, seed: int) -> list[tuple[int, int, float]]:
    """k-means on ``points``; for each centroid the nearest unchosen point: (row, cluster, distance). Above
    ``EXACT_KMEANS_LIMIT`` both run on the points' principal axes (:func:`principal_axes`), distances included."""
    k = min(k, len(points))
    if len(points) * k > EXACT_KMEANS_LIMIT:
        projected = principal_axes(points, seed)
        kmeans = MiniBatchKMeans(n_clusters=k, n_init=PICK_INITS, random_state=seed,
                                 batch_size=max(MINIBATCH_SIZE, 3 * k)).fit(projected)
        return nearest_unchosen(projected, kmeans.cluster_centers_)
    points = np.asarray(points)  # built whole: the exact path's size is bounded by the limit
    kmeans = KMeans(n_clusters=k, n_init=PICK_INITS, random_state=seed).fit(points)
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


def principal_axes(points: np.ndarray | RepresentationRows, seed: int, scaler: StandardScaler | None = None) -> np.ndarray:
    """``points`` (standardised by ``scaler`` first, if given) on their first ``PROJECTED_DIMS`` principal axes,
    fitted on at most ``PROJECTION_FIT_ROWS`` rows: the directions along which the class varies most, where its
    clusters lie, at a width k-means can afford. Transformed ``PROJECTION_CHUNK`` rows at a time, so no
    full-width copy of the class is made (1.15 GB for 140,000 x 2,048-d)."""
    def prepared(rows: np.ndarray | slice) -> np.ndarray:
        return points[rows] if scaler is None else scaler.transform(points[rows])

    fit_rows = np.random.default_rng(seed).choice(len(points), min(len(points), PROJECTION_FIT_ROWS), replace=False)
    pca = PCA(n_components=min(PROJECTED_DIMS, *points.shape), random_state=seed).fit(prepared(np.sort(fit_rows)))
    return np.concatenate([pca.transform(prepared(slice(start, start + PROJECTION_CHUNK))).astype(np.float32)
                           for start in range(0, len(points), PROJECTION_CHUNK)])


def nearest_unchosen(points: np.ndarray, centres: np.ndarray) -> list[tuple[int, int, float]]:
    """For each centre the nearest point not chosen by a tighter centre: (row, cluster, distance), like the dense
    search in :func:`pick_near_centroids`, from a k x ``NEAREST_CANDIDATES`` neighbour query."""
    index = NearestNeighbors(n_neighbors=min(NEAREST_CANDIDATES, len(points))).fit(points)
    distances, rows = index.kneighbors(centres)
    chosen: list[tuple[int, int, float]] = []
    taken: set[int] = set()
    for cluster in np.argsort(distances[:, 0], kind="stable"):  # tightest clusters pick first
        candidates = zip(rows[cluster], distances[cluster])
        row, distance = next(((int(r), float(d)) for r, d in candidates if int(r) not in taken), (None, 0.0))
        if row is None:  # every candidate already taken: search all points for this centre
            far = np.linalg.norm(points - centres[cluster], axis=1)
            far[list(taken)] = np.inf
            row, distance = int(np.argmin(far)), float(far.min())
        taken.add(row)
        chosen.append((row, int(cluster), distance))
    return chosen


def elbow_k(points: np.ndarray, seed: int) -> int:
    """k in 2..5 where the inertia curve bends most (largest distance below the chord from k=1 to k=5)."""
    ks = [k for k in range(1, K_RANGE.stop) if k <= len(points)]
    if len(ks) < 3:
        return max(1, min(len(points), K_RANGE.start))
    inertia = np.array([KMeans(n_clusters=k, n_init=ELBOW_INITS, random_state=seed).fit(points).inertia_ for k in ks])
    x = (np.array(ks) - ks[0]) / (ks[-1] - ks[0])
    y = (inertia - inertia[-1]) / max(inertia[0] - inertia[-1], 1e-12)
    below_chord = (1 - x) - y
    candidates = [i for i, k in enumerate(ks) if k in K_RANGE]
    return ks[max(candidates, key=lambda i: below_chord[i])]


def elbow_clusters(space: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Standardise, pick k by the elbow, cluster: returns the standardised points (above ``ELBOW_EXACT_LIMIT``
    coordinates, on their principal axes) and a cluster per point."""
    if space.size > ELBOW_EXACT_LIMIT:  # standardised chunk by chunk on the way to the axes: no full copy
        scaler = StandardScaler()
        for start in range(0, len(space), PROJECTION_CHUNK):
            scaler.partial_fit(space[start:start + PROJECTION_CHUNK])
        points = principal_axes(space, seed, scaler)
    else:
        points = StandardScaler().fit_transform(space)
    return points, KMeans(n_clusters=elbow_k(points, seed), n_init=PICK_INITS, random_state=seed).fit_predict(points)
