"""Evaluate the reference (ERM) and retrained (SLIM) models side by side; write metrics.json and report.html.

Per model, on val and test: per-group accuracy, mean and worst group; where masks exist, AIoU (how much of
the strongest attention lies on the object) and core accuracy (accuracy when everything outside the object
is noise). The spuriosity ranking of each class (Moayeri et al.; :mod:`pipeline.slim.spuriosity`) orders the
validation images by the reference model's attention, and the bias gap of each model is its accuracy on the
most-spurious quartile minus the least-spurious quartile of that one ranking.
"""

from __future__ import annotations

import base64
import html
import io
import logging

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.config import RunConfig
from pipeline.core.data import TEST, VAL, ImageSet, Sample, load_dataset, load_rgb
from pipeline.core.io import atomic_write_bytes, atomic_write_json
from pipeline.core.run import Run
from pipeline.core.store import AnnotationStore
from pipeline.model.attention import compute_attention
from pipeline.model.cam import make_extractor
from pipeline.model.evaluate import group_metrics, predict
from pipeline.model.loaders import make_loader
from pipeline.model.networks import Classifier, load_checkpoint, resolve_device
from pipeline.slim.counterfactual import describe, manifest
from pipeline.slim.overlays import full_cam, panels
from pipeline.slim.propagate import Propagation
from pipeline.slim.spuriosity import spuriosity

log = logging.getLogger(__name__)
GRID = 6  # thumbnails per row of the most-spurious / most-core grids
THUMBNAIL = 128  # side of a thumbnail in the grids, in pixels
BIAS_QUANTILE = 4  # the bias gap compares the top and bottom quartile (Moayeri et al.)


def evaluate_model(model: Classifier, image_set: ImageSet, split: int, size: int, config: RunConfig,
                   device: torch.device) -> tuple[dict, AttentionArrays]:
    """Group metrics (+ AIoU and core accuracy with masks) and the split's attention arrays."""
    samples = image_set.split(split)
    loader = make_loader(image_set, samples, size, config.embed.batch_size, config.data.workers, with_masks=True)
    arrays = compute_attention(make_extractor(model.to(device), "gradcam"), loader, device,
                               config.embed.threshold, size, progress=False)
    predictions = arrays.pred[arrays.rows_of(s.index for s in samples)]
    metrics = group_metrics(image_set, samples, predictions)
    if image_set.has_masks:
        metrics["aiou"] = float(arrays.aiou.mean())
        metrics["core_acc"] = core_accuracy(model, image_set, samples, size, config, device)
    return metrics, arrays


def core_accuracy(model: Classifier, image_set: ImageSet, samples: list[Sample], size: int, config: RunConfig,
                  device: torch.device) -> float:
    """Accuracy with everything outside each object's mask replaced by noise (Salient ImageNet's core accuracy):
    what the model gets right from the object alone. Needs the dataset's masks (evaluation only)."""
    loader = make_loader(image_set, samples, size, config.embed.batch_size, config.data.workers, core_only=True)
    probs, _ = predict(model.to(device), loader, device, progress=False)
    return float((probs.argmax(1) == np.array([s.y for s in samples])).mean())


