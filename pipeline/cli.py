"""``python -m pipeline``: one sub-command per stage of the SLIM loop.

The CLI only turns flags into the run's :class:`~pipeline.config.RunConfig` and calls the stage. A flag left
out keeps the value the run already has (or the default for a new run), so ``embed --run R`` after ``train``
needs nothing else. A :class:`~pipeline.errors.PipelineError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from pipeline import __version__
from pipeline.config import (
    ARCHS,
    CAM_METHODS,
    CURATION_VARIANTS,
    EMBEDDINGS,
    PRECISIONS,
    RETRAIN_MODES,
    SAMPLE_SPACES,
    RunConfig,
    resolve_path,
)
from pipeline.errors import PipelineError
from pipeline.run import Run


def _add_common(parser: argparse.ArgumentParser, run_required: bool = True) -> None:
    parser.add_argument("--run", required=run_required, metavar="DIR",
                        help="run directory holding the config, checkpoints and artifacts")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="where to compute (default auto: CUDA when present, else CPU)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="data-loading worker processes (default 0: load in the main process)")
    parser.add_argument("--force", action="store_true", help="recompute even when the stage's outputs are current")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_labelstudio(parser: argparse.ArgumentParser) -> None:
    """--run and the connection flags every Label Studio command takes."""
    parser.add_argument("--run", required=True, metavar="DIR", help="run directory")
    parser.add_argument("--url", default=None, help="Label Studio URL (default $LABEL_STUDIO_URL)")
    parser.add_argument("--api-key", default=None,
                        help="Label Studio access token, legacy or personal (default $LABEL_STUDIO_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="SLIM: find and remove spurious correlations in image classifiers with a few human labels.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = sub.add_parser("synth", help="write the embedded synthetic dataset (Waterbirds-like, with masks)",
                           description="Generate the deterministic synthetic default dataset into OUT.")
    synth.add_argument("out", metavar="OUT", help="folder to write (images/, masks/, metadata.csv)")
    synth.add_argument("--n-train", type=int, default=2400, help="training images (default 2400)")
    synth.add_argument("--n-val", type=int, default=600, help="validation images (default 600)")
    synth.add_argument("--n-test", type=int, default=1200, help="test images (default 1200)")
    synth.add_argument("--classes", type=int, default=2, help="number of classes (shapes), 2-6 (default 2)")
    synth.add_argument("--corr", type=float, default=0.95,
                       help="P(place agrees with class) in train; val/test are independent (default 0.95)")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")

    train = sub.add_parser("train", help="train the ERM reference model and report per-group accuracy",
                           description="SLIM step 1: ERM reference model on the training split.")
    _add_common(train)
    train.add_argument("--data", metavar="DIR", help="dataset folder (metadata.csv or class folders); "
                       "required for a new run")
    train.add_argument("--arch", choices=ARCHS, default=None,
                       help="backbone (default smallcnn: keeps an 8x8 attention map at 64 px)")
    train.add_argument("--epochs", type=int, default=None, help="training epochs (default 12)")
    train.add_argument("--batch-size", type=int, default=None, help="batch size (default 64)")
    train.add_argument("--lr", type=float, default=None, help="SGD learning rate (default 0.01)")
    train.add_argument("--weight-decay", type=float, default=None, help="weight decay (default 1e-4)")
    train.add_argument("--image-size", type=int, default=None,
                       help="resize images to this side (default: the dataset's own, else 224)")
    train.add_argument("--weights", metavar="PATH", default=None, help="start from this local checkpoint")
    train.add_argument("--pretrained", action="store_true", default=None,
                       help="start ResNets from ImageNet weights already in the torch cache (never downloads)")
    train.add_argument("--seed", type=int, default=None, help="training seed (default 0)")

    embed = sub.add_parser("embed", help="attention stage: GradCAM, attention vectors, AIoU, 2-D map",
                           description="SLIM steps 2-3 over the training split.")
    _add_common(embed)
    embed.add_argument("--cam", choices=CAM_METHODS, default=None,
                       help="CAM method (default gradcam: closed form in the forward pass; others use "
                            "pytorch-grad-cam)")
    embed.add_argument("--batch-size", type=int, default=None, help="images per batch (default 128)")
    embed.add_argument("--threshold", type=float, default=None,
                       help="CAM level of 'looked hardest' for AIoU and overlays (default 0.8)")
    embed.add_argument("--embedding", choices=EMBEDDINGS, default=None, help="2-D embedding (default umap)")
    embed.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="forward precision of the closed-form GradCAM (default auto: bf16 autocast on CUDA and "
                            "on CPUs with native bf16 (AVX-512 BF16/AMX), fp32 elsewhere; bf16 maps are within "
                            "~0.05 of fp32)")

    sample = sub.add_parser("sample", help="choose images to annotate and render their overlays",
                            description="SLIM step 4: per-class k-means on the attention representation.")
    _add_common(sample)
    budget = sample.add_mutually_exclusive_group()
    budget.add_argument("--per-class", type=int, default=None, metavar="N", help="images per class")
    budget.add_argument("--fraction", type=float, default=None, metavar="F",
                        help="fraction of each class (default 0.02)")
    sample.add_argument("--space", choices=SAMPLE_SPACES, default=None,
                        help="cluster the full attention vectors (default) or their 2-D embedding")
    sample.add_argument("--round", type=int, default=None, help="annotation round (default 1)")
    sample.add_argument("--seed", type=int, default=None, help="k-means seed (default 0)")

    curate = sub.add_parser("curate", help="spread the answers to every image and curate a balanced subset",
                            description="SLIM steps 6-7: label spreading per class, then a feature-balanced subset.")
    _add_common(curate)
    curate.add_argument("--labels", default=None, metavar="CSV",
                        help="answers as a CSV of image_id,label (core/spurious/unsure) instead of the pulled ones")
    curate.add_argument("--subset-size", type=int, default=None, metavar="N",
                        help="images in the curated subset (default 10%% of the training set, >= 20 per class)")
    curate.add_argument("--variant", choices=CURATION_VARIANTS, default=None,
                        help="attention (default): all images, cells of attended x ignored features; published: "
                             "SLIM as written (above-median score, pooled x ignored features)")
    curate.add_argument("--seed", type=int, default=None, help="clustering seed (default 0)")

    retrain = sub.add_parser("retrain", help="retrain with the curation's balance",
                             description="SLIM step 8: last-layer (DFR-style) or full fine-tuning on the subset, "
                                         "or a fresh model on all images balanced over the shortcut's cells.")
    _add_common(retrain)
    retrain.add_argument("--mode", choices=RETRAIN_MODES, default=None,
                         help="fresh (default: the reference recipe again on all images, cell-balanced), "
                              "last-layer (logistic regression on frozen features of the subset) or full "
                              "(fine-tune on the subset)")
    retrain.add_argument("--epochs", type=int, default=None, help="full mode: epochs over the subset (default 20)")
    retrain.add_argument("--lr", type=float, default=None, help="full mode: learning rate (default 0.001)")

    report = sub.add_parser("report", help="evaluate ERM and SLIM; write metrics.json and report.html",
                            description="Per-group accuracy, AIoU, core accuracy and spuriosity for both models.")
    _add_common(report)

    push = sub.add_parser("push", help="send the selected images to Label Studio as tasks with pre-annotations",
                          description="Create (or reuse) the run's Label Studio project and import the selection; "
                                      "pushing again creates no duplicates.")
    _add_labelstudio(push)
    push.add_argument("--project", type=int, default=None, metavar="ID",
                      help="use this existing project (default: the run's own, created on first push)")
    push.add_argument("--new-project", action="store_true", help="create a new project even if the run has one")
    push.add_argument("--round", type=int, default=None, help="selection round to push (default: the latest)")
    push.add_argument("--storage", choices=("upload", "local-files"), default="upload",
                      help="upload the pictures through the import API (default; works with remote and docker "
                           "servers) or serve them as Label Studio local files")
    push.add_argument("--document-root", default=None, metavar="DIR",
                      help="with --storage local-files: the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
    push.add_argument("--quiet", action="store_true", help="no progress bars")

    pull = sub.add_parser("pull", help="store the run's Label Studio annotations in the run",
                          description="Mirror new, edited, deleted and skipped annotations into labels.sqlite; "
                                      "only changed tasks are fetched.")
    _add_labelstudio(pull)
    pull.add_argument("--accept-deleted", action="store_true",
                      help="record tasks deleted in Label Studio as deleted instead of stopping")

    simulate = sub.add_parser("simulate-annotator", help="answer open tasks from the true masks (for demos, "
                              "tests and benchmarks)",
                              description="Answer core when AIoU >= 0.5, else spurious, through Label Studio's API.")
    _add_labelstudio(simulate)
    simulate.add_argument("--noise", type=float, default=0.0, help="fraction of answers flipped (default 0)")
    simulate.add_argument("--seed", type=int, default=0, help="seed of the noise and lead times (default 0)")
    simulate.add_argument("--quiet", action="store_true", help="no progress bar")

    server = sub.add_parser("labelstudio", help="run a local Label Studio (SQLite, 127.0.0.1) until Ctrl-C",
                            description="Start the local Label Studio the demo uses, with a known login and token.")
    server.add_argument("--data-dir", default=None, metavar="DIR",
                        help="Label Studio data folder (default: RUN/label-studio with --run)")
    server.add_argument("--run", default=None, metavar="DIR", help="serve this run's local Label Studio")
    server.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")

    demo = sub.add_parser("demo", help="the whole loop on the synthetic default (synth, train, embed, sample)",
                          description="Run every stage on the embedded synthetic dataset; re-runs reuse results.")
    demo.add_argument("--data", default="data/synth", metavar="DIR", help="where to write the dataset "
                      "(default data/synth)")
    demo.add_argument("--run", default="runs/demo", metavar="DIR", help="run directory (default runs/demo)")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="where to compute (default auto)")
    demo.add_argument("--noise", type=float, default=0.0, help="simulated annotator's noise (default 0)")
    demo.add_argument("--serve", choices=("auto", "yes", "no"), default="auto",
                      help="keep the local Label Studio running at the end until Ctrl-C (default: when run "
                           "from a terminal)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _override(section: object, args: argparse.Namespace, names: Sequence[str]) -> None:
    """Copy flags the user gave (not None) onto a config section."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            setattr(section, name, value)


