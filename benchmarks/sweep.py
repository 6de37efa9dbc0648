"""The defaults SLIM's fresh retraining depends on, swept over the synthetic family: budget, spreading width, k.

``retrain --mode fresh`` reads the answers through one decision per class (the space its shortcut lives in,
:func:`pipeline.slim.weights.spurious_space_cells`) and the clusters of that space; the curated subset (variant,
size) is not used. So a setting can only change the retrained model if it changes a class's cells, and where it
does not, the model is the default's, bit for bit (same weights, same seed). This benchmark measures, for every
set of the family and seed, each setting's stage figures (answer count, propagation accuracy against the true
verdicts, each class's chosen space, the minority group's isolation) and whether the cells differ from the
default's; ``--train`` trains the fresh model (reference recipe) for every setting whose cells differ, and the
default once, so every setting gets a worst-group accuracy.

Settings, each varied alone from the default (2 % per class, width 1 x the median distance, k by the elbow):

* ``budget``: 1 %, 3 % of each class annotated;
* ``width``: 0.5 x, 2 x the median pairwise distance as the RBF width of the spreading;
* ``k``: 2, 3, 4, 5 clusters per class instead of the elbow's choice;
* ``noise 10%``: a tenth of the answers flipped, as ``wga.py --noise 0.1``.

    python benchmarks/sweep.py --synth default mixed glyphs minority --seeds 0 1 2 --out bench-out/sweep.json
    python benchmarks/sweep.py --train --settings k=4 k=5 --out bench-out/sweep-k45.json   # WGA of a fixed k
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.preprocessing import StandardScaler
from wga import (
    build,
    core_accuracy_on_test,
    evaluate_on_test,
    minority_isolation,
    simulated_answers,
    stage_accuracy,
)

from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.config import RunConfig
from pipeline.core.data import load_dataset
from pipeline.core.io import atomic_write_json
from pipeline.core.synth import VARIANTS
from pipeline.model.loaders import seed_everything
from pipeline.model.networks import load_checkpoint
from pipeline.slim.clustering import PICK_INITS
from pipeline.slim.propagate import SPREAD_WIDTH, propagate
from pipeline.slim.retrain import fresh_model
from pipeline.slim.weights import ATTENDED, cell_balanced_weights, spurious_space_cells

BUDGETS = (0.01, 0.03)  # around the default 2 %: the paper's range of "a few percent"
WIDTHS = (0.5, 2.0)  # half and twice the median distance: a local and a smooth spreading
FIXED_K = (2, 3, 4, 5)  # the elbow's range, each forced
NOISE = 0.1  # wga.py's answer noise: where the cells stay the default's, so does the model, with no training


@dataclass(frozen=True)
class Setting:
    name: str
    fraction: float = 0.02
    width: float = SPREAD_WIDTH
    k: int | None = None  # None: the elbow's choice
    noise: float = 0.0  # share of the simulated answers flipped


DEFAULT = "default"
SETTINGS = (Setting(DEFAULT), *(Setting(f"budget {b:.0%}", fraction=b) for b in BUDGETS),
            *(Setting(f"width {w:g}x", width=w) for w in WIDTHS), *(Setting(f"k={k}", k=k) for k in FIXED_K),
            Setting(f"noise {NOISE:.0%}", noise=NOISE))


def cells_with_fixed_k(arrays: AttentionArrays, spaces: dict, k: int, seed: int) -> np.ndarray:
    """The default's chosen space per class, clustered into exactly ``k`` clusters (standardised as the elbow's)."""
    cells = np.zeros(len(arrays), dtype=int)
    for y in arrays.classes:
        members = arrays.for_class(y)
        space = arrays.f_att if spaces[arrays.class_names[y]].chosen == ATTENDED else arrays.f_rev
        points = StandardScaler().fit_transform(space[members])
        cells[members] = k * y + KMeans(n_clusters=k, n_init=PICK_INITS, random_state=seed).fit_predict(points)
    return cells


def one_seed(work: Path, variant: str, seed: int, train: bool, wanted: set[str]) -> dict:
    """The ``wanted`` settings' rows for one set and seed. The default's answers and cells are always worked out
    (a fixed k clusters the default's chosen spaces, and every row says whether its cells are the default's), but
    trained only where a wanted row needs them."""
    run = build(work, seed, variant)
    config: RunConfig = run.load_config()
    arrays = AttentionArrays.load(run.attention_path)
    image_set = load_dataset(config.data.root)
    groups = np.array([image_set.group_of(image_set.samples[int(i)]) for i in arrays.index])
    model_meta = load_checkpoint(run.checkpoint_path)[1]
    results, default_cells, default_spaces, trained_default = {}, None, None, None
    for setting in SETTINGS:
        if setting.name != DEFAULT and setting.name not in wanted:
            continue
        answers = simulated_answers(run, arrays, setting.noise, seed, sample=replace(config.sample, fraction=setting.fraction,
                                                                           per_class=None)).answers
        scores, _ = propagate(arrays, answers, width=setting.width)
        shortcut = spurious_space_cells(arrays, scores, seed)
        cells = shortcut.cells
        if setting.k is not None:
            cells = cells_with_fixed_k(arrays, default_spaces, setting.k, seed)
        if default_cells is None:
            default_cells, default_spaces = cells, shortcut.spaces
        same = bool(np.array_equal(np.unique(cells, return_inverse=True)[1],
                                   np.unique(default_cells, return_inverse=True)[1]))
        stages = stage_accuracy(arrays, answers, scores)
        row = {"annotated": len(answers.labels), "propagation_accuracy": stages["propagation_accuracy"],
               "spaces": {name: space.as_dict() for name, space in shortcut.spaces.items()},
               "minority_isolated": minority_isolation(arrays, cells, groups), "same_cells_as_default": same}
        if setting.name not in wanted:
            continue
        if train and same and trained_default is not None:  # the same cells and seed: the default's model
            row.update({key: trained_default[key] for key in ("worst_group_acc", "mean_acc", "core_acc")})
        elif train:
            seed_everything(seed)
            fresh, _ = fresh_model(config, image_set, len(arrays.class_names), [int(i) for i in arrays.index],
                                   cell_balanced_weights(arrays.y, cells), torch.device("cpu"),
                                   model_meta["image_size"], False)
            measured = evaluate_on_test(fresh, run, None, "fresh")
            row.update(worst_group_acc=measured["worst_group_acc"], mean_acc=measured["mean_acc"],
                       core_acc=core_accuracy_on_test(fresh, run))
            trained_default = row if same else trained_default
        results[setting.name] = row
    return results


def table(result: dict) -> str:
    """Per setting, the family mean over seeds: propagation accuracy, minority isolation, WGA where trained."""
    lines = ["| setting | " + " | ".join(result) + " | family mean |", "| --- |" + " ---: |" * (len(result) + 1)]
    measured = [setting for setting in SETTINGS
                if all(setting.name in rows for per_seed in result.values() for rows in per_seed.values())]
    for setting in measured:
        cells = []
        for per_seed in result.values():
            rows = [seed[setting.name] for seed in per_seed.values()]
            wga = [r["worst_group_acc"] for r in rows if "worst_group_acc" in r]
            isolated = statistics.mean(statistics.mean(r["minority_isolated"].values()) for r in rows)
            changed = sum(not r["same_cells_as_default"] for r in rows)
            cells.append((statistics.mean(wga) if len(wga) == len(rows) else None, isolated, changed, len(rows)))
        wga_means = [c[0] for c in cells if c[0] is not None]
        text = [f"{100 * c[0]:.1f} % (iso {c[1]:.2f}, {c[2]}/{c[3]} changed)" if c[0] is not None
                else f"iso {c[1]:.2f}, {c[2]}/{c[3]} changed" for c in cells]
        mean = f"{100 * statistics.mean(wga_means):.1f} %" if len(wga_means) == len(cells) else ""
        lines.append(f"| {setting.name} | " + " | ".join(text) + f" | {mean} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synth", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train", action="store_true", help="train every setting whose cells differ")
    parser.add_argument("--settings", nargs="+", default=[s.name for s in SETTINGS],
                        choices=[s.name for s in SETTINGS], metavar="SETTING",
                        help="only these settings (default: all), e.g. 'k=4' 'k=5' to train just those")
    parser.add_argument("--work", type=Path, default=Path("bench-out/wga"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/sweep.json"))
    args = parser.parse_args()
    result: dict = {}
    for variant in args.synth:
        result[variant] = {}
        for seed in args.seeds:
            result[variant][str(seed)] = one_seed(args.work, variant, seed, args.train, set(args.settings))
            atomic_write_json(args.out, {"train": args.train, "settings": args.settings, "by_variant": result})
    print(json.dumps({"out": str(args.out)}))
    print(table(result))


if __name__ == "__main__":
    main()
