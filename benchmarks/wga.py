"""The product's reason to exist: worst-group accuracy recovered with very few labels.

On the synthetic default, for each seed (its own dataset and ERM model), the same retraining (``--mode``)
on subsets chosen five ways:

* ``erm``: the reference model as trained;
* ``slim``: this product — sample (2 % per class), a simulated annotator answers from the masks exactly as
  ``simulate-annotator`` does (AIoU >= 0.5 -> core, else spurious; ``--noise`` flips a fraction; here applied
  directly instead of through Label Studio, which the labelstudio benchmark measures), propagate, curate
  (default variant; ``slim-published`` is SLIM step 7 as written);
* ``random``: a uniformly random subset of the same size;
* ``jtt``: Just Train Twice without annotations — all training images, ERM's training errors upweighted
  (``--jtt-upweight``), class-balanced; with ``last-layer`` this is JTT's second stage on frozen features,
  with ``full`` a fine-tune of the ERM model on the reweighted images;
* ``oracle``: a group-balanced subset of the same size chosen with the true ``place`` labels;
* ``oracle-all``: every training image, weighted so each true group counts the same, retrained exactly as
  ``jtt`` is: only the weights differ, so it shows what group balancing itself can reach against error
  upweighting.

Two more rows are the other works' remedies, fed by the same simulated answers:

* ``corm`` (``--mode fresh`` only): Core Risk Minimization, the reference recipe with each training image's
  likely-spurious region (outside the simulated annotator's box where it drew one, else from the attention map
  and propagated verdict) corrupted by ``--corruption`` in ``--corrupt-probability`` of the draws; its row also carries core
  accuracy (test, background replaced by noise), as does ERM's;
* ``low-spuriosity`` (every mode: it only refits the head on frozen ERM features): the least spurious share of
  each class, the share chosen on validation worst-class accuracy.

and, with ``--augment counterfactual``'s images (composite editor, from the same answers and boxes; none
rejected, as no one checks them here):

* ``slim+counterfactual``: in ``fresh`` mode SLIM's cell weights with the counterfactuals as one more cell of
  their class; in ``last-layer`` / ``full`` SLIM's curated subset with the counterfactuals, class-balanced, as
  ``retrain --augment counterfactual`` trains them there. ``fresh`` and ``full`` corrupt the dataset's draws as
  corm does where ``--corrupt`` says (``auto``, the default: as ``retrain`` does, whenever counterfactuals are
  added; ``no`` gives the row as measured before ``--corrupt`` existed);
* ``corm+counterfactual`` (``fresh`` only): corm with the counterfactuals drawn uncorrupted beside the training
  images;
* ``low-spuriosity+counterfactual``: low-spuriosity with the counterfactuals' frozen features beside every
  share's images, as ``retrain --mode low-spuriosity`` fits them (``--augment auto`` adds them there and in
  ``fresh`` and ``corm``, none in ``last-layer`` and ``full``: this row and those modes' ``slim+counterfactual``
  are why).

The simulated annotator also draws the mask's bounding box on ``--box-share`` of the images it answers (default
all: the label config's optional box), each side off by ``--box-jitter`` of the box's size (default 0: exact);
only corm and the counterfactual rows use boxes. ``--synth`` runs the
datasets of the harder family (``synth --variant``), each with every seed; the JSON is rewritten after every
seed, seeds outermost, so an interrupted run keeps whole seeds of every variant.

``--only corm low-spuriosity`` trains just the named rows (and ERM), to add them to a table measured before; a
row the mode does not have is refused.

It also records how pure SLIM's curated cells are with respect to the true groups (evaluation only): the
share of curated images that belong to their cell's most common group.

Writes JSON (``--out``) with mean ± std of test worst-group and mean accuracy per method, the annotated
fraction and the gap closed ``(slim - erm) / (oracle - erm)``, and prints a markdown table.

    python benchmarks/wga.py --seeds 0 1 2 --out bench-out/wga.json
    python benchmarks/wga.py --seeds 0 1 2 --mode fresh --noise 0 --only corm low-spuriosity --out bench-out/wga-corm.json
    python benchmarks/wga.py --mode fresh --noise 0 --synth default glyphs minority --only slim slim+counterfactual \
        corm corm+counterfactual low-spuriosity jtt oracle --out bench-out/family.json
    python benchmarks/wga.py --mode last-layer --noise 0 --synth default mixed --only slim slim+counterfactual \
        low-spuriosity low-spuriosity+counterfactual --out bench-out/counterfactuals-last-layer.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from runs import attention_run
from sklearn.metrics.cluster import contingency_matrix

from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.config import CORRUPT_CHOICES, CORRUPTIONS, RetrainConfig, RunConfig, SampleConfig
from pipeline.core.data import TEST, load_dataset, load_mask
from pipeline.core.io import atomic_write_json
from pipeline.core.run import Run
from pipeline.core.synth import VARIANTS, SynthSpec
from pipeline.core.verdicts import AIOU_CORE, CORE, CORE_CUT, SPURIOUS
from pipeline.labelstudio.annotator import decide, mask_box
from pipeline.model.attention import compute_attention
from pipeline.model.cam import make_extractor
from pipeline.model.evaluate import evaluate_splits, group_metrics
from pipeline.model.loaders import Corruption, make_loader, seed_everything
from pipeline.model.networks import load_checkpoint
from pipeline.slim.clustering import elbow_clusters
from pipeline.slim.counterfactual import (
    DONORS,
    FILL,
    OBJECT_CUT,
    CompositeEditor,
    Counterfactuals,
    class_sources,
    plan,
    read_counterfactuals,
    write_counterfactuals,
)
from pipeline.slim.curate import curate, default_subset_size
from pipeline.slim.propagate import Answers, propagate
from pipeline.slim.regions import SpuriousRegions
from pipeline.slim.report import core_accuracy
from pipeline.slim.retrain import (
    FrozenImages,
    corrupts,
    fresh_model,
    frozen_attention,
    last_layer_head,
    retrain_corm,
    retrain_full,
    retrain_last_layer,
    retrain_low_spuriosity,
    validation_attention,
)
from pipeline.slim.sample import select
from pipeline.slim.spuriosity import spuriosity
from pipeline.slim.weights import cell_balanced_weights, class_normalised, spurious_space_cells

ALL_IMAGES_EPOCHS = 5  # full mode over all 2,400 images: ~2.5x the gradient steps of 20 passes over 240

METHODS = ("erm", "slim", "slim-published", "slim-no-answers", "random", "jtt", "oracle", "oracle-all", "corm",
           "low-spuriosity", "slim+counterfactual", "corm+counterfactual", "low-spuriosity+counterfactual")
ANSWER_ROWS = ("slim", "corm", "low-spuriosity", "slim+counterfactual", "corm+counterfactual",
               "low-spuriosity+counterfactual")  # the fresh-mode rows that use the answers
COUNTERFACTUAL_ROWS = ("slim+counterfactual", "corm+counterfactual", "low-spuriosity+counterfactual")
NO_ANSWER_ROWS = ("slim-no-answers", "random", "jtt", "oracle")  # fresh mode: trained once per seed, all noises
# what last-layer and full retrain (corm and the label-free cells are fresh mode's only)
SUBSET_MODE_ROWS = ("slim", "slim-published", "random", "jtt", "oracle", "oracle-all", "low-spuriosity",
                    "slim+counterfactual", "low-spuriosity+counterfactual")
FRESH_ROWS = (*ANSWER_ROWS, *NO_ANSWER_ROWS)
WGA_MODES = ("last-layer", "full", "fresh")  # the retrainings every method of a table shares
SUMMARY_KEYS = ("worst_group_acc", "mean_acc", "avg_acc")


def build(work: Path, seed: int, variant: str = "default") -> Run:
    """Dataset (``synth --variant``), ERM model and attention stage for one seed, reused when already there.

    The default variant keeps ``work``'s top level (tables measured before the family stay reproducible); the
    others get a folder each.
    """
    folder = work if variant == "default" else work / variant
    return attention_run(folder / f"run-seed{seed}", folder / f"data-seed{seed}",
                         SynthSpec(seed=seed, variant=variant), train_seed=seed)


@dataclass(frozen=True)
class BoxDrawing:
    """How the simulated annotator draws the optional box: on ``share`` of its answers, each side off the mask's
    edge by a normal draw of ``jitter`` times the box's size (``mask_box``, as ``simulate-annotator --box-jitter``
    draws it), so the remedies that use boxes are measured with a hand's imprecision as well as with exact ones."""

    share: float = 0.0
    jitter: float = 0.0