def _config_for(args: argparse.Namespace, run: Run) -> RunConfig:
    config = run.load_config() if run.exists() else None
    if config is None:
        if args.command != "train":
            run.load_config()  # raises the "not a run directory" error
        if not args.data:
            raise PipelineError(f"{run.root} is a new run; pass --data DIR (the dataset to train on)")
        config = RunConfig()
    if getattr(args, "data", None):
        config.data.root = resolve_path(args.data)
    _override(config.data, args, ["workers", "image_size"] if args.command == "train" else ["workers"])
    if args.device:
        config.device = args.device
    if args.command == "train":
        _override(config.train, args, ["arch", "epochs", "batch_size", "lr", "weight_decay", "weights",
                                       "pretrained", "seed"])
        if config.train.weights:
            config.train.weights = resolve_path(config.train.weights)
    elif args.command == "embed":
        _override(config.embed, args, ["cam", "batch_size", "threshold", "embedding", "precision"])
    elif args.command == "sample":
        _override(config.sample, args, ["per_class", "fraction", "space", "round", "seed"])
        if args.fraction is not None:
            config.sample.per_class = None
    elif args.command == "curate":
        _override(config.curate, args, ["labels", "subset_size", "variant", "seed"])
        if args.labels:
            config.curate.labels = resolve_path(args.labels)
    elif args.command == "retrain":
        _override(config.retrain, args, ["mode", "epochs", "lr"])
    return config


