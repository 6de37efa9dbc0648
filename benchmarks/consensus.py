"""A simulated annotation team against the synthetic family: does the consensus recover the true verdicts better
than a majority vote, and does that reach the retrained model?

Per set and seed (the runs ``benchmarks/wga.py`` builds), SLIM's sample (2 % per class) is answered by a team of
simulated annotators with their own error rates (``--noise``, default 0.05 / 0.1 / 0.3), each image by
``--per-image`` of them chosen at random (2: Label Studio's overlap of two, the cheapest that can disagree). The
true verdict is the mask rule (AIoU >= 0.5; evaluation only). Every ``--methods`` aggregator of
:mod:`pipeline.slim.consensus` then gives the verdicts, which are spread (each weighted by its confidence) and
turned into the fresh retraining's cells. Measured per method:

* ``verdicts_right``: the share of the answered images whose consensus verdict is the true one (an image left
  without a verdict, a tied majority, counts as not recovered), and ``decided``: the share with a verdict;
* ``propagation_accuracy`` against the true verdicts of every training image, and the minority's isolation;
* ``same_cells_as_truth``: whether the retraining's cells equal those of the true verdicts (the noise-free
  annotator). Where they do, the retrained model is that one's bit for bit (same weights, same seed: see
  ``benchmarks/sweep.py``), so its worst-group accuracy is known without training; ``--train`` trains the fresh
  model for every method whose cells differ, and the truth's once.

    python benchmarks/consensus.py --synth default mixed glyphs minority --seeds 0 1 2 --out bench-out/consensus.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from wga import (
    build,
    core_accuracy_on_test,
    evaluate_on_test,
    minority_isolation,
    simulated_answers,
    stage_accuracy,
)

from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.config import CONSENSUS_METHODS, RunConfig
from pipeline.core.data import load_dataset
from pipeline.core.io import atomic_write_json
from pipeline.core.synth import VARIANTS
from pipeline.model.loaders import seed_everything
from pipeline.model.networks import load_checkpoint
from pipeline.slim.consensus import Vote, aggregate
from pipeline.slim.propagate import Answers, propagate
from pipeline.slim.retrain import fresh_model
from pipeline.slim.weights import cell_balanced_weights, spurious_space_cells

TEAM_NOISE = (0.05, 0.1, 0.3)  # a careful, a steady and a hasty annotator


def team_votes(truth: dict[int, int], noise: list[float], per_image: int, seed: int) -> list[Vote]:
    """Each image of ``truth`` answered by ``per_image`` distinct annotators, each wrong at their own rate."""
    votes = []
    for image_id, verdict in sorted(truth.items()):
        rng = np.random.default_rng([seed, image_id, 2])
        for annotator in rng.choice(len(noise), per_image, replace=False):
            wrong = rng.random() < noise[annotator]
            votes.append(Vote(image_id, f"annotator-{annotator}", 1 - verdict if wrong else verdict))
    return votes


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two cell labelings group the images alike (cell numbers may differ)."""
    return bool(np.array_equal(np.unique(a, return_inverse=True)[1], np.unique(b, return_inverse=True)[1]))


def trained(run, arrays: AttentionArrays, cells: np.ndarray, seed: int) -> dict:
    """The fresh retraining under ``cells``: test worst-group, mean and core accuracy."""
    config: RunConfig = run.load_config()
    image_set = load_dataset(config.data.root)
    seed_everything(seed)
    model, _ = fresh_model(config, image_set, len(arrays.class_names), [int(i) for i in arrays.index],
                           cell_balanced_weights(arrays.y, cells), torch.device("cpu"),
                           load_checkpoint(run.checkpoint_path)[1]["image_size"], False)
    measured = evaluate_on_test(model, run, None, "fresh")
    return {"worst_group_acc": measured["worst_group_acc"], "mean_acc": measured["mean_acc"],
            "core_acc": core_accuracy_on_test(model, run)}


def one_seed(args: argparse.Namespace, variant: str, seed: int) -> dict:
    run = build(args.work, seed, variant)
    arrays = AttentionArrays.load(run.attention_path)
    image_set = load_dataset(run.load_config().data.root)
    groups = np.array([image_set.group_of(image_set.samples[int(i)]) for i in arrays.index])
    truth = simulated_answers(run, arrays, 0.0, seed).answers
    truth_scores, _ = propagate(arrays, truth)
    truth_cells = spurious_space_cells(arrays, truth_scores, seed).cells
    votes = team_votes(truth.labels, args.noise, args.per_image, seed)
    result: dict = {"answered": len(truth.labels), "answers": len(votes), "methods": {}}
    truth_model = trained(run, arrays, truth_cells, seed) if args.train else None
    if truth_model:
        result["truth"] = truth_model
    for method in args.methods:
        consensus = aggregate(votes, method, seed)
        answers = Answers(consensus.verdict, consensus=consensus)
        scores, _ = propagate(arrays, answers)
        cells = spurious_space_cells(arrays, scores, seed).cells
        same = same_partition(cells, truth_cells)
        row = {"verdicts_right": sum(consensus.verdict.get(i) == v for i, v in truth.labels.items())
               / len(truth.labels),
               "decided": len(consensus.verdict) / len(truth.labels),
               "propagation_accuracy": stage_accuracy(arrays, answers, scores)["propagation_accuracy"],
               "minority_isolated": minority_isolation(arrays, cells, groups), "same_cells_as_truth": same,
               "annotator_accuracy": consensus.annotator_accuracy}
        if args.train:
            row.update(truth_model if same else trained(run, arrays, cells, seed))
        result["methods"][method] = row
    return result


def table(result: dict, methods: list[str]) -> str:
    """Per method, family means over sets and seeds."""
    rows = [seed for per_variant in result.values() for seed in per_variant.values()]
    lines = ["| consensus | verdicts right | decided | propagation accuracy | cells as the true verdicts' | WGA |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for method in methods:
        picked = [r["methods"][method] for r in rows]
        wga = [p["worst_group_acc"] for p in picked if "worst_group_acc" in p]
        lines.append(f"| {method} | {100 * statistics.mean(p['verdicts_right'] for p in picked):.1f} % | "
                     f"{100 * statistics.mean(p['decided'] for p in picked):.1f} % | "
                     f"{100 * statistics.mean(p['propagation_accuracy'] for p in picked):.1f} % | "
                     f"{sum(p['same_cells_as_truth'] for p in picked)}/{len(picked)} | "
                     + (f"{100 * statistics.mean(wga):.1f} %" if len(wga) == len(picked) else "") + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synth", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--noise", nargs="+", type=float, default=list(TEAM_NOISE),
                        help="one error rate per simulated annotator")
    parser.add_argument("--per-image", type=int, default=2, help="annotators answering each image")
    parser.add_argument("--methods", nargs="+", default=list(CONSENSUS_METHODS), choices=CONSENSUS_METHODS)
    parser.add_argument("--train", action="store_true", help="train the fresh model where the cells differ")
    parser.add_argument("--work", type=Path, default=Path("bench-out/wga"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/consensus.json"))
    args = parser.parse_args()
    if not 1 <= args.per_image <= len(args.noise):
        parser.error(f"--per-image must be between 1 and the {len(args.noise)} annotators")
    result: dict = {}
    for variant in args.synth:
        result[variant] = {}
        for seed in args.seeds:
            result[variant][str(seed)] = one_seed(args, variant, seed)
            atomic_write_json(args.out, {"noise": args.noise, "per_image": args.per_image, "train": args.train,
                                         "by_variant": result})
    print(json.dumps({"out": str(args.out)}))
    print(table(result, args.methods))


if __name__ == "__main__":
    main()
