"""The attention stage over a trained run: what it stores, that it streams, that re-runs are reused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.cli import main
from pipeline.core.attention_arrays import (
    MAP_MIN_BYTES,
    AttentionArrays,
    mapped_npz,
    read_rows,
    representation_of,
    save_streamed,
)
from pipeline.core.data import TRAIN, load_dataset
from pipeline.model import embed as embed_module
from pipeline.model.attention import compute_attention
from pipeline.model.cam import make_extractor
from pipeline.model.embed import embed_2d, embed_2d_streamed
from pipeline.model.evaluate import predict
from pipeline.model.loaders import make_loader
from pipeline.model.networks import load_checkpoint


def test_attention_arrays_cover_every_training_image(trained_run: Path, tiny_data: Path) -> None:
    arrays = dict(np.load(trained_run / "attention.npz"))
    image_set = load_dataset(tiny_data)
    train = image_set.split(TRAIN)
    n = len(train)
    assert sorted(arrays["index"].tolist()) == [s.index for s in train]
    assert arrays["y"].tolist() == [image_set.samples[i].y for i in arrays["index"]]
    assert arrays["cam"].shape == (n, 4, 4)
    assert arrays["f_att"].shape == arrays["f_rev"].shape == arrays["features"].shape == (n, 128)
    assert arrays["emb_att"].shape == arrays["emb_rev"].shape == (n, 2)
    assert ((arrays["cam"] >= 0) & (arrays["cam"] <= 1)).all()
    assert ((arrays["aiou"] >= 0) & (arrays["aiou"] <= 1)).all()
    assert np.allclose(arrays["f_att"] + arrays["f_rev"], arrays["features"], atol=1e-4)
    model, _ = load_checkpoint(trained_run / "model.pt")
    probs, order = predict(model, make_loader(image_set, train, 32, 50, 0), torch.device("cpu"), progress=False)
    assert order.tolist() == arrays["index"].tolist()
    assert np.array_equal(arrays["pred"], probs.argmax(1))
    assert np.allclose(arrays["confidence"], probs.max(1), atol=1e-5)
    assert (arrays["entropy"] >= 0).all() and (arrays["entropy"] <= np.log(2) + 1e-6).all()


def test_attention_file_is_written_by_field_from_parts_and_read_back_memory_mapped(trained_run: Path,
                                                                                   tmp_path: Path) -> None:
    """``embed`` writes attention.npz from its shards one field at a time; loading maps the large fields in place
    (nothing read until indexed) and gives the same values as reading the whole file; the file is a plain .npz."""
    whole = dict(np.load(trained_run / "attention.npz"))
    loaded = AttentionArrays.load(trained_run / "attention.npz")
    for key, value in whole.items():
        if key != "class_names":
            assert np.array_equal(getattr(loaded, key), value), key
    assert isinstance(loaded.f_att, np.memmap) or whole["f_att"].nbytes < MAP_MIN_BYTES
    big = {"index": np.arange(3000), "f_att": np.random.default_rng(0).normal(size=(3000, 128)).astype(np.float32)}
    parts = [{key: value[start:start + 700] for key, value in big.items()} for start in range(0, 3000, 700)]
    path = tmp_path / "attention.npz"
    save_streamed(path, lambda key: (part[key] for part in parts), parts[0], 3000,
                  {"class_names": np.array(["a", "b"])})
    mapped = mapped_npz(path)
    assert isinstance(mapped["f_att"], np.memmap) and not isinstance(mapped["index"], np.memmap)  # 24 KB: read
    with np.load(path) as plain:
        assert all(np.array_equal(plain[key], big[key]) for key in big) and plain["class_names"].tolist() == ["a", "b"]
    assert np.array_equal(mapped["f_att"], big["f_att"])


def resident_file_kb() -> int:
    """Pages of mapped files this process holds resident (Linux's RssFile)."""
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("RssFile:"))


