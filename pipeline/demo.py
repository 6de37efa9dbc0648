"""``python -m pipeline demo``: the loop on the embedded synthetic default, one command, nothing to download.

synth → train → embed → sample → push → (simulated) annotate → pull → curate → retrain → report. Label
Studio is the one named by
``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` when set, otherwise a local one started for the run (SQLite
in ``RUN/label-studio``, on 127.0.0.1). Every stage reuses what an earlier demo computed, and push/pull are
idempotent, so running the demo twice costs seconds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import DEVICES, RunConfig, option, resolve_path
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.synth import SynthSpec, generate
from pipeline.labelstudio.annotator import noise_per_annotator, simulate_annotator
from pipeline.labelstudio.client import Settings
from pipeline.labelstudio.postgres import resolve_server
from pipeline.labelstudio.pull import pull_run
from pipeline.labelstudio.push import push_run
from pipeline.labelstudio.server import DATABASES, LocalCredentials, LocalLabelStudio
from pipeline.slim.curate import curate_run
from pipeline.slim.sample import sample_run

log = logging.getLogger(__name__)
SERVE_CHOICES = ("auto", "yes", "no")


@dataclass(frozen=True)
class DemoOptions:
    """The demo's flags; all but ``serve`` are :func:`run_demo`'s keyword arguments."""

    data_dir: str = option("data/synth", "where to write the dataset", flag="--data", metavar="DIR")
    run_dir: str = option("runs/demo", "run directory", flag="--run", metavar="DIR")
    device: str = option("auto", "where to compute", choices=DEVICES)
    noise: tuple[float, ...] = option((0.0,), "simulated annotators' noise: one value for all, or one per "
                                              "annotator", metavar="F")
    annotators: int = option(1, "simulated annotators, each a Label Studio user of its own above 1 (see "
                                "simulate-annotator --annotators)", metavar="K")
    annotations_per_task: int | None = option(None, "answers asked per task (default: 2 with --annotators above "
                                                    "1, else 1)", metavar="N")
    serve: str = option("auto", "keep the local Label Studio running at the end until Ctrl-C (auto: when run "
                                "from a terminal)", choices=SERVE_CHOICES)


@dataclass(frozen=True)
class ServerOptions:
    """``python -m pipeline labelstudio``: which data folder to serve, and where."""

    run: str | None = option(None, "serve this run's local Label Studio", metavar="DIR")
    data_dir: str | None = option(None, "Label Studio data folder (default: RUN/label-studio with --run)",
                                  metavar="DIR")
    port: int = option(8080, "port on 127.0.0.1")
    database: str = option("sqlite", "where Label Studio keeps its data: sqlite (a file in the data folder) or "
                                     "postgres (the server --postgres-url or POSTGRE_HOST/PORT/USER/PASSWORD/NAME "
                                     "name, else a PostgreSQL cluster of its own in DATA_DIR/postgres, started "
                                     "and stopped with it)", choices=DATABASES)
    postgres_url: str | None = option(None, "an existing PostgreSQL server for --database postgres, "
                                            "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE (without a password: "
                                            "$POSTGRE_PASSWORD)", metavar="URL")


def run_demo(data_dir: str | Path, run_dir: str | Path, device: str = "auto", noise: float | Sequence[float] = 0.0,
             serve: bool = False, progress: bool = True, spec: SynthSpec | None = None,
             config: RunConfig | None = None, annotators: int = 1, annotations_per_task: int | None = None) -> Run:
    """Run the whole loop; with ``serve``, keep the local Label Studio up until Ctrl-C.

    ``spec`` and ``config`` (for a new run) replace the defaults, e.g. to run the loop at a tiny size. With
    ``annotators`` above 1 a simulated team answers, each task asked of ``annotations_per_task`` of them (two
    by default: the fewest that can disagree, so the consensus and the annotators' agreement have something
    to weigh).
    """
    # the stages that run a network load torch: imported here, so that `serve` and the command line start without it
    from pipeline.model.embed import embed_run
    from pipeline.model.train import train_reference
    from pipeline.slim.report import report_run
    from pipeline.slim.retrain import retrain_run

    noise_per_annotator(noise, annotators)  # a wrong count is reported before an hour of training, not after
    if annotations_per_task is None:
        annotations_per_task = min(annotators, 2)
    data = generate(data_dir, spec or SynthSpec(), progress=progress)
    run = Run(run_dir)
    config = run.load_config() if run.exists() else (config or RunConfig())
    config.data.root = resolve_path(data)
    config.device = device
    train_reference(run, config, progress=progress)
    embed_run(run, config, progress=progress)
    sample_run(run, config, progress=progress)

    local = None if os.environ.get("LABEL_STUDIO_URL") else LocalLabelStudio(run.labelstudio_dir)
    try:
        if local is not None:
            log.info("starting a local Label Studio in %s (first start takes ~30 s)", run.labelstudio_dir)
            credentials = local.start()
            settings = Settings(credentials.url, credentials.token)
        else:
            settings = Settings.resolve(None, None)
        push_run(run, settings, annotations_per_task=annotations_per_task, progress=progress)
        simulate_annotator(run, settings, noise=noise, annotators=annotators, progress=progress)
        pull_run(run, settings)
        curate_run(run, config)
        retrain_run(run, config, progress=progress)
        report_run(run, config)
        if local is not None:
            _print_login(local.credentials)
            if serve:
                _wait_for_ctrl_c()
    finally:
        if local is not None:
            local.stop()
    if local is not None and not serve:
        log.info("Label Studio stopped; look at the tasks with `python -m pipeline labelstudio --run %s`", run.root)
    return run


def _print_login(credentials: LocalCredentials) -> None:
    log.info("Label Studio at %s  login %s / %s", credentials.url, credentials.username, credentials.password)


def _wait_for_ctrl_c() -> None:
    log.info("serving until Ctrl-C")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")


def serve_forever(data_dir: str | Path, port: int, database: str = "sqlite", postgres_url: str | None = None) -> None:
    """``python -m pipeline labelstudio``: a local server with the demo's login, until Ctrl-C.

    With ``database="postgres"`` its data lives on the server ``postgres_url`` (or Label Studio's ``POSTGRE_*``
    variables) names, else on a PostgreSQL cluster of its own in ``data_dir/postgres``, kept between runs.
    """
    if postgres_url and database != "postgres":
        raise PipelineError("--postgres-url needs --database postgres")
    postgres = resolve_server(postgres_url) if database == "postgres" else None
    with LocalLabelStudio(data_dir, port=port, database=database, postgres=postgres) as credentials:
        _print_login(credentials)
        _wait_for_ctrl_c()
