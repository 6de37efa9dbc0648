"""SLIM step 6: spread the annotators' answers to every training image of the same class.

Per class, scikit-learn's ``LabelSpreading`` (RBF kernel) over the attention representation gives each
image an attention-correctness score ``P(core)`` in [0, 1] and a certainty in [0, 1]. ``unsure`` answers
are not evidence. Several answers on one image are reduced to the majority; a tie counts as unsure. Nothing
is dropped silently: :class:`Answers` counts what each rule did.

A class where every answer is the same cannot be spread as two labels. There, the score moves from
``UNDECIDED`` (0.5, no evidence) towards the shared answer with the image's RBF similarity to the nearest
answered image: an image that looks (to the model) like the answered ones inherits their verdict, one unlike
all of them stays undecided, which keeps a ranking inside the class instead of a constant.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse
from sklearn.decomposition import PCA
from sklearn.metrics.pairwise import euclidean_distances, rbf_kernel
from sklearn.neighbors import NearestNeighbors
from sklearn.semi_supervised import LabelSpreading

from pipeline.core.config import RunConfig, fingerprint
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write
from pipeline.core.run import Run, reading
from pipeline.core.store import Annotation, AnnotationStore
from pipeline.core.verdicts import CHOICES, CORE, SPURIOUS, UNDECIDED
from pipeline.model.attention import AttentionArrays

log = logging.getLogger(__name__)
MAX_DIMS = 32  # the kernel sees a PCA projection: RBF distances in 256-D are all alike
KERNEL_SAMPLE = 1000  # images whose pairwise distances set the RBF width: a median needs no more
SPREAD_ALPHA = 0.2  # LabelSpreading's clamping: an answered image keeps 80 % of its own verdict
SPREAD_ITERATIONS = 100  # LabelSpreading converges in far fewer steps on a few thousand images
# RBF width as a multiple of the class's median pairwise distance. Swept over 0.5 / 1 / 2 on the synthetic family
# (benchmarks/sweep.py, BENCHMARKS.md): no width changes the cells the fresh retraining balances; propagation
# accuracy against the true verdicts is 94.2 / 93.3 / 87.1 % (family mean), mixed attention preferring local
# spreading (92.2 / 87.0 / 62.3 %), the others level within 1.5 points. Kept at 1x: the remedies' rows were measured so.
SPREAD_WIDTH = 1.0
# Above this many images in a class the RBF graph keeps only each image's nearest neighbours (a sparse matrix):
# the dense n x n kernel needs 2.2 GB at 10k images and grows quadratically (a 45k class exhausts 24 GB). Below it,
# the exact dense graph, as measured on every benchmark.
DENSE_SPREAD_LIMIT = 5000
SPREAD_NEIGHBOURS = 30  # neighbours per image in the sparse graph: far pairs carry little RBF weight among 5,000+
# Above this many images in a class the neighbours are approximate (pynndescent): exact search grows with the square
# of the class (measured 64 s at 100k, 257 s at 200k images on one core, against 19 s and 44 s approximate, with
# 88-91 % of the exact neighbours found on random 32-d points, its hardest case; BENCHMARKS.md)
APPROXIMATE_NEIGHBOURS_ABOVE = 50_000


@dataclass
class Answers:
    """One verdict per image (1 core, 0 spurious) and an account of how it was reached."""

    labels: dict[int, int]
    counts: Counter = field(default_factory=Counter)


def consolidate(annotations: Iterable[Annotation]) -> Answers:
    """Majority answer per image; unsure, skipped and tied images carry no verdict (and are counted)."""
    by_image: dict[int, list[str]] = {}
    counts: Counter = Counter()
    for annotation in annotations:
        if annotation.skipped or annotation.choice is None:
            counts["skipped"] += 1
            continue
        by_image.setdefault(annotation.image_id, []).append(annotation.choice)
    labels = {}
    for image_id, choices in by_image.items():
        votes = Counter(c for c in choices if c != "unsure")
        counts["multi_annotated"] += len(choices) > 1
        if not votes or votes["core"] == votes["spurious"]:
            counts["unsure_or_tied"] += 1
            continue
        labels[image_id] = CORE if votes["core"] > votes["spurious"] else SPURIOUS
        counts["core" if labels[image_id] == CORE else "spurious"] += 1
    return Answers(labels, counts)


def kernel_gamma(points: np.ndarray, width: float = SPREAD_WIDTH) -> float:
    """RBF gamma for a width of ``width`` x the median pairwise distance (a scale-free default)."""
    sample = points[: min(len(points), KERNEL_SAMPLE)]
    distances = euclidean_distances(sample, sample)
    median = float(np.median(distances[np.triu_indices(len(sample), k=1)])) if len(sample) > 1 else 1.0
    return 1.0 / max((width * median) ** 2, 1e-12)


def sparse_rbf_kernel(gamma: float):
    """LabelSpreading's RBF affinity restricted to each image's ``SPREAD_NEIGHBOURS`` nearest neighbours
    (symmetrised, so an edge counts from both ends): memory and time grow ~linearly with the class."""

    def kernel(points: np.ndarray, _: np.ndarray) -> sparse.csr_matrix:
        graph = neighbour_graph(points, min(SPREAD_NEIGHBOURS, len(points) - 1))
        graph.data = np.exp(-gamma * graph.data**2)
        return graph.maximum(graph.T).tocsr()

    return kernel


def neighbour_graph(points: np.ndarray, neighbours: int) -> sparse.csr_matrix:
    """Each point's ``neighbours`` nearest other points as a sparse distance matrix: exact, or approximate above
    ``APPROXIMATE_NEIGHBOURS_ABOVE`` points."""
    if len(points) <= APPROXIMATE_NEIGHBOURS_ABOVE:
        return NearestNeighbors(n_neighbors=neighbours).fit(points).kneighbors_graph(mode="distance")
    # imported here: pynndescent compiles with numba on first use, worth it only where exact search is slow
    from pynndescent import NNDescent

    found, distances = NNDescent(points, n_neighbors=neighbours + 1, random_state=0).neighbor_graph
    rows = np.repeat(np.arange(len(points)), neighbours)
    others = found[:, 1:]  # the first neighbour is the point itself
    return sparse.csr_matrix((distances[:, 1:].ravel(), (rows, others.ravel())), shape=(len(points),) * 2)


def spread_class(points: np.ndarray, labelled: dict[int, int],
                 width: float = SPREAD_WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """(P(core), certainty) for every row of ``points``; ``labelled`` maps row -> 1/0."""
    if not labelled:
        return np.full(len(points), UNDECIDED), np.zeros(len(points))
    gamma = kernel_gamma(points, width)
    rows = np.fromiter(labelled, dtype=int)
    values = np.array([labelled[r] for r in rows])
    if len(set(values)) == 1:
        similarity = rbf_kernel(points, points[rows], gamma=gamma).max(axis=1)
        direction = 1.0 if values[0] == CORE else -1.0
        return UNDECIDED * (1.0 + direction * similarity), similarity
    targets = np.full(len(points), -1)
    targets[rows] = values
    kernel = "rbf" if len(points) <= DENSE_SPREAD_LIMIT else sparse_rbf_kernel(gamma)
    model = LabelSpreading(kernel=kernel, gamma=gamma, alpha=SPREAD_ALPHA, max_iter=SPREAD_ITERATIONS)
    model.fit(points, targets)
    distribution = model.label_distributions_
    p_core = distribution[:, list(model.classes_).index(CORE)]
    return p_core, np.abs(2 * p_core - 1)


def propagate(arrays: AttentionArrays, answers: Answers,
              width: float = SPREAD_WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """Scores and certainties for every training image (rows of ``arrays``); ``width`` as in :func:`kernel_gamma`."""
    scores = np.full(len(arrays), UNDECIDED)
    certainty = np.zeros(len(arrays))
    for y in arrays.classes:
        members = arrays.for_class(y)
        representation = arrays.representation("vectors", members)  # one class in memory at a time
        dims = min(MAX_DIMS, len(members), representation.shape[1])
        points = PCA(n_components=dims, random_state=0).fit_transform(representation)
        position = {row: k for k, row in enumerate(members)}
        labelled = {position[arrays.row_of(i)]: v for i, v in answers.labels.items()
                    if arrays.has_image(i) and arrays.row_of(i) in position}
        scores[members], certainty[members] = spread_class(points, labelled, width)
    return scores, certainty


@dataclass(frozen=True, eq=False)
class Propagation:
    """``propagation.npz``: what curation, retraining, the report, the next round and the ML backend read."""

    index: np.ndarray  # (N,) image ids, the rows of the attention data
    score: np.ndarray  # (N,) P(core): how likely the image's attention is on the object
    certainty: np.ndarray  # (N,) in [0, 1]: how far the score is from undecided
    answered: np.ndarray  # (N,) bool: the image itself has a verdict

    @classmethod
    def of(cls, arrays: AttentionArrays, answers: Answers) -> Propagation:
        """Spread ``answers`` over ``arrays``."""
        scores, certainty = propagate(arrays, answers)
        answered = np.array([int(i) in answers.labels for i in arrays.index])
        return cls(arrays.index, scores, certainty, answered)

    def matches(self, arrays: AttentionArrays) -> bool:
        """Whether these scores belong to ``arrays`` (same images, same order), not to an older attention."""
        return np.array_equal(self.index, arrays.index)

    def save(self, path: Path) -> None:
        atomic_write(path, lambda handle: np.savez(handle, index=self.index, score=self.score,
                                                     certainty=self.certainty, answered=self.answered))

    @classmethod
    def load(cls, path: Path) -> Propagation:
        with reading(path), np.load(path, allow_pickle=False) as npz:
            return cls(npz["index"], npz["score"], npz["certainty"], npz["answered"])


def answers_from_csv(path: str | Path) -> list[Annotation]:
    """Answers from a CSV of ``image_id,label`` (label core / spurious / unsure), one row per answer."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PipelineError(f"--labels {path} does not exist; pass a CSV with columns image_id,label")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"image_id", "label"} <= set(reader.fieldnames or []):
            raise PipelineError(f"{path} needs columns image_id,label (label: core, spurious or unsure)")
        annotations = []
        for line, row in enumerate(reader, start=2):
            label = (row["label"] or "").strip().lower()
            if label not in CHOICES:
                raise PipelineError(f"{path} line {line}: label must be core, spurious or unsure, got {row['label']!r}")
            try:
                image_id = int(row["image_id"])
            except ValueError:
                raise PipelineError(f"{path} line {line}: image_id must be an integer, got {row['image_id']!r}") from None
            annotations.append(Annotation(-line, -1, image_id, "csv", label))
    return annotations


