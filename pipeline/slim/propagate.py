"""SLIM step 6: spread the annotators' answers to every training image of the same class.

Per class, label spreading (scikit-learn's ``LabelSpreading`` algorithm, RBF kernel) over the attention
representation gives each image an attention-correctness score ``P(core)`` in [0, 1] and a certainty in
[0, 1]. ``unsure`` answers are not evidence. Several answers on one image become one verdict and a confidence
by the run's consensus method (:mod:`pipeline.slim.consensus`); a verdict counts in spreading as much as its
confidence says (a contested one pulls its neighbours less). Nothing is dropped silently: :class:`Answers`
counts what each rule did.

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
from scipy.sparse.csgraph import laplacian
from sklearn.decomposition import PCA
from sklearn.metrics.pairwise import euclidean_distances, rbf_kernel
from sklearn.neighbors import NearestNeighbors

from pipeline.core.attention_arrays import AttentionArrays, RepresentationRows
from pipeline.core.config import RunConfig, fingerprint
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write
from pipeline.core.run import Run, reading
from pipeline.core.store import Annotation, AnnotationStore
from pipeline.core.verdicts import CHOICES, CORE, SPURIOUS, UNDECIDED
from pipeline.slim.clustering import PROJECTED_DIMS, principal_axes
from pipeline.slim.consensus import DEFAULT_CONSENSUS, Consensus, aggregate, agreement_report, votes_of

log = logging.getLogger(__name__)
MAX_DIMS = PROJECTED_DIMS  # the kernel sees a PCA projection (32-D): RBF distances in 256-D are all alike
KERNEL_SAMPLE = 1000  # images whose pairwise distances set the RBF width: a median needs no more
SPREAD_ALPHA = 0.2  # LabelSpreading's clamping: an answered image keeps 80 % of its own verdict
SPREAD_ITERATIONS = 100  # LabelSpreading converges in far fewer steps on a few thousand images
SPREAD_TOLERANCE = 1e-3  # scikit-learn's LabelSpreading default: summed change of the distributions to stop at
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
# Above this many coordinates in a class (images x representation width) the kernel's axes are fitted on a sample of
# rows and the class is projected chunk by chunk (:func:`~pipeline.slim.clustering.principal_axes`): the exact PCA
# centres a full copy of the class, 2.3 GB for CelebA's 140,000 x 4,096 and the largest copy left at that scale.
# Every benchmark's class is far below it (at most 5,026 x 128 = 0.64 M); the ML backend places images the same way.
EXACT_PCA_LIMIT = 50_000_000


@dataclass
class Answers:
    """One verdict per image (1 core, 0 spurious), how sure the annotators' consensus is of it, and an account of
    how it was reached (:mod:`pipeline.slim.consensus`)."""

    labels: dict[int, int]
    counts: Counter = field(default_factory=Counter)
    consensus: Consensus | None = None  # how the verdicts were reached from several answers; None: given as is

    def strength(self, image_id: int) -> float:
        """How much the verdict counts in spreading: 1 for a certain one, 0 for a coin flip (posterior 1/2)."""
        return 2.0 * (self.consensus.confidence.get(image_id, 1.0) if self.consensus else 1.0) - 1.0


def consolidate(annotations: Iterable[Annotation], method: str = DEFAULT_CONSENSUS, seed: int = 0) -> Answers:
    """One verdict per image by ``method`` (:data:`~pipeline.slim.consensus.CONSENSUS_METHODS`); unsure, skipped
    and contested (tied) images carry no verdict, and every rule is counted."""
    annotations = list(annotations)
    answers_per_image = Counter(a.image_id for a in annotations if not a.skipped and a.choice is not None)
    consensus = aggregate(votes_of(annotations), method, seed)
    counts: Counter = Counter({
        "skipped": sum(a.skipped or a.choice is None for a in annotations),
        "multi_annotated": sum(n > 1 for n in answers_per_image.values()),
        "unsure_or_tied": sum(i not in consensus.verdict for i in answers_per_image),
        "core": sum(v == CORE for v in consensus.verdict.values()),
        "spurious": sum(v == SPURIOUS for v in consensus.verdict.values()),
    })
    return Answers(consensus.verdict, +counts, consensus)


def kernel_gamma(points: np.ndarray, width: float = SPREAD_WIDTH) -> float:
    """RBF gamma for a width of ``width`` x the median pairwise distance (a scale-free default)."""
    sample = points[: min(len(points), KERNEL_SAMPLE)]
    distances = euclidean_distances(sample, sample)
    median = float(np.median(distances[np.triu_indices(len(sample), k=1)])) if len(sample) > 1 else 1.0
    return 1.0 / max((width * median) ** 2, 1e-12)


def sparse_rbf_affinity(points: np.ndarray, gamma: float) -> sparse.csr_matrix:
    """The RBF affinity restricted to each image's ``SPREAD_NEIGHBOURS`` nearest neighbours (symmetrised, so an
    edge counts from both ends): memory and time grow ~linearly with the class."""
    graph = neighbour_graph(points, min(SPREAD_NEIGHBOURS, len(points) - 1))
    graph.data = np.exp(-gamma * graph.data**2)
    return graph.maximum(graph.T).tocsr()


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


def spread_class(points: np.ndarray, labelled: dict[int, int], width: float = SPREAD_WIDTH,
                 strength: dict[int, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(P(core), certainty) for every row of ``points``; ``labelled`` maps row -> 1/0, ``strength`` row -> how
    much that verdict counts (:meth:`Answers.strength`; 1 where absent)."""
    if not labelled:
        return np.full(len(points), UNDECIDED), np.zeros(len(points))
    strength = strength or {}
    gamma = kernel_gamma(points, width)
    rows = np.fromiter(labelled, dtype=int)
    values = np.array([labelled[r] for r in rows])
    weights = np.array([strength.get(r, 1.0) for r in rows])
    if len(set(values)) == 1:
        similarity = (rbf_kernel(points, points[rows], gamma=gamma) * weights).max(axis=1)
        direction = 1.0 if values[0] == CORE else -1.0
        return UNDECIDED * (1.0 + direction * similarity), similarity
    targets = np.zeros((len(points), 2))  # columns: spurious, core
    targets[rows, values] = UNDECIDED * (1.0 + weights)
    targets[rows, 1 - values] = UNDECIDED * (1.0 - weights)
    affinity = rbf_kernel(points, gamma=gamma) if len(points) <= DENSE_SPREAD_LIMIT \
        else sparse_rbf_affinity(points, gamma)
    p_core = spread_labels(affinity, targets)[:, CORE]
    return p_core, np.abs(2 * p_core - 1)