@dataclass(frozen=True)
class SimulatedAnswers:
    """The simulated annotator's verdicts and, on a share of the answered images, a box around the object."""

    answers: Answers
    boxes: dict[int, list[dict]]
    box_iou: float | None  # drawn boxes against the masks' exact boxes, mean (None: no box drawn)


def simulated_answers(run: Run, arrays: AttentionArrays, noise: float, seed: int,
                      drawing: BoxDrawing = BoxDrawing(), sample: SampleConfig | None = None) -> SimulatedAnswers:
    """SLIM's sample (the run's, 2 % per class, or ``sample``) answered by the mask rule, ``noise`` of the answers
    flipped; ``drawing.share`` of the answered images also get a box around the object, as an annotator drawing
    the optional box would."""
    config = run.load_config()
    image_set = load_dataset(config.data.root)
    size = config.data.image_size or image_set.native_size
    labels, boxes, ious = {}, {}, []
    for row, _, _ in select(arrays, sample or config.sample, exclude=set()):
        image_id = int(arrays.index[row])
        mask = load_mask(image_set.root / image_set.samples[image_id].mask_filename, size)
        choice, _ = decide(arrays.cam[row], mask, config.embed.threshold)
        if np.random.default_rng([seed, image_id]).random() < noise:
            choice = "spurious" if choice == "core" else "core"
        labels[image_id] = CORE if choice == "core" else SPURIOUS
        box_rng = np.random.default_rng([seed, image_id, 1])  # its own stream: boxes never change the answers
        if mask.any() and box_rng.random() < drawing.share:
            boxes[image_id] = [mask_box(mask, drawing.jitter, box_rng)]
            ious.append(box_iou(boxes[image_id][0], mask_box(mask)))
    return SimulatedAnswers(Answers(labels), boxes, float(np.mean(ious)) if ious else None)


