"""``python -m pipeline``: one sub-command per stage of the SLIM loop, generated from the config dataclasses.

Every option is declared once, as a dataclass field made with :func:`~pipeline.core.config.option` (the run's
:class:`~pipeline.core.config.RunConfig` sections, or a command's own options such as
:class:`~pipeline.labelstudio.push.PushOptions`); this module turns those declarations into flags. For a run's
settings a flag left out keeps the value the run already has (or the default for a new run), so ``embed --run R``
after ``train`` needs nothing else. A :class:`~pipeline.core.errors.PipelineError` becomes one line on stderr and
exit status 2. This is the only module that prints; the stages log (``--log-level``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import __version__
from pipeline.core.config import RunConfig, option, resolve_path
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.synth import SynthSpec
from pipeline.core.termination import Terminated, graceful_termination
from pipeline.core.world import DISTRIBUTED_STAGES, World, launched
from pipeline.demo import DemoOptions, ServerOptions
from pipeline.labelstudio.annotator import AnnotatorOptions
from pipeline.labelstudio.client import ConnectionOptions, Settings
from pipeline.labelstudio.pull import PullOptions
from pipeline.labelstudio.push import PushOptions
from pipeline.labelstudio.verify import CheckOptions, PullCheckOptions

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SECTION_SEPARATOR = "__"  # argparse dest of a run-config flag: "<section>__<field>"


@dataclass(frozen=True)
class StageFlags:
    """Flags of every command that works on a run."""

    # torchrun's own parser reads any "--run" as an ambiguous abbreviation of its --run-path, wherever it
    # stands: under torchrun the run is given as --run-dir
    run: str = option("", "run directory holding the config, checkpoints and artifacts (--run-dir under "
                          "torchrun)", alias="--run-dir", metavar="DIR", required=True)
    force: bool = option(False, "recompute even when the stage's outputs are current")
    quiet: bool = option(False, "no progress bars")
    log_level: str = option("INFO", "how much the stages report", choices=LOG_LEVELS)


@dataclass(frozen=True)
class LabelStudioFlags:
    """Flags of every command that talks to Label Studio."""

    run: str = option("", "run directory", metavar="DIR", required=True)
    quiet: bool = option(False, "no progress bars")
    log_level: str = option("INFO", "how much the command reports", choices=LOG_LEVELS)


@dataclass(frozen=True)
class SynthFlags:
    """``synth``'s output folder and terminal flags (the dataset itself is a :class:`SynthSpec`)."""

    out: str = option("", "folder to write (images/, masks/, metadata.csv)", metavar="OUT", positional=True)
    quiet: bool = option(False, "no progress bar")
    log_level: str = option("INFO", "how much the command reports", choices=LOG_LEVELS)


# --- flags from dataclass fields ------------------------------------------------------------------------------
def _value_type(hint: Any) -> type:
    """``int`` for ``int`` and ``int | None``: the type argparse converts to."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _list_item_type(hint: Any) -> type | None:
    """``float`` for ``tuple[float, ...]`` or ``list[float]`` (an option taking one or more values), else None."""
    if typing.get_origin(hint) in (tuple, list):
        return typing.get_args(hint)[0]
    return None


def _help(field: dataclasses.Field) -> str:
    """The field's help with its default appended (unless the help already explains it)."""
    text = field.metadata["help"]
    unset = field.default is None or field.default is False or field.default == ""
    if "default" not in text and not unset:
        shown = " ".join(map(str, field.default)) if isinstance(field.default, (tuple, list)) else field.default
        text += f" (default: {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_options(parser: argparse.ArgumentParser, cls: type, prefix: str = "", only: Sequence[str] | None = None,
                keep_unset: bool = False) -> None:
    """One flag per :func:`option` field of ``cls`` (or of the fields named in ``only``).

    ``keep_unset``: flags default to ``None`` so that :func:`apply_options` changes only what the user gave
    (a run's settings); otherwise the field's default is the flag's default.
    """
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if "help" not in meta or (only is not None and field.name not in only):
            continue
        target: Any = parser
        if meta["exclusive"]:
            if meta["exclusive"] not in groups:
                groups[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["exclusive"]]
        kind = _value_type(hints[field.name])
        kwargs: dict[str, Any] = {"help": _help(field)}
        item = _list_item_type(kind)
        if item is not None:  # one or more values; the dataclass keeps them as given (a list)
            kind = item
            kwargs["nargs"] = "+"
        if meta["positional"]:
            target.add_argument(prefix + field.name, metavar=meta["metavar"], **kwargs)
            continue
        kwargs["dest"] = prefix + field.name
        if kind is bool:
            kwargs.update(action="store_true", default=None if keep_unset else field.default)
        else:
            kwargs.update(type=kind, default=None if keep_unset else field.default, choices=meta["choices"],
                          metavar=meta["metavar"] or (None if meta["choices"] else field.name.upper()))
            if meta["required"]:
                kwargs["required"] = True
        spellings = [meta["flag"] or "--" + field.name.replace("_", "-"), *([meta["alias"]] if meta["alias"] else [])]
        target.add_argument(*spellings, **kwargs)