def spread_labels(affinity: np.ndarray | sparse.spmatrix, targets: np.ndarray, alpha: float = SPREAD_ALPHA,
                  iterations: int = SPREAD_ITERATIONS, tolerance: float = SPREAD_TOLERANCE) -> np.ndarray:
    """Label spreading (Zhou et al. 2004) exactly as scikit-learn's ``LabelSpreading`` runs it, but from soft
    ``targets`` (a row of class weights per answered image, zeros elsewhere): scikit-learn clamps every answer to
    a one-hot row, so a contested verdict would pull its neighbours as hard as a unanimous one.

    The graph is the symmetrically normalised ``affinity`` with a zero diagonal; each step spreads the current
    distributions one edge further and pulls answered images back by ``1 - alpha`` to their targets. Returns
    row-normalised class distributions. With one-hot targets it equals ``LabelSpreading`` (tested).
    """
    graph = -laplacian(affinity, normed=True)
    if sparse.issparse(graph):
        graph = sparse.csr_matrix(graph)
        graph.setdiag(0.0)
        graph.eliminate_zeros()
    else:
        np.fill_diagonal(graph, 0.0)
    anchored = (1.0 - alpha) * targets
    distributions, previous = targets.copy(), np.zeros_like(targets)
    for _ in range(iterations):
        if np.abs(distributions - previous).sum() < tolerance:
            break
        previous = distributions
        distributions = alpha * (graph @ distributions) + anchored
    totals = distributions.sum(axis=1, keepdims=True)
    return distributions / np.where(totals == 0, 1.0, totals)


