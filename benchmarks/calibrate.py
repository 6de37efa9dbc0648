"""Calibration of the synthetic family: is the shortcut there, and is the core feature learnable?

For each variant (``synth --variant``) and seed, trains the default model with ``train``'s defaults on the
variant (its own correlation: 0.95, or 0.97 for ``minority``) and on the same generator with the correlation
removed (``--corr 0.5``), and checks the two promises every variant makes: ERM's test worst-group accuracy is
at least 25 points below its mean accuracy with the correlation, and reaches at least 90 % without it.

It also records what the loop will meet on the correlated set: the smallest group's share of training, and
how the reference model attends, per class, as the simulated annotator judges it (share of training images
with AIoU >= 0.5, i.e. answered "core"); with ``--faint`` or ``--bold`` separately for each style of object
(faint, bold, clear): ``mixed`` promises both kinds of attention inside every class. Writes JSON (``--out``)
and prints it.

    python benchmarks/calibrate.py --out bench-out/calibrate.json                     # the whole family
    python benchmarks/calibrate.py --variants glyphs --seeds 0 1 --out bench-out/calibrate-glyphs.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.config import RunConfig, resolve_path
from pipeline.core.data import TRAIN, load_dataset
from pipeline.core.io import atomic_write_json
from pipeline.core.run import Run
from pipeline.core.synth import VARIANTS, SynthSpec, generate, object_style
from pipeline.core.verdicts import AIOU_CORE
from pipeline.model.embed import embed_run
from pipeline.model.train import train_reference

INDEPENDENT = 0.5  # the two-class family's "no correlation": the place says nothing about the class
SHORTCUT_GAP = 0.25  # mean minus worst-group accuracy ERM must lose to the correlation
LEARNABLE_WGA = 0.90  # worst-group accuracy ERM must reach without it


def train_on(spec: SynthSpec, work: Path, attention: bool) -> dict:
    """ERM on ``spec``'s dataset: its test metrics and (``attention``) where it looks on training images."""
    spec = spec.resolved()
    name = f"{spec.core}-faint{spec.faint}-bold{spec.bold}-corr{spec.corr}-seed{spec.seed}"  # equal: shared
    data = generate(work / f"synth-{name}", spec, progress=False)
    config = RunConfig()
    config.data.root = resolve_path(data)
    config.train.seed = spec.seed
    run = Run(work / f"run-{name}")
    started = time.perf_counter()
    metrics = train_reference(run, config, progress=False)["erm"]
    result = {
        "variant": spec.variant, "core": spec.core, "faint": spec.faint, "bold": spec.bold, "corr": spec.corr,
        "seed": spec.seed,
        "worst_group_acc": metrics["worst_group_acc"], "mean_acc": metrics["mean_acc"],
        "avg_acc": metrics["avg_acc"], "per_group": {k: v["acc"] for k, v in metrics["per_group"].items()},
        "train_and_eval_s": round(time.perf_counter() - started, 1),
        "smallest_group_train_share": smallest_group_share(data),
    }
    if attention:
        config = run.load_config()
        config.embed.embedding = "pca"  # only the attention maps are read; PCA is the cheap embedding
        embed_run(run, config, progress=False)
        result["core_share"] = core_shares(run, spec)
    return result


def smallest_group_share(data: Path) -> float:
    """The rarest (class, place) group's share of the training split: what the minority variant promises."""
    train = load_dataset(data).split(TRAIN)
    return min(Counter((s.y, s.place) for s in train).values()) / len(train)


def core_shares(run: Run, spec: SynthSpec) -> dict[str, float]:
    """Per class (and, with faint or bold objects, per class and style): the share of training images the
    simulated annotator would answer "core" (AIoU >= 0.5). A uniform class sits near 0 or 1; a mixed one in
    between. Each style's share of the class's training images is recorded beside it (``·share``)."""
    arrays = AttentionArrays.load(run.attention_path)
    core = arrays.aiou >= AIOU_CORE
    names = spec.class_names
    kinds = {names[y]: arrays.y == y for y in range(spec.classes)}
    shares = {}
    styles = np.array([object_style(spec, int(i), int(y)) for i, y in zip(arrays.index, arrays.y)])
    if len(set(styles)) > 1:
        for y in range(spec.classes):
            in_class = arrays.y == y
            for style in sorted(set(styles[in_class])):  # bold objects are in every other class only
                rows = in_class & (styles == style)
                kinds[f"{names[y]}·{style}"] = rows
                shares[f"{names[y]}·{style}·share"] = round(float(rows.sum() / in_class.sum()), 3)
    return {kind: round(float(core[rows].mean()), 3) for kind, rows in kinds.items()} | shares


def calibrate(variant: str, seeds: list[int], work: Path) -> dict:
    """Both trainings per seed for one variant, and whether its two promises hold on every seed."""
    runs = []
    for seed in seeds:
        spec = SynthSpec(variant=variant, seed=seed).resolved()
        runs.append(train_on(spec, work, attention=True))
        # the same generator without the correlation, recorded as plain options: variants that differ only in
        # their correlation (default, minority) share this dataset and its model
        runs.append(train_on(SynthSpec(seed=seed, corr=INDEPENDENT, core=spec.core, faint=spec.faint,
                                       bold=spec.bold), work, attention=False))
    shortcut = [r for r in runs if r["corr"] != INDEPENDENT]
    balanced = [r for r in runs if r["corr"] == INDEPENDENT]
    summary = {
        "runs": runs,
        "gap_mean_minus_wga": min(r["mean_acc"] - r["worst_group_acc"] for r in shortcut),
        "gap_avg_minus_wga": min(r["avg_acc"] - r["worst_group_acc"] for r in shortcut),
        "wga_independent": min(r["worst_group_acc"] for r in balanced),
    }
    summary["shortcut_ok"] = bool(summary["gap_mean_minus_wga"] >= SHORTCUT_GAP)
    summary["learnable_ok"] = bool(summary["wga_independent"] >= LEARNABLE_WGA)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out/calibrate.json", help="JSON result file")
    parser.add_argument("--work", default="bench-out/calibrate", help="datasets and runs go here")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="variants to calibrate (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="dataset and training seeds")
    args = parser.parse_args()
    summary = {
        "variants": {variant: calibrate(variant, args.seeds, Path(args.work)) for variant in args.variants},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    atomic_write_json(Path(args.out), summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