def _run_command(args: argparse.Namespace) -> None:
    progress = not getattr(args, "quiet", False)
    if args.command == "synth":
        from pipeline.synth import SynthSpec, generate

        spec = SynthSpec(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, classes=args.classes,
                         corr=args.corr, image_size=args.image_size, seed=args.seed)
        out = generate(args.out, spec, progress=progress)
        print(f"synth: dataset in {out} ({dataclasses.asdict(spec)})")
        return
    if args.command == "demo":
        from pipeline.demo import run_demo

        serve = sys.stdin.isatty() if args.serve == "auto" else args.serve == "yes"
        run_demo(args.data, args.run, device=args.device, noise=args.noise, serve=serve, progress=progress)
        return
    if args.command == "labelstudio":
        from pipeline.demo import serve_forever

        if not (args.data_dir or args.run):
            raise PipelineError("pass --run DIR (its label-studio folder) or --data-dir DIR")
        serve_forever(args.data_dir or Run(args.run).labelstudio_dir, args.port)
        return
    if args.command in ("push", "pull", "simulate-annotator"):
        _run_labelstudio_command(args, progress)
        return
    run = Run(args.run)
    config = _config_for(args, run)
    if args.command == "train":
        from pipeline.train import train_reference

        train_reference(run, config, force=args.force, progress=progress)
    elif args.command == "embed":
        from pipeline.embed import embed_run

        embed_run(run, config, force=args.force, progress=progress)
    elif args.command == "sample":
        from pipeline.sample import sample_run

        sample_run(run, config, force=args.force, progress=progress)
    elif args.command == "curate":
        from pipeline.curate import curate_run

        curate_run(run, config)
    elif args.command == "retrain":
        from pipeline.retrain import retrain_run

        retrain_run(run, config, progress=progress)
    elif args.command == "report":
        from pipeline.report import report_run

        report_run(run, config)


def _run_labelstudio_command(args: argparse.Namespace, progress: bool) -> None:
    from pipeline.labelstudio import Settings

    run = Run(args.run)
    run.load_config()  # a clear error when --run is not a run
    settings = Settings.resolve(args.url, args.api_key)
    if args.command == "push":
        from pipeline.push import push_run

        push_run(run, settings, project_id=args.project, new_project=args.new_project, round_=args.round,
                 storage=args.storage, document_root=args.document_root, progress=progress)
    elif args.command == "pull":
        from pipeline.pull import pull_run

        pull_run(run, settings, accept_deleted=args.accept_deleted)
    else:
        from pipeline.annotator import simulate_annotator

        simulate_annotator(run, settings, noise=args.noise, seed=args.seed, progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _run_command(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept, re-run the command to continue", file=sys.stderr)
        return 130
    return 0
