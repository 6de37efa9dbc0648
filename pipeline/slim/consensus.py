"""Several annotators' answers on one image become one verdict, how sure it is, and how good each annotator is.

Real teams disagree, tire and differ in skill; a plain majority treats a careless annotator's vote like an
expert's, and calls a 1-1 split unsure. The aggregators of crowd-kit, a maintained crowdsourcing library,
estimate each annotator's reliability from the overlap between them and weigh the votes by it:

* ``dawid-skene`` (the default): each annotator's confusion matrix, by expectation-maximisation (Dawid & Skene
  1979); the classic, and the best of the three in ``benchmarks/consensus.py`` (BENCHMARKS.md);
* ``mace``: each annotator is either right or guessing (Hovy et al. 2013);
* ``glad``: annotator expertise and image difficulty (Whitehill et al. 2009);
* ``majority``: one vote each, a tie is unsure (what the loop did before).

``unsure`` answers and skipped tasks are not evidence about the verdict and are left out of every method. An
image answered once keeps that answer with full confidence whatever the method (there is nothing to weigh),
so runs without overlap are unchanged and do not load the library. The result is :class:`Consensus`: a
verdict and a confidence (the posterior probability of the verdict) per image, and an estimated accuracy per
annotator (the posterior probability that their answers were right).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.core.config import CONSENSUS_METHODS, CurateConfig
from pipeline.core.errors import PipelineError
from pipeline.core.store import Annotation
from pipeline.core.verdicts import CORE, SPURIOUS

log = logging.getLogger(__name__)
DEFAULT_CONSENSUS = CurateConfig().consensus
EM_ITERATIONS = 100  # Dawid-Skene's EM on a few thousand answers converges in tens of steps
TIE = 0.5  # a posterior of exactly one half decides nothing: the image gets no verdict, as a tied majority
VERDICTS = {"core": CORE, "spurious": SPURIOUS}
MOST_CONTESTED = 12  # images the report shows as thumbnails: a screenful to look at, not a list to work through


@dataclass(frozen=True)
class Vote:
    """One usable answer: who said what about which image (``unsure`` and skips are never votes)."""

    image_id: int
    annotator: str
    verdict: int  # CORE or SPURIOUS


@dataclass(frozen=True)
class Consensus:
    """The aggregated answers: per image a verdict and its confidence, per annotator an estimated accuracy."""

    verdict: dict[int, int]
    confidence: dict[int, float]  # posterior probability of the verdict, in (0.5, 1]
    annotator_accuracy: dict[str, float]  # on the images answered more than once
    posterior_core: dict[int, float]  # P(core) of every image with a vote (a tie, 1/2, gives no verdict)


def votes_of(annotations: Iterable[Annotation]) -> list[Vote]:
    """The core/spurious answers among ``annotations`` (an unnamed annotator counts as one person)."""
    return [Vote(a.image_id, a.annotator or "unknown", VERDICTS[a.choice]) for a in annotations
            if not a.skipped and a.choice in VERDICTS]


def aggregate(votes: Sequence[Vote], method: str = DEFAULT_CONSENSUS, seed: int = 0) -> Consensus:
    """One verdict per image from ``votes`` by ``method`` (one of :data:`CONSENSUS_METHODS`)."""
    if method not in CONSENSUS_METHODS:
        raise PipelineError(f"unknown --consensus {method!r}; choose {', '.join(CONSENSUS_METHODS)}")
    per_image: dict[int, list[Vote]] = {}
    for vote in votes:
        per_image.setdefault(vote.image_id, []).append(vote)
    overlapping = [v for image_votes in per_image.values() if len(image_votes) > 1 for v in image_votes]
    posterior = {image_id: float(image_votes[0].verdict == CORE)
                 for image_id, image_votes in per_image.items() if len(image_votes) == 1}
    if overlapping:
        posterior.update(_posterior_core(overlapping, method, seed))
    decided = {i: p for i, p in posterior.items() if p != TIE}
    return Consensus({i: CORE if p > TIE else SPURIOUS for i, p in decided.items()},
                     {i: max(p, 1.0 - p) for i, p in decided.items()}, annotator_accuracy(votes, posterior),
                     posterior)


def _posterior_core(votes: Sequence[Vote], method: str, seed: int) -> dict[int, float]:
    """P(core) of every image in ``votes`` (all answered more than once) by the crowd-kit aggregator."""
    import pandas as pd
    from crowdkit.aggregation import GLAD, MACE, DawidSkene, MajorityVote

    aggregators = {"dawid-skene": lambda: DawidSkene(n_iter=EM_ITERATIONS),
                   "mace": lambda: MACE(random_state=seed), "glad": GLAD, "majority": MajorityVote}
    data = pd.DataFrame({"task": [v.image_id for v in votes], "worker": [v.annotator for v in votes],
                         "label": [v.verdict for v in votes]})
    with warnings.catch_warnings():  # the library's pandas calls raise deprecation notices nobody here can act on
        warnings.filterwarnings("ignore", module="crowdkit")
        probabilities = aggregators[method]().fit_predict_proba(data)
    core = probabilities[CORE] if CORE in probabilities.columns else 1.0 - probabilities[SPURIOUS]
    return {int(i): float(np.clip(p, 0.0, 1.0)) for i, p in core.items()}


def annotator_accuracy(votes: Sequence[Vote], posterior: dict[int, float]) -> dict[str, float]:
    """Each annotator's expected share of right answers under the consensus posterior (any method alike), on
    the images someone else answered too: an answer nobody else gave cannot be checked."""
    answered = Counter(vote.image_id for vote in votes)
    right: dict[str, list[float]] = {}
    for vote in votes:
        if answered[vote.image_id] < 2:
            continue
        p_core = posterior[vote.image_id]
        right.setdefault(vote.annotator, []).append(p_core if vote.verdict == CORE else 1.0 - p_core)
    return {annotator: float(np.mean(shares)) for annotator, shares in sorted(right.items())}


@dataclass(frozen=True)
class AnnotatorQuality:
    """One annotator's share of the work and how it agrees with the team's consensus."""

    answers: int  # core / spurious / unsure answers given (skips excluded)
    agreement: float | None  # share of their core/spurious answers equal to the consensus verdict
    estimated_accuracy: float | None  # the consensus model's estimate, where their answers overlap others'
    median_lead_time: float | None  # seconds, where Label Studio recorded it


def krippendorff_alpha(votes: Sequence[Vote]) -> float | None:
    """Krippendorff's alpha (nominal) of the core/spurious answers: 1 perfect agreement, 0 chance, below 0
    systematic disagreement; ``None`` while it is undefined: no image with answers from two people yet, or only
    one verdict ever given (nothing to tell agreement from chance)."""
    import krippendorff

    images = sorted({v.image_id for v in votes})
    annotators = sorted({v.annotator for v in votes})
    matrix = np.full((len(annotators), len(images)), np.nan)  # one value per person and image: their last
    column = {image_id: k for k, image_id in enumerate(images)}
    row = {annotator: k for k, annotator in enumerate(annotators)}
    for vote in votes:
        matrix[row[vote.annotator], column[vote.image_id]] = vote.verdict
    pairable = (~np.isnan(matrix)).sum(axis=0) >= 2
    if not pairable.any() or len(np.unique(matrix[:, pairable][~np.isnan(matrix[:, pairable])])) < 2:
        return None
    return float(krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal"))


def agreement_report(annotations: Sequence[Annotation], consensus: Consensus,
                     class_of: dict[int, str]) -> dict:
    """What ``metrics.json["annotation"]`` and the report show: alpha overall and per class, each annotator's
    quality, and the most contested images (posterior nearest a tie) among those answered more than once."""
    votes = votes_of(annotations)
    per_class = {name: krippendorff_alpha([v for v in votes if class_of.get(v.image_id) == name])
                 for name in sorted(set(class_of.values()))}
    answered = Counter(v.image_id for v in votes)
    contested = sorted((i for i in consensus.posterior_core if answered[i] > 1),
                       key=lambda i: (abs(consensus.posterior_core[i] - TIE), i))
    return {"alpha": krippendorff_alpha(votes), "alpha_per_class": per_class,
            "images_answered_more_than_once": sum(n > 1 for n in answered.values()),
            "annotators": {name: dataclasses.asdict(quality)
                           for name, quality in annotator_quality(annotations, consensus).items()},
            "most_contested": [{"image_id": i, "p_core": consensus.posterior_core[i], "answers": answered[i]}
                               for i in contested[:MOST_CONTESTED]]}


def annotator_quality(annotations: Sequence[Annotation], consensus: Consensus) -> dict[str, AnnotatorQuality]:
    """:class:`AnnotatorQuality` of everyone who answered."""
    given: dict[str, list[Annotation]] = {}
    for annotation in annotations:
        if not annotation.skipped and annotation.choice is not None:
            given.setdefault(annotation.annotator or "unknown", []).append(annotation)
    quality = {}
    for name, answers in sorted(given.items()):
        judged = [VERDICTS[a.choice] == consensus.verdict[a.image_id] for a in answers
                  if a.choice in VERDICTS and a.image_id in consensus.verdict]
        lead_times = [a.lead_time for a in answers if a.lead_time is not None]
        quality[name] = AnnotatorQuality(len(answers), float(np.mean(judged)) if judged else None,
                                         consensus.annotator_accuracy.get(name),
                                         float(np.median(lead_times)) if lead_times else None)
    return quality