def apply_options(target: Any, args: argparse.Namespace, prefix: str = "") -> None:
    """Copy the flags the user gave (not ``None``) onto the dataclass instance ``target``."""
    for field in dataclasses.fields(target):
        value = getattr(args, prefix + field.name, None)
        if "help" not in field.metadata or value is None:
            continue
        if field.metadata["path"]:
            value = resolve_path(value)
        setattr(target, field.name, value)
        if field.metadata["clears"]:
            setattr(target, field.metadata["clears"], None)


def options_from(cls: type, args: argparse.Namespace) -> Any:
    """An instance of the options dataclass ``cls`` built from parsed flags."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name in vars(args)})


# --- commands ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """A command that works on a run: which config sections (and fields) it exposes, and what it runs."""

    name: str
    help: str
    description: str
    sections: dict[str, Sequence[str] | None]  # section -> its fields on this command (None: all)
    run: Callable[[Run, RunConfig, argparse.Namespace], None]
    creates_run: bool = False


def _train(run: Run, config: RunConfig, args: argparse.Namespace) -> None:
    from pipeline.model.train import train_reference

    train_reference(run, config, force=args.force, progress=not args.quiet)


def _embed(run: Run, config: RunConfig, args: argparse.Namespace) -> None:
    from pipeline.model.embed import embed_run

    embed_run(run, config, force=args.force, progress=not args.quiet)


def _sample(run: Run, config: RunConfig, args: argparse.Namespace) -> None:
    from pipeline.slim.sample import sample_run

    sample_run(run, config, force=args.force, progress=not args.quiet)


def _propagate(run: Run, config: RunConfig, args: argparse.Namespace) -> None:
    from pipeline.slim.propagate import propagate_run

    propagate_run(run, config, force=args.force)


def _curate(run: Run, config: RunConfig, args: argparse.Namespace) -> None:
    from pipeline.slim.curate import curate_run

    curate_run(run, config)


def _retrain(run: Run, config: RunConfig, args: argparse.Namespace) -> None:
    from pipeline.slim.retrain import retrain_run

    retrain_run(run, config, progress=not args.quiet)


def _counterfactuals(run: Run, config: RunConfig, args: argparse.Namespace) -> None:
    from pipeline.slim.counterfactual import describe, generate_run

    folder = generate_run(run, config, force=args.force)
    run.save_config(config)  # the settings it was made with: a later retrain --augment reuses these images
    made = describe(run)
    print(f"counterfactuals: {made['images']} images in {folder} ("
          + ", ".join(f"{name} {n}" for name, n in made["per_class"].items()) + "; sources "
          + ", ".join(f"{source} {n}" for source, n in made["sources"].items())
          + f"); backgrounds filled {made['filled']:.1%} of the replaced regions; {made['rejected']} rejected by "
          "annotators")


def _report(run: Run, config: RunConfig, args: argparse.Namespace) -> None:
    from pipeline.slim.report import report_run

    report_run(run, config)


COMMON_SECTIONS: dict[str, Sequence[str] | None] = {"data": ("workers",), "": ("device",)}
STAGES = (
    Stage("train", "train the ERM reference model and report per-group accuracy",
          "SLIM step 1: ERM reference model on the training split.",
          {"data": None, "train": None, "": ("device",)}, _train, creates_run=True),
    Stage("embed", "attention stage: GradCAM, attention vectors, AIoU, 2-D map",
          "SLIM steps 2-3 over the training split.", {**COMMON_SECTIONS, "embed": None}, _embed),
    Stage("sample", "choose images to annotate and render their overlays",
          "SLIM step 4: per-class k-means on the attention representation.",
          {**COMMON_SECTIONS, "sample": None}, _sample),
    Stage("propagate", "spread the answers to every training image",
          "SLIM step 6: label spreading per class over the attention representation.",
          {**COMMON_SECTIONS, "curate": ("labels", "consensus")}, _propagate),
    Stage("curate", "spread the answers (when stale) and curate a feature-balanced subset",
          "SLIM steps 6-7: label spreading per class, then a feature-balanced subset.",
          {**COMMON_SECTIONS, "curate": None}, _curate),
    Stage("retrain", "retrain with the answers' balance",
          "SLIM step 8: a fresh model on all images balanced over the shortcut's cells (default), or last-layer "
          "(DFR-style) or full fine-tuning on the curated subset.", {**COMMON_SECTIONS, "retrain": None}, _retrain),
    Stage("counterfactuals", "generate counterfactual training images and list them",
          "ASPIRE-style: each class's core region on the other classes' backgrounds, in RUN/counterfactuals "
          "(what retrain --augment counterfactual adds; push-checks lets annotators reject some).",
          {"retrain": ("counterfactual_share", "editor")}, _counterfactuals),
    Stage("report", "evaluate ERM and SLIM; write metrics.json and report.html",
          "Per-group accuracy, AIoU, core accuracy and spuriosity for both models.", COMMON_SECTIONS, _report),
)


def _run_stage(stage: Stage, args: argparse.Namespace) -> None:
    run = Run(args.run)
    if run.exists():
        config = run.load_config()
    elif not stage.creates_run:
        run.load_config()  # raises the "not a run directory" error
    elif not args.data__root:
        raise PipelineError(f"{run.root} is a new run; pass --data DIR (the dataset to train on)")
    else:
        config = RunConfig()
    for section in stage.sections:
        apply_options(getattr(config, section) if section else config, args, f"{section}{SECTION_SEPARATOR}")
    if not launched().distributed:
        stage.run(run, config, args)
        return
    from pipeline.model import distributed  # torch: loaded for torchrun's processes, which all feed a network

    distributed.setup(config.device)  # join the other processes of this stage
    try:
        stage.run(run, config, args)
    finally:
        distributed.teardown()


def _synth(args: argparse.Namespace) -> None:
    from pipeline.core.synth import generate

    spec = options_from(SynthSpec, args)
    out = generate(args.out, spec, progress=not args.quiet)
    print(f"synth: dataset in {out} ({dataclasses.asdict(spec)})")


def _push(args: argparse.Namespace) -> None:
    from pipeline.labelstudio.push import push_run

    push_run(_checked_run(args), _settings(args), **dataclasses.asdict(options_from(PushOptions, args)),
             progress=not args.quiet)


def _pull(args: argparse.Namespace) -> None:
    from pipeline.labelstudio.pull import pull_run

    pull_run(_checked_run(args), _settings(args), **dataclasses.asdict(options_from(PullOptions, args)))


def _push_checks(args: argparse.Namespace) -> None:
    from pipeline.labelstudio.verify import push_checks

    push_checks(_checked_run(args), _settings(args), **dataclasses.asdict(options_from(CheckOptions, args)),
                progress=not args.quiet)


def _pull_checks(args: argparse.Namespace) -> None:
    from pipeline.labelstudio.verify import pull_checks

    pull_checks(_checked_run(args), _settings(args), **dataclasses.asdict(options_from(PullCheckOptions, args)))


def _simulate(args: argparse.Namespace) -> None:
    from pipeline.labelstudio.annotator import simulate_annotator

    simulate_annotator(_checked_run(args), _settings(args), **dataclasses.asdict(options_from(AnnotatorOptions, args)),
                       progress=not args.quiet)


def _checked_run(args: argparse.Namespace) -> Run:
    run = Run(args.run)
    run.load_config()  # a clear error when --run is not a run
    return run


def _settings(args: argparse.Namespace) -> Settings:
    connection = options_from(ConnectionOptions, args)
    return Settings.resolve(connection.url, connection.api_key)


def _serve(args: argparse.Namespace) -> None:
    from pipeline.demo import serve_forever

    options = options_from(ServerOptions, args)
    if not (options.data_dir or options.run):
        raise PipelineError("pass --run DIR (its label-studio folder) or --data-dir DIR")
    serve_forever(options.data_dir or Run(options.run).labelstudio_dir, options.port, options.database,
                  options.postgres_url)


def _demo(args: argparse.Namespace) -> None:
    from pipeline.demo import run_demo

    options = options_from(DemoOptions, args)
    serve = sys.stdin.isatty() if options.serve == "auto" else options.serve == "yes"
    run_demo(options.data_dir, options.run_dir, device=options.device, noise=options.noise, serve=serve,
             progress=not args.quiet, annotators=options.annotators,
             annotations_per_task=options.annotations_per_task)


@dataclass(frozen=True)
class LabelStudioCommand:
    """A command that talks to Label Studio: its options dataclass and the function that runs it."""

    name: str
    help: str
    description: str
    options: type
    handler: Callable[[argparse.Namespace], None]


LABEL_STUDIO_COMMANDS = (
    LabelStudioCommand(
        "push", "send the selected images to Label Studio as tasks with pre-annotations",
        "Create (or reuse) the run's Label Studio project and import the selection; pushing again creates no "
        "duplicates.", PushOptions, _push),
    LabelStudioCommand(
        "pull", "store the run's Label Studio annotations in the run",
        "Mirror new, edited, deleted and skipped annotations into labels.sqlite; only changed tasks are fetched.",
        PullOptions, _pull),
    LabelStudioCommand(
        "push-checks", "send a sample of the counterfactual images to Label Studio to be checked",
        "Ask annotators whether each sampled generated image still shows its class (yes / no), in a project of "
        "its own; pushing again creates no duplicates, after a regeneration only the new images.", CheckOptions,
        _push_checks),
    LabelStudioCommand(
        "pull-checks", "store the answers to the counterfactual checks; rejected images are never trained on",
        "Mirror the check answers into labels.sqlite and report each class's rejection rate.", PullCheckOptions,
        _pull_checks),
    LabelStudioCommand(
        "simulate-annotator", "answer open tasks from the true masks (for demos, tests and benchmarks)",
        "Answer core when AIoU >= 0.5, else spurious, through Label Studio's API; with --checks, the counterfactual "
        "checks: yes while at least half of the donor's object is kept. --annotators K answers as a team of K Label "
        "Studio users, each with its own token, noise and pace, as many per task as the project asks for.",
        AnnotatorOptions, _simulate),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="SLIM: find and remove spurious correlations in image classifiers with a few human labels.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = sub.add_parser("synth", help="write the embedded synthetic dataset (Waterbirds-like, with masks)",
                           description="Generate the deterministic synthetic default dataset into OUT.")
    add_options(synth, SynthFlags)
    add_options(synth, SynthSpec)
    synth.set_defaults(handler=_synth)

    for stage in STAGES:
        command = sub.add_parser(stage.name, help=stage.help, description=stage.description)
        add_options(command, StageFlags)
        for section, fields in stage.sections.items():
            section_cls = type(getattr(RunConfig(), section)) if section else RunConfig
            add_options(command, section_cls, f"{section}{SECTION_SEPARATOR}", fields, keep_unset=True)
        command.set_defaults(handler=lambda args, stage=stage: _run_stage(stage, args))

    for spec in LABEL_STUDIO_COMMANDS:
        command = sub.add_parser(spec.name, help=spec.help, description=spec.description)
        add_options(command, LabelStudioFlags)
        add_options(command, ConnectionOptions)
        add_options(command, spec.options)
        command.set_defaults(handler=spec.handler)

    server = sub.add_parser("labelstudio",
                            help="run a local Label Studio (SQLite or PostgreSQL, 127.0.0.1) until Ctrl-C",
                            description="Start the local Label Studio the demo uses, with a known login and token; "
                                        "its data in SQLite (default) or PostgreSQL.")
    add_options(server, ServerOptions)
    server.set_defaults(handler=_serve, log_level="INFO")

    demo = sub.add_parser("demo", help="the whole loop on the synthetic default, with a local Label Studio",
                          description="Run every stage on the embedded synthetic dataset; re-runs reuse results.")
    add_options(demo, DemoOptions)
    add_options(demo, SynthFlags, only=("quiet", "log_level"))
    demo.set_defaults(handler=_demo)
    return parser


def configure_logging(level: str, world: World | None = None) -> None:
    """The stages' log on the terminal: ``stage: message`` on stdout, warnings and errors on stderr.

    Only the ``pipeline`` loggers are shown; libraries (httpx logs every request at INFO) stay at WARNING.
    Under torchrun the other ranks than 0 show only their warnings and errors, marked with their rank.
    """
    def below_warning(record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING

    world = world or World()
    formatter = logging.Formatter(("" if world.is_main else f"[rank {world.rank}] ") + "%(stage)s: %(message)s")
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(below_warning)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.addFilter(_stage_name)
        handler.setFormatter(formatter)
    logger = logging.getLogger("pipeline")
    logger.handlers[:] = [out, err]
    logger.setLevel(level if world.is_main else max(logging.WARNING, logging.getLevelName(level)))


def _stage_name(record: logging.LogRecord) -> bool:
    """Name a record by its module (``pipeline.slim.curate`` -> ``curate``): what the user ran."""
    record.stage = record.name.rsplit(".", 1)[-1]
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    world = launched()
    configure_logging(args.log_level, world)
    try:
        if world.distributed and args.command not in DISTRIBUTED_STAGES:
            raise PipelineError(f"`{args.command}` runs in one process; start it with python -m pipeline, not "
                                f"torchrun (torchrun runs {', '.join(DISTRIBUTED_STAGES)})")
        with graceful_termination():  # SIGTERM / SIGHUP clean up like Ctrl-C (a local Label Studio is stopped)
            args.handler(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(f"stopped by {exc}; finished stages are kept, re-run the command to continue", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept, re-run the command to continue", file=sys.stderr)
        return 130
    return 0