def test_rows_read_from_the_mapped_file_leave_none_of_its_pages_resident(tmp_path: Path) -> None:
    """A stage sweeping a 10 GB attention file class by class holds the rows it copied, not every page it read."""
    written = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float32, shape=(16384, 1024))
    written[:] = np.arange(16384, dtype=np.float32)[:, None]  # 64 MB: rows spread over the whole file below
    del written
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    rows = np.arange(1, 16384, 2)
    before = resident_file_kb()
    copied = read_rows(mapped, rows)
    representation = representation_of(mapped, mapped, rows)
    assert resident_file_kb() - before < 8 * 1024  # without the release: all 64 MB of the file
    assert np.array_equal(copied[:, 0], rows) and representation.shape == (len(rows), 2048)
    touched = np.asarray(mapped[rows]).sum()
    assert touched > 0 and resident_file_kb() - before > 48 * 1024  # the check can fail: plain indexing keeps them


def test_a_class_read_on_demand_projects_and_clusters_exactly_as_when_built_whole(monkeypatch) -> None:
    """Large classes are projected from rows built as they are read (never the whole 2.3 GB representation of
    CelebA's large class): the rows, the projection and the picks are those of the whole array, bit for bit."""
    from pipeline.slim import clustering
    from pipeline.slim import propagate as propagate_module

    rng = np.random.default_rng(3)
    n = 900
    arrays = AttentionArrays(index=np.arange(n), y=np.arange(n) % 2, pred=np.zeros(n, int), confidence=np.ones(n),
                             entropy=np.zeros(n), features=np.zeros((n, 1)), f_att=rng.normal(size=(n, 24)).astype(np.float32),
                             f_rev=rng.normal(size=(n, 16)).astype(np.float32), cam=np.zeros((n, 2, 2), np.float16),
                             emb_att=rng.normal(size=(n, 2)), emb_rev=rng.normal(size=(n, 2)))
    members = arrays.for_class(1)
    for space in ("vectors", "embedding"):
        lazy, whole = arrays.representation_rows(space, members), arrays.representation(space, members)
        assert lazy.shape == whole.shape and np.array_equal(np.asarray(lazy), whole)
        assert np.array_equal(lazy[10:20], whole[10:20]) and np.array_equal(lazy[np.array([3, 7])], whole[[3, 7]])
    monkeypatch.setattr(propagate_module, "EXACT_PCA_LIMIT", 0)
    monkeypatch.setattr(clustering, "EXACT_KMEANS_LIMIT", 0)
    monkeypatch.setattr(clustering, "PROJECTION_FIT_ROWS", 200)
    monkeypatch.setattr(clustering, "PROJECTION_CHUNK", 130)  # several chunks, the last one short
    lazy, whole = arrays.representation_rows("vectors", members), arrays.representation("vectors", members)
    assert np.array_equal(propagate_module.kernel_space(lazy), propagate_module.kernel_space(whole))
    assert clustering.pick_near_centroids(lazy, 9, seed=0) == clustering.pick_near_centroids(whole, 9, seed=0)


WITHOUT_A_NETWORK = ("pipeline.cli", "pipeline.slim.sample", "pipeline.slim.propagate", "pipeline.slim.curate",
                     "pipeline.slim.weights", "pipeline.labelstudio.push", "pipeline.labelstudio.pull")


def test_commands_that_run_no_network_do_not_load_torch() -> None:
    """torch and pytorch-grad-cam hold ~0.7 GB resident and take seconds to import: at CelebA's size that decides
    whether selection, propagation and curation fit 4 GB, and every command paid it at start-up. Only the stages
    that run a network, and the moment an overlay is drawn, may load them."""
    check = f"import sys, {', '.join(WITHOUT_A_NETWORK)}; print(sorted({{'torch', 'pytorch_grad_cam'}} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
    with_pass = "import sys, pipeline.model.attention; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", with_pass], capture_output=True, text=True, check=True).stdout.strip() == "True"