def bias_gaps(spurious: np.ndarray, ranked: AttentionArrays, predictions: np.ndarray,
              class_names: tuple[str, ...]) -> dict[str, dict]:
    """Per class: accuracy on the most-spurious minus the least-spurious quartile of validation images (a model
    that leans on the spurious cue does better where it is present: a positive gap).

    ``ranked`` is the reference model's validation attention (the one ranking every model is judged on) and
    ``spurious`` its spuriosity; ``predictions`` are one model's, in the same row order.
    """
    correct = predictions == ranked.y
    gaps = {}
    for y in ranked.classes:
        targets = ranked.for_class(y)
        if len(targets) < BIAS_QUANTILE:
            continue
        order = targets[np.argsort(spurious[targets], kind="stable")]  # least spurious first
        quarter = max(1, len(order) // BIAS_QUANTILE)
        least, most = correct[order[:quarter]].mean(), correct[order[-quarter:]].mean()
        gaps[class_names[y]] = {"least_spurious_acc": float(least), "most_spurious_acc": float(most),
                                      "bias_gap": float(most - least)}
    return gaps


def report_run(run: Run, config: RunConfig) -> dict:
    """Evaluate both models; write ``metrics.json`` and the self-contained ``report.html``."""
    train = AttentionArrays.load(run.require(run.attention_path, "embed --run RUN"))
    propagation = Propagation.load(run.require(run.propagation_path, "propagate --run RUN"))
    run.require(run.slim_checkpoint_path, "retrain --run RUN")
    image_set = load_dataset(config.data.root, run.manifest_path)
    device = resolve_device(config.device)
    metrics = run.load_metrics()
    models = {"erm": load_checkpoint(run.checkpoint_path), "slim": load_checkpoint(run.slim_checkpoint_path)}
    val_arrays = {}
    for name, (model, meta) in models.items():
        test, _ = evaluate_model(model, image_set, TEST, meta["image_size"], config, device)
        val, val_arrays[name] = evaluate_model(model, image_set, VAL, meta["image_size"], config, device)
        metrics[name] = {**metrics.get(name, {}), **test, "val": val}
    ranking = spuriosity(train, propagation.score, val_arrays["erm"], seed=config.curate.seed)
    gaps = {name: bias_gaps(ranking, val_arrays["erm"], arrays.pred, train.class_names)
            for name, arrays in val_arrays.items()}
    metrics["slim"]["mode"] = models["slim"][1].get("mode")
    # each retraining mode's last report, so modes tried on one run can be compared side by side
    metrics["modes"] = {**metrics.get("modes", {}),
                        mode_row(models["slim"][1]): mode_summary(metrics["slim"], gaps["slim"])}
    metrics["annotated"] = annotated_images(run, propagation)
    metrics["annotated_fraction"] = metrics["annotated"] / len(train)
    metrics["spuriosity"] = gaps
    atomic_write_json(run.metrics_path, metrics)
    atomic_write_bytes(run.report_path, render_html(run, image_set, train, propagation, metrics).encode())
    erm, slim = metrics["erm"], metrics["slim"]
    log.info(f"worst-group {erm['worst_group_acc']:.1%} -> {slim['worst_group_acc']:.1%}, mean "
          f"{erm['mean_acc']:.1%} -> {slim['mean_acc']:.1%} ({slim['mode']}, {metrics['annotated']} images "
          f"annotated = {metrics['annotated_fraction']:.1%}); {run.report_path}")
    return metrics


def mode_row(meta: dict) -> str:
    """A retrained model's row in the modes table: its mode, and what was added to its draws (counterfactuals,
    ``--corrupt``), since each is a retraining of its own to compare."""
    row = meta.get("mode")
    if meta.get("augment", "none") != "none":
        row = f"{row}+{meta['augment']}"
    if "corruption" in meta and meta.get("mode") != "corm":
        row = f"{row}+corrupted"
    return row


def mode_summary(slim: dict, gaps: dict[str, dict]) -> dict:
    """The headline numbers of one retraining mode (test split): what the report's mode table shows."""
    summary = {key: slim[key] for key in ("worst_group_acc", "mean_acc", "aiou", "core_acc") if key in slim}
    return {**summary, "bias_gap": {name: gap["bias_gap"] for name, gap in gaps.items()}}


def annotated_images(run: Run, propagation: Propagation) -> int:
    """Images with at least one annotation in the run's database (unsure ones too); without a database (CSV
    answers), the images whose answer was used."""
    if not run.labels_path.exists():
        return int(propagation.answered.sum())
    store = AnnotationStore(run.labels_path)
    try:
        return len({a.image_id for a in store.annotations()})
    finally:
        store.close()


# --- HTML -------------------------------------------------------------------------------------------------
def _png(figure_or_image) -> str:
    buffer = io.BytesIO()
    if isinstance(figure_or_image, Image.Image):
        figure_or_image.save(buffer, format="PNG")
    else:
        figure_or_image.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _maps(train: AttentionArrays, propagation: Propagation) -> str:
    coords, answered = train.emb_att, propagation.answered
    figure = Figure(figsize=(11, 4.5))
    axes = figure.subplots(1, 2)
    for y, name in enumerate(train.class_names):
        axes[0].scatter(*coords[train.for_class(y)].T, s=4, label=name)
    axes[0].legend(markerscale=3)
    axes[0].set_title("attention map (UMAP/PCA of f) by class")
    points = axes[1].scatter(*coords.T, s=4, c=propagation.score, cmap="RdYlGn", vmin=0, vmax=1)
    axes[1].scatter(*coords[answered].T, s=40, facecolors="none", edgecolors="black", label="annotated")
    axes[1].legend()
    axes[1].set_title("propagated P(core)")
    figure.colorbar(points, ax=axes[1])
    return _png(figure)


def _corrupted(slim: dict) -> str:
    """How a retraining's draws were corrupted (corm, ``--corrupt``) and where the regions came from."""
    return (f"the likely-spurious region of {slim.get('corrupt_probability', 0):.0%} of the draws corrupted by "
            f"{slim.get('corruption', '?')} (regions from "
            f"{', '.join(f'{k}: {v}' for k, v in slim.get('regions', {}).items())})")


TRAINED_ON = {  # mode -> what its retrained model saw, from the details retrain recorded
    "fresh": lambda s: f"a new model on all {s.get('images', '?')} training images, balanced over "
                       f"{s.get('cells', '?')} cells",
    "corm": lambda s: f"a new model on all {s.get('images', '?')} training images, {_corrupted(s)}",
    "low-spuriosity": lambda s: f"the head refit on the {s.get('share', 0):.0%} least spurious images of each class "
                                f"({s.get('images', '?')} images; share chosen on validation worst-class accuracy)",
}


def _trained_on(slim: dict) -> str:
    """What the retrained model saw: the curated subset, or what the mode's own recipe used, and the
    counterfactuals added to it."""
    recipe = TRAINED_ON.get(slim.get("mode"))
    seen = recipe(slim) if recipe else f"curated subset {slim.get('subset_size', '?')} images"
    if "corruption" in slim and slim.get("mode") != "corm":  # --corrupt on a mode that draws natural images
        seen += f", {_corrupted(slim)}"
    if "counterfactuals" in slim:
        made = slim["counterfactuals"]
        seen += (f", plus {made['images']} counterfactual images ({made['rejected']} rejected by annotators "
                 "left out)")
    return seen


def _counterfactual_panel(run: Run, image_set: ImageSet, slim: dict) -> str:
    """Generated counterfactuals beside the image each came from (top: the original, bottom: the generated
    image), ``GRID`` per class: what the retrained model learned from when augmentation ran."""
    if "counterfactuals" not in slim or not (run.counterfactual_dir / "metadata.csv").exists():
        return ""
    rows = manifest(run)
    side = THUMBNAIL
    sections = []
    for y, name in enumerate(image_set.class_names):
        shown = [r for r in rows if int(r["y"]) == y][:GRID]
        if not shown:
            continue
        canvas = Image.new("RGB", (len(shown) * (side + 4), 2 * (side + 4)), "white")
        for i, row in enumerate(shown):
            original = load_rgb(image_set.root / image_set.samples[int(row["donor"])].filename, side)
            generated = load_rgb(run.counterfactual_dir / row["img_filename"], side)
            canvas.paste(Image.fromarray((original * 255).astype(np.uint8)), (i * (side + 4), 0))
            canvas.paste(Image.fromarray((generated * 255).astype(np.uint8)), (i * (side + 4), side + 4))
        sections.append(f"<h3>{html.escape(name)}</h3>{_png(canvas)}")
    summary = describe(run)
    return (f"<h2>Counterfactual training images</h2><p>{summary['images']} generated "
            f"({', '.join(f'{html.escape(c)}: {n}' for c, n in summary['per_class'].items())}); "
            f"{summary['rejected']} rejected by annotators; the other classes' backgrounds filled "
            f"{summary['filled']:.0%} of the replaced regions. Top: the original; bottom: the generated image.</p>"
            + "".join(sections))


def _modes_table(metrics: dict) -> str:
    """ERM, then every retraining mode reported on this run: WGA, mean, core accuracy, AIoU, bias gap per class."""
    classes = list(metrics["spuriosity"]["erm"])
    rows = {"ERM": {**metrics["erm"], "bias_gap": {c: g["bias_gap"] for c, g in metrics["spuriosity"]["erm"].items()}},
            **metrics.get("modes", {})}
    header = "".join(f"<th>bias gap {html.escape(c)}</th>" for c in classes)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{m['worst_group_acc']:.1%}</td><td>{m['mean_acc']:.1%}</td>"
        f"<td>{m.get('core_acc', float('nan')):.1%}</td><td>{m.get('aiou', float('nan')):.2f}</td>"
        + "".join(f"<td>{m['bias_gap'].get(c, float('nan')):+.1%}</td>" for c in classes) + "</tr>"
        for name, m in rows.items())
    return (f"<table><tr><th>model</th><th>worst group</th><th>mean</th><th>core acc.</th><th>AIoU</th>{header}</tr>"
            f"{body}</table>")