def box_iou(a: dict, b: dict) -> float:
    """Intersection over union of two Label Studio rectangles (percent units): how far a drawn box strays."""
    width = min(a["x"] + a["width"], b["x"] + b["width"]) - max(a["x"], b["x"])
    height = min(a["y"] + a["height"], b["y"] + b["height"]) - max(a["y"], b["y"])
    inter = max(width, 0.0) * max(height, 0.0)
    return inter / (a["width"] * a["height"] + b["width"] * b["height"] - inter)


def reweighted_model(model, arrays: AttentionArrays, weights: np.ndarray, mode: str, config: RunConfig,
                     meta: dict):
    """Retrain on every training image under ``weights``, each class's total weight set to one.

    JTT's second stage and the all-images oracle share this, so they differ only in their weights.
    ``last-layer``: one weighted logistic fit on frozen features (fixed C, as JTT's recipe has no held-out
    set); ``full``: fine-tuning that draws images by the weights for ``ALL_IMAGES_EPOCHS`` passes.
    """
    labels = arrays.y
    weights = class_normalised(weights, labels)
    if mode == "full":
        full_config = copy.deepcopy(config)
        full_config.retrain.epochs = ALL_IMAGES_EPOCHS
        ids = [int(i) for i in arrays.index]
        return retrain_full(model, full_config, load_dataset(config.data.root), ids, torch.device("cpu"),
                            meta["image_size"], False, sample_weight=weights)[0]
    retrained = copy.deepcopy(model)
    retrained.head = last_layer_head(arrays.features, labels, model.head.out_features, 1.0,
                                     sample_weight=weights)
    return retrained


def cell_purity(cells: list, groups: np.ndarray) -> float:
    """Share of images that belong to their cell's most common true group (evaluation only).

    ``cells`` holds one cell per image: an int or a tuple of ints (e.g. ``(class, *pick.cell)``).
    """
    if len(cells) == 0:
        return 0.0
    cell_ids = np.unique(np.asarray(cells).reshape(len(cells), -1), axis=0, return_inverse=True)[1].ravel()
    return float(contingency_matrix(cell_ids, groups).max(axis=1).sum() / len(cells))


def evaluate_on_test(model, run: Run, test_features: np.ndarray | None, mode: str) -> dict:
    config = run.load_config()
    image_set = load_dataset(config.data.root)
    samples = image_set.split(TEST)
    if mode == "last-layer":  # same backbone: the head on stored test features is the whole model
        with torch.no_grad():
            predictions = model.head(torch.from_numpy(test_features)).argmax(1).numpy()
        return group_metrics(image_set, samples, predictions)
    size = load_checkpoint(run.checkpoint_path)[1]["image_size"]
    return evaluate_splits(model, image_set, size, config, torch.device("cpu"), progress=False)["test"]


def low_spuriosity_rows(model, run: Run, arrays: AttentionArrays, scores: np.ndarray, test_features: np.ndarray,
                        seed: int, wanted: set[str], extra: FrozenImages | None) -> dict:
    """The ``low-spuriosity`` rows in ``wanted``: the head refit on each class's least spurious share (chosen on
    val worst class), and with the counterfactuals' frozen features (``extra``) beside every share's images."""
    config = run.load_config()
    image_set = load_dataset(config.data.root)
    size = load_checkpoint(run.checkpoint_path)[1]["image_size"]
    val = validation_attention(model, image_set, size, config, torch.device("cpu"))
    spurious = spuriosity(arrays, scores, seed=seed)
    rows = {}
    for name, added in (("low-spuriosity", None), ("low-spuriosity+counterfactual", extra)):
        if name in wanted:
            seed_everything(seed)
            retrained, details = retrain_low_spuriosity(model, arrays, spurious, val.features, val.y, seed, added)
            rows[name] = {**evaluate_on_test(retrained, run, test_features, "last-layer"), "share": details["share"]}
    return rows


def frozen_images(model, run: Run, counterfactuals: Counterfactuals | None) -> FrozenImages | None:
    """The counterfactuals as the ERM model's frozen features, as the head-refit modes of ``retrain`` see them."""
    if not counterfactuals:
        return None
    size = load_checkpoint(run.checkpoint_path)[1]["image_size"]
    frozen = frozen_attention(model, counterfactuals.image_set, counterfactuals.samples, size, run.load_config(),
                              torch.device("cpu"))
    return FrozenImages(frozen.features, frozen.y)