def test_2d_embedding_of_many_rows_is_fit_on_a_sample_and_applied_to_every_part(monkeypatch) -> None:
    rng = np.random.default_rng(1)
    vectors = np.vstack([3 * np.eye(8)[axis] + rng.normal(0, 0.1, (100, 8)) for axis in (0, 1)]).astype(np.float32)
    parts = lambda: (vectors[start:start + 30] for start in range(0, 200, 30))
    assert np.array_equal(embed_2d_streamed(parts, 200, "pca", 0), embed_2d(vectors, "pca", 0))  # all rows: as before
    monkeypatch.setattr(embed_module, "EMBED_FIT_ROWS", 50)
    coords = embed_2d_streamed(parts, 200, "pca", 0)
    assert coords.shape == (200, 2) and np.isfinite(coords).all()
    gap = np.linalg.norm(coords[:100].mean(0) - coords[100:].mean(0))
    assert gap > 10 * max(coords[:100].std(0).max(), coords[100:].std(0).max())  # the two blobs stay apart


def test_results_do_not_depend_on_batch_size(trained_run: Path, tiny_data: Path) -> None:
    """Streaming in batches of 7 or 64 gives the same rows: nothing depends on what else is in memory."""
    image_set = load_dataset(tiny_data)
    model, _ = load_checkpoint(trained_run / "model.pt")
    results = []
    for batch_size in (7, 64):
        loader = make_loader(image_set, image_set.split(TRAIN), 32, batch_size, 0, with_masks=True)
        extractor = make_extractor(model, "gradcam")
        results.append(compute_attention(extractor, loader, torch.device("cpu"), 0.8, 32, progress=False))
    for key in ("index", "pred", "aiou", "f_att", "cam"):
        assert np.allclose(getattr(results[0], key).astype(np.float64), getattr(results[1], key).astype(np.float64), atol=1e-4), key


def test_bf16_attention_stays_close_to_fp32(trained_run: Path, tiny_data: Path) -> None:
    image_set = load_dataset(tiny_data)
    model, _ = load_checkpoint(trained_run / "model.pt")
    loader = make_loader(image_set, image_set.split(TRAIN), 32, 64, 0, with_masks=True)
    fp32, bf16 = (compute_attention(make_extractor(model, "gradcam", bf16=flag), loader, torch.device("cpu"), 0.8,
                                    32, progress=False) for flag in (False, True))
    assert np.abs(fp32.cam.astype(np.float32) - bf16.cam.astype(np.float32)).mean() < 0.01
    assert np.abs(fp32.confidence - bf16.confidence).max() < 0.02


def test_embed_again_reuses_and_force_recomputes(trained_run: Path, capsys) -> None:
    stamp = (trained_run / "attention.npz").stat().st_mtime_ns
    assert main(["embed", "--run", str(trained_run), "--quiet"]) == 0
    assert "reusing" in capsys.readouterr().out
    assert (trained_run / "attention.npz").stat().st_mtime_ns == stamp


def test_library_cam_method_runs_end_to_end(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    assert main(["embed", "--run", str(run), "--cam", "gradcam++", "--embedding", "pca", "--quiet"]) == 0
    arrays = dict(np.load(run / "attention.npz"))
    assert arrays["cam"].shape[1:] == (4, 4) and np.isfinite(arrays["f_att"]).all()


def test_umap_embedding_separates_two_clusters() -> None:
    rng = np.random.default_rng(0)
    vectors = np.vstack([rng.normal(0, 0.05, (40, 8)) + 1, rng.normal(0, 0.05, (40, 8)) - 1])
    vectors[:40, 0] += 3
    coords = embed_2d(vectors, "umap", seed=0)
    assert coords.shape == (80, 2)
    gap = np.linalg.norm(coords[:40].mean(0) - coords[40:].mean(0))
    spread = max(coords[:40].std(0).max(), coords[40:].std(0).max())
    assert gap > 3 * spread


def test_embed_before_train_says_what_to_run(tmp_path: Path, capsys) -> None:
    assert main(["embed", "--run", str(tmp_path / "none"), "--quiet"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_bad_threshold_is_refused(trained_run: Path, capsys) -> None:
    assert main(["embed", "--run", str(trained_run), "--threshold", "1.5", "--quiet"]) == 2
    assert "--threshold must be in (0, 1]" in capsys.readouterr().err
