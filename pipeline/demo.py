"""``python -m pipeline demo``: the loop on the embedded synthetic default, one command, nothing to download.

synth → train → embed → sample → push → (simulated) annotate → pull → curate → retrain → report. Label
Studio is the one named by
``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` when set, otherwise a local one started for the run (SQLite
in ``RUN/label-studio``, on 127.0.0.1). Every stage reuses what an earlier demo computed, and push/pull are
idempotent, so running the demo twice costs seconds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.annotator import simulate_annotator
from pipeline.config import RunConfig, resolve_path
from pipeline.curate import curate_run
from pipeline.embed import embed_run
from pipeline.labelstudio import Settings
from pipeline.labelstudio_server import LocalCredentials, LocalLabelStudio
from pipeline.pull import pull_run
from pipeline.push import push_run
from pipeline.report import report_run
from pipeline.retrain import retrain_run
from pipeline.run import Run
from pipeline.sample import sample_run
from pipeline.synth import SynthSpec, generate
from pipeline.train import train_reference


def run_demo(data_dir: str | Path, run_dir: str | Path, device: str = "auto", noise: float = 0.0,
             serve: bool = False, progress: bool = True, spec: SynthSpec | None = None,
             config: RunConfig | None = None) -> Run:
    """Run the whole loop; with ``serve``, keep the local Label Studio up until Ctrl-C.

    ``spec`` and ``config`` (for a new run) replace the defaults, e.g. to run the loop at a tiny size.
    """
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
            print(f"demo: starting a local Label Studio in {run.labelstudio_dir} (first start takes ~30 s)")
            credentials = local.start()
            settings = Settings(credentials.url, credentials.token)
        else:
            settings = Settings.resolve(None, None)
        push_run(run, settings, progress=progress)
        simulate_annotator(run, settings, noise=noise, progress=progress)
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
        print(f"demo: Label Studio stopped; look at the tasks with `python -m pipeline labelstudio --run {run.root}`")
    return run


def _print_login(credentials: LocalCredentials) -> None:
    print(f"demo: Label Studio at {credentials.url}  login {credentials.username} / {credentials.password}")


def _wait_for_ctrl_c() -> None:
    print("demo: serving until Ctrl-C")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print()


def serve_forever(data_dir: str | Path, port: int) -> None:
    """``python -m pipeline labelstudio``: a local server with the demo's login, until Ctrl-C."""
    with LocalLabelStudio(data_dir, port=port) as credentials:
        _print_login(credentials)
        _wait_for_ctrl_c()
