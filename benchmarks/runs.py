"""The run every benchmark starts from: a synthetic dataset, its ERM model and the attention stage.

Benchmarks import it as a sibling module (``python benchmarks/<name>.py`` puts this folder on the path).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import RunConfig, resolve_path
from pipeline.core.errors import PipelineError
from pipeline.core.run import Run
from pipeline.core.synth import SynthSpec, generate
from pipeline.model.embed import embed_run
from pipeline.model.train import train_reference


def attention_run(run_dir: Path, data_dir: Path, spec: SynthSpec, epochs: int | None = None,
                  train_seed: int | None = None) -> Run:
    """``spec``'s dataset, an ERM model and its attention (PCA embedding), each reused when already there.

    The run starts from its saved config when it has one, else from the defaults; only the data, the PCA
    embedding and the given ``epochs`` / ``train_seed`` are set, so a benchmark measures the defaults.
    """
    run = Run(run_dir)
    try:
        data = generate(data_dir, spec, progress=False)
        config = run.load_config() if run.exists() else RunConfig()
        config.data.root = resolve_path(data)
        if epochs is not None:
            config.train.epochs = epochs
        if train_seed is not None:
            config.train.seed = train_seed
        train_reference(run, config, progress=False)
        config = run.load_config()
        config.embed.embedding = "pca"
        embed_run(run, config, progress=False)
    except PipelineError as exc:
        raise SystemExit(f"pipeline failed for {run.root}: {exc}") from exc
    return run