def corm_row(run: Run, arrays: AttentionArrays, scores: np.ndarray, boxes: dict[int, list[dict]], seed: int,
             retrain: RetrainConfig, counterfactuals: Counterfactuals | None = None) -> dict:
    """``corm``: the reference recipe, each draw's likely-spurious region corrupted as ``retrain`` says."""
    config = copy.deepcopy(run.load_config())
    config.retrain.corruption, config.retrain.corrupt_probability = retrain.corruption, retrain.corrupt_probability
    size = load_checkpoint(run.checkpoint_path)[1]["image_size"]
    seed_everything(seed)
    model, details = retrain_corm(arrays, SpuriousRegions(arrays.index, arrays.cam, scores, boxes), config,
                                  load_dataset(config.data.root), torch.device("cpu"), size, False,
                                  counterfactuals=counterfactuals)
    return {**evaluate_on_test(model, run, None, "fresh"), "core_acc": core_accuracy_on_test(model, run),
            "regions": details["regions"]}


def simulated_counterfactuals(run: Run, arrays: AttentionArrays, scores: np.ndarray, boxes: dict[int, list[dict]],
                              noise: float, seed: int, share: float,
                              object_cut: bool = True, box_jitter: float = 0.0) -> Counterfactuals | None:
    """``retrain --augment counterfactual``'s images (composite editor) from the simulated answers' regions,
    kept beside the run per noise level, share, boxes and cut; none rejected (no verification in the benchmark).
    ``object_cut=False`` keeps each donor's whole located region: the comparison the cut was measured by.
    ``None`` where no class can have any (nothing located): the +counterfactual rows then train without, as
    ``--augment auto`` would."""
    config = run.load_config()
    image_set = load_dataset(config.data.root)
    size = load_checkpoint(run.checkpoint_path)[1]["image_size"]
    cut = OBJECT_CUT if object_cut else "uncut"
    drawn = f"boxes{len(boxes)}" + (f"-jitter{box_jitter:g}" if box_jitter else "")  # exact boxes: older folders
    folder = run.root / f"counterfactuals-noise{noise:g}-share{share:g}-{drawn}-{cut}-{FILL}-{DONORS}"
    if not (folder / "metadata.csv").exists():
        regions = SpuriousRegions(arrays.index, arrays.cam, scores, boxes)
        plans = plan(arrays, regions, class_sources(arrays, regions, size), share, seed)
        if not plans:
            return None
        write_counterfactuals(folder, plans, image_set, regions, CompositeEditor(), size, object_cut)
    return read_counterfactuals(folder)


def core_accuracy_on_test(model, run: Run) -> float:
    """Core accuracy on test (background replaced by noise; masks used for evaluation only)."""
    config = run.load_config()
    image_set = load_dataset(config.data.root)
    size = load_checkpoint(run.checkpoint_path)[1]["image_size"]
    return core_accuracy(model, image_set, image_set.split(TEST), size, config, torch.device("cpu"))


def stage_accuracy(arrays: AttentionArrays, answers: Answers, scores: np.ndarray) -> dict:
    """Where a shortfall starts, stage by stage, against the true verdicts (AIoU >= 0.5 from the masks, evaluation
    only): how often the answers and the propagated scores agree with them, overall and per class, and each
    class's true share of core attention (a class split between core and spurious attention is the hard case)."""
    truth = arrays.aiou >= AIOU_CORE
    answered = arrays.rows_of(list(answers.labels))
    given = np.array([answers.labels[int(arrays.index[r])] == CORE for r in answered], dtype=bool)
    right = (scores >= CORE_CUT) == truth
    return {
        "answer_accuracy": float((given == truth[answered]).mean()) if len(answered) else None,
        "propagation_accuracy": float(right.mean()),
        "per_class": {arrays.class_names[y]: {"true_core_share": float(truth[arrays.for_class(y)].mean()),
                                              "propagation_accuracy": float(right[arrays.for_class(y)].mean())}
                      for y in arrays.classes},
    }


def minority_isolation(arrays: AttentionArrays, cells: np.ndarray, groups: np.ndarray) -> dict:
    """Per class, the share of its smallest true group that sits in cells where that group is the majority
    (evaluation only). Cell purity hides a minority spread thinly over majority cells (it barely moves the
    average); balancing cells lifts a minority only where it has cells of its own."""
    isolated = {}
    for y in arrays.classes:
        members = arrays.for_class(y)
        present, counts = np.unique(groups[members], return_counts=True)
        minority = present[np.argmin(counts)]
        own = [c for c in np.unique(cells[members])
               if np.bincount(groups[members][cells[members] == c]).argmax() == minority]
        isolated[arrays.class_names[y]] = float(np.isin(cells[members][groups[members] == minority], own).mean())
    return isolated


def summarise(results: dict) -> dict:
    """Per method the headline numbers, with core accuracy and the remedies' choices where measured."""
    extra = ("core_acc", "share", "regions")
    return {name: {key: r[key] for key in (*SUMMARY_KEYS, *extra) if key in r} for name, r in results.items()}