def load_answers(run: Run, labels_csv: str | None) -> Answers:
    """The run's pulled annotations, or a CSV's answers when one is given."""
    if labels_csv:
        return consolidate(answers_from_csv(labels_csv))
    if not run.labels_path.exists():
        raise PipelineError(f"no answers in {run.root}: `python -m pipeline pull --run {run.root}` first, or pass "
                            "--labels CSV (image_id,label)")
    store = AnnotationStore(run.labels_path)
    try:
        return consolidate(store.annotations())
    finally:
        store.close()


def check_answers(arrays: AttentionArrays, answers: Answers) -> None:
    """Every verdict is about a training image of the run, and there is at least one."""
    unknown = [i for i in answers.labels if not arrays.has_image(i)]
    if unknown:
        raise PipelineError(f"{len(unknown)} answered image id(s) are not training images of this run "
                            f"(e.g. {unknown[0]}); check --labels or the run")
    if not answers.labels:
        raise PipelineError("no usable answer yet (all unsure, tied or skipped); annotate some tasks first")


def save_propagation(run: Run, arrays: AttentionArrays, answers: Answers) -> Propagation:
    """Propagate ``answers`` and write ``propagation.npz``, marking the stage done for exactly these verdicts.

    The one writer of the file: the ``propagate`` stage and the ML backend's live learning both come here.
    """
    propagation = Propagation.of(arrays, answers)
    propagation.save(run.propagation_path)
    run.mark_done("propagate", propagation_stamp(run, answers))
    return propagation


def propagation_stamp(run: Run, answers: Answers) -> str:
    """What the scores depend on: the attention stage's output and the verdicts."""
    return fingerprint("propagate", run.stage_fingerprint("embed"), sorted(answers.labels.items()))


def propagate_run(run: Run, config: RunConfig, force: bool = False) -> tuple[Propagation, Answers]:
    """The ``propagate`` stage: spread the run's answers, or reuse ``propagation.npz`` for the same verdicts."""
    arrays = AttentionArrays.load(run.require(run.attention_path, "embed --run RUN"))
    answers = load_answers(run, config.curate.labels)
    check_answers(arrays, answers)
    run.save_config(config)
    if not force and run.is_done("propagate", propagation_stamp(run, answers), [run.propagation_path]):
        log.info("reusing %s (same attention and verdicts; --force recomputes)", run.propagation_path)
        return Propagation.load(run.propagation_path), answers
    propagation = save_propagation(run, arrays, answers)
    log.info("%d verdicts (%d core, %d spurious) spread to %d images", len(answers.labels),
             answers.counts["core"], answers.counts["spurious"], len(arrays))
    return propagation, answers