def _bars(metrics: dict) -> str:
    groups = list(metrics["erm"]["per_group"])
    x = np.arange(len(groups))
    figure = Figure(figsize=(max(6, len(groups) * 1.4), 3.5))
    axis = figure.subplots()
    for offset, name in ((-0.2, "erm"), (0.2, "slim")):
        axis.bar(x + offset, [metrics[name]["per_group"][g]["acc"] for g in groups], width=0.4, label=name.upper())
    axis.set_xticks(x, groups, rotation=20)
    axis.set_ylim(0, 1)
    axis.set_ylabel("test accuracy")
    axis.legend()
    return _png(figure)


def _grid(image_set: ImageSet, train: AttentionArrays, rows: np.ndarray, threshold: float) -> str:
    side = THUMBNAIL
    canvas = Image.new("RGB", (len(rows) * (side + 4), 2 * (side + 4)), "white")
    for i, row in enumerate(rows):
        sample = image_set.samples[int(train.index[row])]
        rgb = load_rgb(image_set.root / sample.filename, side)
        original, overlay, _ = panels(rgb, full_cam(train.cam[row], side), threshold)
        canvas.paste(Image.fromarray(original), (i * (side + 4), 0))
        canvas.paste(Image.fromarray(overlay), (i * (side + 4), side + 4))
    return _png(canvas)