def kernel_space(representation: np.ndarray | RepresentationRows) -> np.ndarray:
    """A class's images on its first :data:`MAX_DIMS` principal axes, where the RBF kernel compares them: exact up
    to :data:`EXACT_PCA_LIMIT` coordinates, above it fitted on a sample and projected in chunks (no second copy)."""
    if representation.size > EXACT_PCA_LIMIT:
        return principal_axes(representation, seed=0)
    dims = min(MAX_DIMS, *representation.shape)
    return PCA(n_components=dims, random_state=0).fit_transform(np.asarray(representation))


def propagate(arrays: AttentionArrays, answers: Answers,
              width: float = SPREAD_WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """Scores and certainties for every training image (rows of ``arrays``); ``width`` as in :func:`kernel_gamma`.
    Each verdict counts by its consensus strength."""
    scores = np.full(len(arrays), UNDECIDED)
    certainty = np.zeros(len(arrays))
    for y in arrays.classes:
        members = arrays.for_class(y)
        points = kernel_space(arrays.representation_rows("vectors", members))  # one class at a time, built as read
        position = {row: k for k, row in enumerate(members)}
        answered = {position[arrays.row_of(i)]: i for i in answers.labels
                    if arrays.has_image(i) and arrays.row_of(i) in position}
        scores[members], certainty[members] = spread_class(
            points, {k: answers.labels[i] for k, i in answered.items()}, width,
            {k: answers.strength(i) for k, i in answered.items()})
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
    """Answers from a CSV of ``image_id,label`` (label core / spurious / unsure), one row per answer; an optional
    ``annotator`` column says who gave each (several answers per image are then aggregated as the pulled ones)."""
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
            annotations.append(Annotation(-line, -1, image_id, (row.get("annotator") or "").strip() or "csv", label))
    return annotations


def run_annotations(run: Run, labels_csv: str | None) -> list[Annotation]:
    """The run's pulled annotations, or a CSV's answers when one is given."""
    if labels_csv:
        return answers_from_csv(labels_csv)
    if not run.labels_path.exists():
        raise PipelineError(f"no answers in {run.root}: `python -m pipeline pull --run {run.root}` first, or pass "
                            "--labels CSV (image_id,label)")
    store = AnnotationStore(run.labels_path)
    try:
        return store.annotations()
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
    """What the scores depend on: the attention stage's output, the verdicts and how strongly each counts."""
    return fingerprint("propagate", run.stage_fingerprint("embed"), sorted(answers.labels.items()),
                       [round(answers.strength(i), 6) for i in sorted(answers.labels)])


def record_agreement(run: Run, arrays: AttentionArrays, annotations: list[Annotation], answers: Answers,
                     method: str) -> None:
    """``metrics.json["annotation"]``: the annotators' agreement, where images were answered more than once
    (cleared again when no image is)."""
    if not answers.counts["multi_annotated"]:
        if run.load_metrics().get("annotation"):
            run.update_metrics(annotation=None)
        return
    class_of = {int(i): arrays.class_names[int(y)] for i, y in zip(arrays.index, arrays.y, strict=True)}
    report = agreement_report(annotations, answers.consensus, class_of)
    run.update_metrics(annotation={"consensus": method, **report})
    log.info("%d images answered more than once; Krippendorff's alpha %s", report["images_answered_more_than_once"],
             "n/a" if report["alpha"] is None else f"{report['alpha']:.2f}")


def propagate_run(run: Run, config: RunConfig, force: bool = False) -> tuple[Propagation, Answers]:
    """The ``propagate`` stage: spread the run's answers, or reuse ``propagation.npz`` for the same verdicts."""
    arrays = AttentionArrays.load(run.require(run.attention_path, "embed --run RUN"))
    annotations = run_annotations(run, config.curate.labels)
    answers = consolidate(annotations, config.curate.consensus, config.curate.seed)
    check_answers(arrays, answers)
    run.save_config(config)
    record_agreement(run, arrays, annotations, answers, config.curate.consensus)
    if not force and run.is_done("propagate", propagation_stamp(run, answers), [run.propagation_path]):
        log.info("reusing %s (same attention and verdicts; --force recomputes)", run.propagation_path)
        return Propagation.load(run.propagation_path), answers
    propagation = save_propagation(run, arrays, answers)
    log.info("%d verdicts (%d core, %d spurious) spread to %d images", len(answers.labels),
             answers.counts["core"], answers.counts["spurious"], len(arrays))
    return propagation, answers
