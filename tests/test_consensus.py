"""Consensus over several annotators (crowd-kit) and spreading that weighs each verdict by its confidence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.semi_supervised import LabelSpreading

from pipeline.cli import main
from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.data import load_dataset
from pipeline.core.errors import PipelineError
from pipeline.core.verdicts import CORE, SPURIOUS
from pipeline.slim.consensus import MOST_CONTESTED, Vote, aggregate
from pipeline.slim.propagate import (
    SPREAD_ALPHA,
    SPREAD_ITERATIONS,
    sparse_rbf_affinity,
    spread_class,
    spread_labels,
)
from pipeline.slim.report import _agreement_panel

NOISE = {"careful": 0.05, "steady": 0.1, "hasty": 0.3}


def team_votes(truth: np.ndarray, per_image: int, seed: int = 0) -> list[Vote]:
    """Each image answered by ``per_image`` distinct annotators of :data:`NOISE`, each wrong at their own rate."""
    rng = np.random.default_rng(seed)
    votes = []
    for image, verdict in enumerate(truth):
        for annotator in rng.choice(list(NOISE), per_image, replace=False):
            wrong = rng.random() < NOISE[annotator]
            votes.append(Vote(image, str(annotator), int(1 - verdict if wrong else verdict)))
    return votes


def right(consensus, truth: np.ndarray) -> int:
    return sum(consensus.verdict.get(i) == v for i, v in enumerate(truth))


def test_dawid_skene_trusts_the_careful_annotator_where_majority_is_tied() -> None:
    truth = np.random.default_rng(1).integers(0, 2, 400)
    votes = team_votes(truth, per_image=2)
    majority, skene = aggregate(votes, "majority"), aggregate(votes, "dawid-skene")
    tied = len(truth) - len(majority.verdict)
    assert tied > 30  # two annotators disagree on about a fifth of the images: majority decides none of them
    assert right(skene, truth) > right(majority, truth) + 0.6 * tied  # Dawid-Skene decides most of them right
    accuracy = skene.annotator_accuracy
    assert accuracy["careful"] > accuracy["steady"] > accuracy["hasty"]
    for annotator, noise in NOISE.items():
        assert abs(accuracy[annotator] - (1 - noise)) < 0.08
    contested = [i for i, p in skene.posterior_core.items() if 0.2 < p < 0.8]
    assert all(skene.confidence.get(i, 0.5) < 0.8 for i in contested)


@pytest.mark.parametrize("method", ["dawid-skene", "mace", "glad", "majority"])
def test_every_method_keeps_single_answers_and_unanimous_ones(method: str) -> None:
    votes = [Vote(1, "a", CORE), Vote(2, "b", SPURIOUS), Vote(3, "a", CORE), Vote(3, "b", CORE),
             Vote(4, "a", SPURIOUS), Vote(4, "b", SPURIOUS), Vote(4, "c", SPURIOUS)]
    consensus = aggregate(votes, method)
    assert consensus.verdict == {1: CORE, 2: SPURIOUS, 3: CORE, 4: SPURIOUS}
    assert consensus.confidence[1] == consensus.confidence[2] == 1.0  # nothing to weigh
    assert min(consensus.confidence.values()) > 0.5


def test_unknown_method_is_a_one_line_error() -> None:
    with pytest.raises(PipelineError, match="unknown --consensus 'vote'; choose dawid-skene, mace, glad, majority"):
        aggregate([Vote(1, "a", CORE)], "vote")


@pytest.mark.parametrize("sparse_graph", [False, True])
def test_spreading_certain_answers_equals_scikit_learn(sparse_graph: bool) -> None:
    rng = np.random.default_rng(4)
    points = np.vstack([rng.normal(c, 1.0, (80, 5)) for c in (0.0, 3.0)])
    labels = np.full(len(points), -1)
    labels[[0, 1, 80, 81, 82]] = [CORE, CORE, SPURIOUS, SPURIOUS, CORE]
    gamma = 0.2

    def kernel(a: np.ndarray, _: np.ndarray):
        return sparse_rbf_affinity(a, gamma) if sparse_graph else rbf_kernel(a, gamma=gamma)

    reference = LabelSpreading(kernel=kernel, alpha=SPREAD_ALPHA, max_iter=SPREAD_ITERATIONS).fit(points, labels)
    targets = np.zeros((len(points), 2))
    targets[labels >= 0, labels[labels >= 0]] = 1.0
    ours = spread_labels(kernel(points, points), targets)
    np.testing.assert_allclose(ours, reference.label_distributions_, atol=1e-10)


def test_a_contested_verdict_pulls_its_neighbours_less() -> None:
    rng = np.random.default_rng(0)
    points = np.vstack([rng.normal(0, 0.2, (30, 4)), rng.normal(3, 0.2, (30, 4))])
    certain, _ = spread_class(points, {0: CORE, 30: SPURIOUS})
    contested, certainty = spread_class(points, {0: CORE, 30: SPURIOUS}, strength={0: 0.2})
    # a 60/40 verdict (strength 0.2) leaves its cluster near undecided, where a certain one made it core
    assert certain[:30].mean() > 0.7 and 0.35 < contested[:30].mean() < certain[:30].mean() - 0.2
    assert (contested[30:] < 0.5).all() and (certain[30:] < 0.5).all()
    assert ((0 <= certainty) & (certainty <= 1)).all()


def test_propagate_records_the_teams_agreement(answered_run: Path) -> None:
    """Three annotators in the answers CSV: the verdicts come from their consensus, and metrics.json gets alpha,
    each annotator's quality and the most contested images; the report panel shows them."""
    with np.load(answered_run / "attention.npz") as arrays:
        images = arrays["index"][::4]
    rng = np.random.default_rng(0)
    rows = ["image_id,label,annotator"]
    for k, image in enumerate(images):
        truth = "spurious" if k % 3 == 0 else "core"
        for annotator, noise in NOISE.items():
            flipped = {"core": "spurious", "spurious": "core"}[truth]
            rows.append(f"{image},{flipped if rng.random() < noise else truth},{annotator}")
    (answered_run / "team.csv").write_text("\n".join(rows) + "\n")
    assert main(["propagate", "--run", str(answered_run), "--labels", str(answered_run / "team.csv"),
                 "--quiet"]) == 0
    agreement = json.loads((answered_run / "metrics.json").read_text())["annotation"]
    assert agreement["consensus"] == "dawid-skene"
    assert agreement["images_answered_more_than_once"] == len(images)
    assert 0.3 < agreement["alpha"] < 0.95 and set(agreement["alpha_per_class"]) == {"disc", "triangle"}
    people = agreement["annotators"]
    assert set(people) == set(NOISE) and all(p["answers"] == len(images) for p in people.values())
    assert people["careful"]["agreement"] > people["hasty"]["agreement"]
    assert len(agreement["most_contested"]) == MOST_CONTESTED
    train = AttentionArrays.load(answered_run / "attention.npz")
    image_set = load_dataset(json.loads((answered_run / "config.json").read_text())["data"]["root"])
    panel = _agreement_panel(image_set, train, {"annotation": agreement}, 0.8)
    assert "Krippendorff's alpha" in panel and "hasty" in panel and "data:image/png;base64," in panel