def fresh_seed(run: Run, seed: int, noise: float, upweight: float, no_answer_results: dict,
               only: set[str] | None = None, remedy: RetrainConfig | None = None,
               drawing: BoxDrawing = BoxDrawing(), object_cut: bool = True) -> dict:
    """``--mode fresh``: each method trains a new model with the reference recipe under its own weights.

    ``slim`` balances the cells of the space the answers point at; ``slim-no-answers`` the label-free cells
    (attended x ignored clusters, what curation crosses) — what the answers add; ``random`` SLIM's cell sizes
    with members drawn at random; ``jtt`` upweights ERM's errors; ``oracle`` balances the true groups. Methods that use no
    answers are trained once per seed and reused across noise levels (``no_answer_results``).
    """
    config: RunConfig = run.load_config()
    arrays = AttentionArrays.load(run.require(run.attention_path, "embed"))
    model, meta = load_checkpoint(run.checkpoint_path)
    image_set = load_dataset(config.data.root)
    groups = np.array([image_set.group_of(image_set.samples[int(i)]) for i in arrays.index])
    ids = [int(i) for i in arrays.index]
    labels = arrays.y

    def trained(weights: np.ndarray, counterfactuals: Counterfactuals | None = None) -> dict:
        """A fresh model under ``weights``, corrupted as ``retrain --corrupt`` would (SLIM's rows)."""
        corruption = added_corruption("fresh", remedy, arrays, scores, simulated.boxes, counterfactuals)
        seed_everything(seed)
        fresh, _ = fresh_model(config, image_set, len(arrays.class_names), ids, weights, torch.device("cpu"),
                               meta["image_size"], False, corruption=corruption, counterfactuals=counterfactuals)
        return {**evaluate_on_test(fresh, run, None, "fresh"), "core_acc": core_accuracy_on_test(fresh, run)}

    simulated = simulated_answers(run, arrays, noise, seed, drawing)
    answers = simulated.answers
    scores, _ = propagate(arrays, answers)
    shortcut = spurious_space_cells(arrays, scores, seed)
    cells = shortcut.cells
    remedy = remedy or RetrainConfig()
    wanted = set(ANSWER_ROWS) if only is None else only
    counterfactuals = (simulated_counterfactuals(run, arrays, scores, simulated.boxes, noise, seed,
                                                 remedy.counterfactual_share, object_cut, drawing.jitter)
                       if wanted & set(COUNTERFACTUAL_ROWS) else None)
    results = {}
    if "slim" in wanted:
        results["slim"] = trained(cell_balanced_weights(labels, cells))
    if "slim+counterfactual" in wanted and counterfactuals:  # one more cell per class, as retrain_fresh does
        cf_cells = np.concatenate([cells, cells.max() + 1 + counterfactuals.labels])
        results["slim+counterfactual"] = trained(
            cell_balanced_weights(np.concatenate([labels, counterfactuals.labels]), cf_cells), counterfactuals)
    elif "slim+counterfactual" in wanted:  # none could be made: SLIM's model, as --augment auto trains it
        results["slim+counterfactual"] = results.get("slim") or trained(cell_balanced_weights(labels, cells))
    if "corm" in wanted:
        results["corm"] = corm_row(run, arrays, scores, simulated.boxes, seed, remedy)
    if "corm+counterfactual" in wanted:
        results["corm+counterfactual"] = corm_row(run, arrays, scores, simulated.boxes, seed, remedy, counterfactuals)
    if wanted & {"low-spuriosity", "low-spuriosity+counterfactual"}:
        extra = frozen_images(model, run, counterfactuals) if "low-spuriosity+counterfactual" in wanted else None
        results.update(low_spuriosity_rows(model, run, arrays, scores, erm_test_features(run, model), seed, wanted,
                                           extra))
    if "erm" not in no_answer_results:
        no_answer_results["erm"] = {**evaluate_on_test(model, run, None, "fresh"),
                                    "core_acc": core_accuracy_on_test(model, run)}
    for name in (set(NO_ANSWER_ROWS) if only is None else only & set(NO_ANSWER_ROWS)) - set(no_answer_results):
        no_answer_results[name] = trained(no_answer_weights(name, arrays, cells, groups, seed, upweight))
    results.update(no_answer_results)
    summary = summarise(results)
    summary["cell_purity"] = {"slim": cell_purity(cells, groups)}
    summary["stages"] = {**stage_accuracy(arrays, answers, scores),
                         "minority_isolated": minority_isolation(arrays, cells, groups)}
    summary["box_iou"] = simulated.box_iou
    summary["counterfactuals"] = len(counterfactuals) if counterfactuals else 0
    summary["annotated"] = len(answers.labels)
    summary["annotated_fraction"] = len(answers.labels) / len(labels)
    summary["subset_size"] = len(labels)
    return summary