def _agreement_panel(image_set: ImageSet, train: AttentionArrays, metrics: dict, threshold: float) -> str:
    """The annotators' agreement (where images were answered more than once): Krippendorff's alpha overall and
    per class, each annotator's work and agreement with the consensus, and the most contested images."""
    agreement = metrics.get("annotation")
    if not agreement:
        return ""

    def number(value: float | None, form: str) -> str:
        return "n/a" if value is None else format(value, form)

    per_class = ", ".join(f"{html.escape(name)} {number(alpha, '.2f')}"
                          for name, alpha in agreement["alpha_per_class"].items())
    people = "".join(f"<tr><td>{html.escape(name)}</td><td>{q['answers']}</td><td>{number(q['agreement'], '.1%')}</td>"
                     f"<td>{number(q['estimated_accuracy'], '.1%')}</td><td>{number(q['median_lead_time'], '.1f')}</td></tr>"
                     for name, q in agreement["annotators"].items())
    contested = [train.row_of(c["image_id"]) for c in agreement["most_contested"] if train.has_image(c["image_id"])]
    grid = _grid(image_set, train, np.array(contested, dtype=int), threshold) if contested else ""
    return (f"<h2>Annotator agreement</h2><p>{agreement['images_answered_more_than_once']} images answered more "
            f"than once; consensus by <b>{html.escape(agreement['consensus'])}</b>. Krippendorff's alpha "
            f"<b>{number(agreement['alpha'], '.2f')}</b> (per class: {per_class}).</p>"
            "<table><tr><th>annotator</th><th>answers</th><th>agrees with consensus</th><th>estimated accuracy</th>"
            f"<th>median lead time (s)</th></tr>{people}</table>"
            f"<h3>Most contested images (consensus nearest a tie)</h3>{grid}")


def render_html(run: Run, image_set: ImageSet, train: AttentionArrays, propagation: Propagation,
                metrics: dict) -> str:
    order = np.argsort(propagation.score)
    threshold = run.load_config().embed.threshold
    table = "".join(
        f"<tr><td>{name.upper()}</td><td>{metrics[name]['worst_group_acc']:.1%}</td>"
        f"<td>{metrics[name]['mean_acc']:.1%}</td><td>{metrics[name]['avg_acc']:.1%}</td>"
        f"<td>{metrics[name].get('aiou', float('nan')):.2f}</td><td>{metrics[name].get('core_acc', float('nan')):.1%}</td>"
        f"<td>{metrics[name]['val']['worst_group_acc']:.1%}</td></tr>" for name in ("erm", "slim"))
    gaps = "".join(f"<tr><td>{m.upper()}</td><td>{html.escape(c)}</td><td>{g['least_spurious_acc']:.1%}</td>"
                   f"<td>{g['most_spurious_acc']:.1%}</td><td>{g['bias_gap']:+.1%}</td></tr>"
                   for m, per_class in metrics["spuriosity"].items() for c, g in per_class.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>SLIM report: {html.escape(run.root.name)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}td,th{{padding:4px 10px;text-align:right}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}img{{max-width:100%}}</style></head><body>
<h1>SLIM report — {html.escape(str(run.root))}</h1>
<p>Retraining mode: <b>{html.escape(str(metrics['slim'].get('mode')))}</b>; {_trained_on(metrics['slim'])};
{metrics['annotated']} images annotated
({metrics['annotated_fraction']:.1%} of the training set).</p>
<h2>Numbers (test unless marked)</h2>
<table><tr><th>model</th><th>worst group</th><th>mean</th><th>average</th><th>AIoU</th><th>core acc.</th>
<th>val worst group</th></tr>{table}</table>
<h2>Retraining modes run on this run (test; each mode's last report)</h2>{_modes_table(metrics)}
<h2>Per-group accuracy</h2>{_bars(metrics)}
{_counterfactual_panel(run, image_set, metrics['slim'])}
{_agreement_panel(image_set, train, metrics, threshold)}
<h2>Attention map</h2>{_maps(train, propagation)}
<h2>Most spurious training images (lowest propagated score)</h2>{_grid(image_set, train, order[:GRID], threshold)}
<h2>Most core training images (highest propagated score)</h2>{_grid(image_set, train, order[-GRID:][::-1], threshold)}
<h2>Spuriosity ranking: bias gap on validation (Moayeri et al.)</h2>
<table><tr><th>model</th><th>class</th><th>least-spurious quartile</th><th>most-spurious quartile</th><th>gap</th></tr>{gaps}</table>
</body></html>
"""
