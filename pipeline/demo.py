"""``python -m pipeline demo``: the loop on the embedded synthetic default, one command, nothing to download."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import RunConfig, resolve_path
from pipeline.embed import embed_run
from pipeline.run import Run
from pipeline.sample import sample_run
from pipeline.synth import SynthSpec, generate
from pipeline.train import train_reference


def run_demo(data_dir: str | Path, run_dir: str | Path, device: str = "auto", progress: bool = True) -> Run:
    """Synthesise the default dataset, train ERM, run the attention stage and pick images to annotate.

    Every stage reuses what an earlier demo already computed, so running it twice costs seconds.
    """
    data = generate(data_dir, SynthSpec(), progress=progress)
    run = Run(run_dir)
    config = run.load_config() if run.exists() else RunConfig()
    config.data.root = resolve_path(data)
    config.device = device
    train_reference(run, config, progress=progress)
    embed_run(run, config, progress=progress)
    rows = sample_run(run, config, progress=progress)
    print(f"demo: {len(rows)} images chosen for annotation; overlays in {run.overlay_dir(config.sample.round)}")
    return run