def added_corruption(mode: str, remedy: RetrainConfig, arrays: AttentionArrays, scores: np.ndarray,
                     boxes: dict[int, list[dict]], counterfactuals: Counterfactuals | None) -> Corruption | None:
    """The corruption ``retrain --mode MODE --corrupt`` adds to SLIM's draws (``None`` where it adds none)."""
    if not corrupts(mode, remedy.corrupt, "counterfactual" if counterfactuals else "none"):
        return None
    return Corruption(SpuriousRegions(arrays.index, arrays.cam, scores, boxes), remedy.corruption,
                      remedy.corrupt_share(mode))


def no_answer_weights(name: str, arrays: AttentionArrays, cells: np.ndarray, groups: np.ndarray, seed: int,
                      upweight: float) -> np.ndarray:
    """Sampling weights of the fresh-mode rows that use no answers (``NO_ANSWER_ROWS``)."""
    labels = arrays.y
    if name == "slim-no-answers":  # label-free attention cells: attended x ignored clusters, per class
        crossed = np.zeros_like(cells)
        for y in np.unique(labels):
            members = np.flatnonzero(labels == y)
            attended = elbow_clusters(arrays.f_att[members], seed)[1]
            ignored = elbow_clusters(arrays.f_rev[members], seed)[1]
            crossed[members] = 100 * y + 10 * attended + ignored  # k <= 5: distinct per (class, pair)
        return cell_balanced_weights(labels, np.unique(crossed, return_inverse=True)[1])
    if name == "random":  # SLIM's cell sizes, members at random
        shuffled = cells.copy()
        for y in np.unique(labels):
            members = np.flatnonzero(labels == y)
            shuffled[members] = np.random.default_rng(seed).permutation(cells[members])
        return cell_balanced_weights(labels, shuffled)
    if name == "jtt":
        return class_normalised(np.where(arrays.pred != labels, upweight, 1.0), labels)
    return cell_balanced_weights(labels, groups)  # oracle: the true groups balanced


def erm_test_features(run: Run, model) -> np.ndarray:
    """The ERM model's pooled features of the test split, in the split's order (what group_metrics expects)."""
    config = run.load_config()
    image_set = load_dataset(config.data.root)
    size = load_checkpoint(run.checkpoint_path)[1]["image_size"]
    loader = make_loader(image_set, image_set.split(TEST), size, 256, 0)
    return compute_attention(make_extractor(model, "gradcam"), loader, torch.device("cpu"), 0.8, size,
                             progress=False).features


def one_seed(run: Run, seed: int, mode: str, noise: float, upweight: float, subset_size: int | None,
             variants: list[str], only: set[str] | None = None, remedy: RetrainConfig | None = None,
             drawing: BoxDrawing = BoxDrawing(), object_cut: bool = True) -> dict:
    """``--mode last-layer`` / ``full``: each row retrains the ERM model (its head on frozen features, or all of
    it) on its own subset of ``subset_size`` images, or all images reweighted (``jtt``, ``oracle-all``).

    ``slim+counterfactual`` adds the counterfactuals to SLIM's subset as ``retrain --augment counterfactual``
    does in these modes (class-balanced draws over both; ``full`` also corrupts the subset's draws where
    ``--corrupt`` says). ``only``: just these rows (and ERM).
    """
    remedy = remedy or RetrainConfig()
    wanted = set(SUBSET_MODE_ROWS) if only is None else only
    config: RunConfig = run.load_config()
    arrays = AttentionArrays.load(run.require(run.attention_path, "embed"))
    model, meta = load_checkpoint(run.checkpoint_path)
    image_set = load_dataset(config.data.root)
    test_features = erm_test_features(run, model)
    size = subset_size or default_subset_size(len(arrays), len(arrays.class_names))
    rng = np.random.default_rng(seed)
    groups = np.array([image_set.group_of(image_set.samples[int(i)]) for i in arrays.index])
    simulated = simulated_answers(run, arrays, noise, seed, drawing)
    answers = simulated.answers
    scores, _ = propagate(arrays, answers)

    def retrain(rows: np.ndarray, counterfactuals: Counterfactuals | None = None,
                extra: FrozenImages | None = None):
        """``rows`` retrained by ``mode``: the head on their frozen features and ``extra``'s (the counterfactuals'),
        or the whole model on their images and ``counterfactuals``."""
        if mode == "last-layer":
            features, labels = FrozenImages(arrays.features[rows], arrays.y[rows]).joined(extra)
            return retrain_last_layer(model, features, labels, seed)[0]
        ids = [int(arrays.index[r]) for r in rows]
        corruption = added_corruption(mode, remedy, arrays, scores, simulated.boxes, counterfactuals)
        return retrain_full(model, config, image_set, ids, torch.device("cpu"), meta["image_size"], False,
                            counterfactuals=counterfactuals, corruption=corruption)[0]

    curated = {("slim" if v == variants[0] else f"slim-{v}"): curate(arrays, scores, size, seed, v) for v in variants}
    subsets = {
        **{name: np.array([p.row for p in picks]) for name, picks in curated.items()},
        "random": rng.choice(len(arrays), size, replace=False),
        "oracle": np.concatenate([rng.choice(np.flatnonzero(groups == g), min(size // len(np.unique(groups)),
                                  int((groups == g).sum())), replace=False) for g in np.unique(groups)]),
    }
    results = {"erm": evaluate_on_test(model, run, test_features, "last-layer")}
    for name, rows in subsets.items():
        if name in wanted:
            results[name] = evaluate_on_test(retrain(rows), run, test_features, mode)
    counterfactuals = (simulated_counterfactuals(run, arrays, scores, simulated.boxes, noise, seed,
                                                 remedy.counterfactual_share, object_cut, drawing.jitter)
                       if wanted & set(COUNTERFACTUAL_ROWS) else None)
    head_refits = "low-spuriosity+counterfactual" in wanted or (mode == "last-layer" and "slim+counterfactual" in wanted)
    extra = frozen_images(model, run, counterfactuals) if head_refits else None  # one pass, whichever rows use it
    if "slim+counterfactual" in wanted:
        results["slim+counterfactual"] = evaluate_on_test(retrain(subsets["slim"], counterfactuals, extra), run,
                                                          test_features, mode)
    errors = np.where(arrays.pred != arrays.y, upweight, 1.0)
    group_balanced = 1.0 / np.bincount(groups)[groups]
    for name, weights in (("jtt", errors), ("oracle-all", group_balanced)):
        if name in wanted:
            results[name] = evaluate_on_test(reweighted_model(model, arrays, weights, mode, config, meta),
                                             run, test_features, mode)
    results.update(low_spuriosity_rows(model, run, arrays, scores, test_features, seed, wanted, extra))
    summary = summarise(results)
    summary["cell_purity"] = {name: cell_purity([(int(arrays.y[p.row]), *p.cell) for p in picks],
                                                groups[[p.row for p in picks]]) for name, picks in curated.items()}
    summary["box_iou"] = simulated.box_iou
    summary["counterfactuals"] = len(counterfactuals) if counterfactuals else 0
    summary["annotated"] = len(answers.labels)
    summary["annotated_fraction"] = len(answers.labels) / len(arrays)
    summary["subset_size"] = size
    return summary


def aggregate(per_seed: list[dict]) -> dict:
    out = {}
    for method in METHODS:
        runs = [s[method] for s in per_seed if method in s]
        if not runs:
            continue
        out[method] = {}
        for key in ("worst_group_acc", "mean_acc", "avg_acc"):
            values = [r[key] for r in runs]
            out[method][key] = {"mean": statistics.mean(values),
                                "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        if all("core_acc" in r for r in runs):
            values = [r["core_acc"] for r in runs]
            out[method]["core_acc"] = {"mean": statistics.mean(values),
                                       "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    for method in (*ANSWER_ROWS, "jtt"):  # (method - erm) / (oracle - erm), where both were trained
        if all(method in s and "oracle" in s for s in per_seed):
            gaps = [(s[method]["worst_group_acc"] - s["erm"]["worst_group_acc"])
                    / max(s["oracle"]["worst_group_acc"] - s["erm"]["worst_group_acc"], 1e-9) for s in per_seed]
            out[method]["gap_closed"] = {"mean": statistics.mean(gaps), "per_seed": gaps}
    if "gap_closed" in out.get("slim", {}):
        out["gap_closed"] = out["slim"]["gap_closed"]
    if all("stages" in s for s in per_seed):
        out["stages"] = {key: statistics.mean(s["stages"][key] for s in per_seed)
                         for key in ("answer_accuracy", "propagation_accuracy")}
    drawn = [s["box_iou"] for s in per_seed if s.get("box_iou") is not None]
    if drawn:
        out["box_iou"] = statistics.mean(drawn)
    out["annotated_fraction"] = statistics.mean(s["annotated_fraction"] for s in per_seed)
    out["cell_purity"] = {name: statistics.mean(s["cell_purity"][name] for s in per_seed)
                          for name in per_seed[0]["cell_purity"]}
    return out


def markdown(result: dict, label: str) -> str:
    lines = [f"| method ({label}) | worst-group | mean | core accuracy | gap closed |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for method in METHODS:
        if method in result:
            w, m = result[method]["worst_group_acc"], result[method]["mean_acc"]
            c, g = result[method].get("core_acc"), result[method].get("gap_closed")
            core = f"{c['mean']:.1%} ± {c['std']:.1%}" if c else ""
            gap = f"{g['mean']:.0%}" if g else ""
            lines.append(f"| {method} | {w['mean']:.1%} ± {w['std']:.1%} | {m['mean']:.1%} ± {m['std']:.1%} | {core} "
                         f"| {gap} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="dataset/model seeds")
    parser.add_argument("--mode", choices=WGA_MODES, default="last-layer", help="retraining mode")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.1], help="annotation noise levels")
    parser.add_argument("--jtt-upweight", type=float, default=50.0, help="JTT's error upweighting")
    parser.add_argument("--subset-size", type=int, default=None, help="curated subset size (default: curate's)")
    parser.add_argument("--variants", nargs="+", default=["attention", "published"],
                        help="curation variants; the first is reported as 'slim'")
    parser.add_argument("--corruption", choices=CORRUPTIONS, default=RetrainConfig.corruption,
                        help="corm row: how the likely-spurious region is corrupted")
    parser.add_argument("--corrupt-probability", type=float, default=None,
                        help="corm row and --corrupt: share of the training draws corrupted")
    parser.add_argument("--corrupt", choices=CORRUPT_CHOICES, default=RetrainConfig.corrupt,
                        help="SLIM's rows: corrupt the draws as retrain --corrupt does (auto: with counterfactuals)")
    parser.add_argument("--counterfactual-share", type=float, default=RetrainConfig.counterfactual_share,
                        help="+counterfactual rows: images generated per class, as a share of the class")
    parser.add_argument("--box-share", type=float, default=1.0,
                        help="share of answered images the simulated annotator also boxes (corm and "
                             "counterfactual rows use the boxes; the others ignore them)")
    parser.add_argument("--box-jitter", type=float, default=0.0,
                        help="each side of a drawn box strays by a normal draw of this share of the "
                             "box's size (0: the mask's exact box), as simulate-annotator --box-jitter")
    parser.add_argument("--no-object-cut", action="store_true",
                        help="+counterfactual rows: keep each donor's whole located region (box or high-CAM region) "
                             "instead of GrabCut's object: the comparison the cut was measured by")
    parser.add_argument("--only", nargs="+", choices=sorted({*FRESH_ROWS, *SUBSET_MODE_ROWS}), default=None,
                        help="train only these rows (and ERM), e.g. to add the remedies to a table")
    parser.add_argument("--synth", nargs="+", default=["default"], choices=list(VARIANTS),
                        help="datasets: synth variants of the family, each with every seed")
    parser.add_argument("--work", default="bench-out/wga", help="datasets and runs go here")
    parser.add_argument("--out", default="bench-out/wga.json", help="JSON result file (rewritten after every seed)")
    args = parser.parse_args()
    rows = FRESH_ROWS if args.mode == "fresh" else SUBSET_MODE_ROWS
    if args.only and set(args.only) - set(rows):
        parser.error(f"--mode {args.mode} has no row {', '.join(sorted(set(args.only) - set(rows)))}; "
                     f"its rows are {', '.join(rows)}")
    remedy = RetrainConfig(corruption=args.corruption, corrupt_probability=args.corrupt_probability,
                           counterfactual_share=args.counterfactual_share, corrupt=args.corrupt)
    result = {"mode": args.mode, "seeds": args.seeds, "box_share": args.box_share,
              "box_jitter": args.box_jitter, "corm": {"corruption": remedy.corruption,
              "corrupt_probability": remedy.corrupt_share("corm")},
              "added_corrupt_probability": remedy.corrupt_share("fresh"),
              "corrupt": remedy.corrupt,
              "counterfactual_share": remedy.counterfactual_share, "object_cut": not args.no_object_cut,
              "by_variant": {}}
    per_seed: dict[str, dict[str, list]] = {v: {str(n): [] for n in args.noise} for v in args.synth}
    for seed in args.seeds:  # seeds outermost: an interrupted run has whole seeds of every variant
        for variant in args.synth:
            run, no_answer_results = build(Path(args.work), seed, variant), {}
            only, drawing = (set(args.only) if args.only else None), BoxDrawing(args.box_share, args.box_jitter)
            for noise in args.noise:
                per_seed[variant][str(noise)].append(
                    fresh_seed(run, seed, noise, args.jtt_upweight, no_answer_results, only, remedy, drawing,
                               not args.no_object_cut)
                    if args.mode == "fresh"
                    else one_seed(run, seed, args.mode, noise, args.jtt_upweight, args.subset_size, args.variants,
                                  only, remedy, drawing, not args.no_object_cut))
                result["by_variant"][variant] = {"by_noise": {n: {**aggregate(rows), "per_seed": rows}
                                                              for n, rows in per_seed[variant].items() if rows}}
            atomic_write_json(Path(args.out), result)
    for variant, by_variant in result["by_variant"].items():
        for noise, summary in by_variant["by_noise"].items():
            print(markdown(summary, f"{variant}, noise {float(noise):g}, {args.mode}"))
            print("curated cells' group purity: "
                  + ", ".join(f"{name} {purity:.1%}" for name, purity in summary["cell_purity"].items())
                  + ("; answers / propagated scores agreeing with the true verdicts: "
                     f"{summary['stages']['answer_accuracy']:.1%} / {summary['stages']['propagation_accuracy']:.1%}"
                     if "stages" in summary else "") + "\n")


if __name__ == "__main__":
    main()
