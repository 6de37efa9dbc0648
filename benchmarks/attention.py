"""Throughput of the attention stage against a plain forward pass and against pytorch-grad-cam.

One run, one model, one set of images, four measurements (images per second):

1. ``forward``: ``model(images)`` under ``torch.no_grad`` with the pipeline's inference precision (bf16
   autocast on CUDA, fp32 on CPU, as :func:`pipeline.model.evaluate.predict` runs it). The ceiling: the
   attention stage cannot be cheaper than the forward pass it is built on.
2. ``attention``: the real stage code, :func:`pipeline.model.attention.compute_attention` with
   ``cam="gradcam"`` (the closed-form path), masks included, so AIoU is computed too.
3. ``gradcam_lib``: pytorch-grad-cam's ``GradCAM`` on ``model.target_layer``, batched, one
   ``ClassifierOutputTarget`` per image (through :meth:`pipeline.model.cam.LibraryCAM.full_resolution`).
4. ``reference_loop``: how the original SLIM code processed images: batch size 1, pytorch-grad-cam's
   ``GradCAM``, and one overlay PNG (``show_cam_on_image``, written with PIL) per image. It is slow, so it
   runs on a prefix of the images (``--reference-images``); images/s is per image, so the rates compare.

Why the speed-up should exist: for a global-average-pool + linear head, GradCAM's weights are the head's
weights, so the stage needs one no-grad forward pass and no backward pass, and it writes no files.

The model is randomly initialised (:func:`pipeline.model.networks.build_model`; nothing is downloaded):
throughput does not depend on the weights. Images come from ``--data DIR`` (its training split) or from a
synthetic dataset generated once into ``bench-out/``. All batches are loaded once through
:func:`pipeline.model.loaders.make_loader` (with masks) and kept in memory, on the device, before anything is
timed: data loading is excluded from all four measurements alike, so the comparison is about compute.

Timing is built for shared machines, whose speed drifts over seconds to minutes (on a small cloud VM, 2-5x).
The work is cut into chunks (one batch; for the reference loop, its images split into as many chunks as
there are batches), and the methods take turns chunk by chunk, in rotating order, for ``--rounds`` rounds, so
every method sees the same machine. A method's rate is its median seconds per image over its chunks, which a
stall during one chunk does not move. (The attention stage is called once per chunk: the same code, its
per-call set-up included.) Each method runs one warm-up chunk first; on CUDA the clock is read only after
``torch.cuda.synchronize()``. The JSON also keeps the plain rate (all images over all time) and the spread of
the per-chunk rates.

**The ceiling.** Beside the four, the same turns time an fp32 matrix product (``--gemm-size`` square, the
best-case kernel of this CPU's library), and a ``FlopCounterMode`` count gives the forward pass's
multiply-adds per image. Their quotient is how many images per second the stage could reach if its whole
forward pass ran at matrix-product speed; divided by the reference loop's rate, it is the highest
attention / reference ratio this machine allows (``ceiling_over_reference_loop``), measured in the same run.

Run from the repository root::

    python benchmarks/attention.py --out bench-out/attention.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from machine import describe
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image

from pipeline.core.attention_arrays import AttentionArrays
from pipeline.core.data import IMAGENET_MEAN, IMAGENET_STD, TRAIN, load_dataset
from pipeline.core.errors import PipelineError
from pipeline.core.synth import SynthSpec, generate
from pipeline.model.attention import compute_attention
from pipeline.model.cam import LibraryCAM, make_extractor
from pipeline.model.loaders import make_loader
from pipeline.model.networks import Classifier, build_model, inference_backbone, native_bf16, resolve_device

CACHE_ROOT = Path("bench-out")
CAM_THRESHOLD = 0.8  # "looked hardest" level for AIoU, the stage's default
BASELINES = ("forward", "gradcam_lib", "reference_loop")
# attention_ips / <baseline>_ips must reach these; set for CPU, ResNet-18, 224 px
TARGETS = {"forward": 0.8, "gradcam_lib": 4.0, "reference_loop": 10.0}

PRODUCTS_PER_CHUNK = 4  # matrix products per timed chunk: about as long as a batch of the stage
PRODUCT = (torch.zeros(1),)  # a chunk item that count_images counts as one (one matrix product)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # images, labels, indices, masks
Runner = Callable[[Sequence[Batch]], object]  # processes every batch it is given
Chunk = Sequence[Batch]  # the unit that is timed


class PreloadedLoader:
    """What :func:`compute_attention` uses of a DataLoader (iteration, ``len(.dataset)``), in memory."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        self.batches = list(batches)
        self.dataset = range(count_images(self.batches))

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def count_images(batches: Sequence[Batch]) -> int:
    return sum(len(batch[0]) for batch in batches)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18", choices=("smallcnn", "resnet18", "resnet50"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reference-images", type=int, default=64,
                        help="images for the batch-1 reference loop (a prefix of the others; it is slow)")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the images per method")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the attention stage's precision, as `embed --precision` (auto: bf16 where native)")
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset folder (its training split); default: a generated synthetic one")
    parser.add_argument("--gemm-size", type=int, default=1024,
                        help="side of the square fp32 matrix product timed as the CPU's compute ceiling")
    parser.add_argument("--out", type=Path, default=CACHE_ROOT / "attention.json")
    args = parser.parse_args(argv)
    for name in ("image_size", "n_images", "batch_size", "reference_images", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def dataset_root(data: Path | None, image_size: int, n_images: int) -> Path:
    """``data`` itself, or a synthetic dataset of ``n_images`` training images (generated once, reused)."""
    if data is not None:
        return data
    spec = SynthSpec(n_train=n_images, n_val=2, n_test=2, image_size=image_size)
    return generate(CACHE_ROOT / f"synth-{image_size}-{n_images}", spec, progress=False)


def preload(root: Path, image_size: int, n_images: int, batch_size: int,
            device: torch.device) -> tuple[list[Batch], int]:
    """The first ``n_images`` training images as batches on ``device`` (indices stay on the CPU).

    Also returns the class count, which sizes the model's head.
    """
    image_set = load_dataset(root)
    samples = image_set.split(TRAIN)[:n_images]
    loader = make_loader(image_set, samples, image_size, batch_size, workers=0, with_masks=True)
    batches = [(images.to(device), labels.to(device), index, masks.to(device))
               for images, labels, index, masks in loader]
    return batches, image_set.num_classes


def single_images(batches: Sequence[Batch], limit: int) -> list[Batch]:
    """The first ``limit`` images as batches of one."""
    singles = [(images[i:i + 1], labels[i:i + 1], index[i:i + 1], masks[i:i + 1])
               for images, labels, index, masks in batches for i in range(len(images))]
    return singles[:limit]


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """A normalised CHW image back to the HWC float32 [0, 1] array an overlay is drawn on."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).cpu().numpy().astype(np.float32)


def forward_only(model: Classifier, device: torch.device) -> Runner:
    @torch.no_grad()
    def run(batches: Sequence[Batch]) -> None:
        for images, *_ in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model(images)
    return run


def attention_stage(model: Classifier, device: torch.device, image_size: int, bf16: bool) -> Runner:
    """The stage as ``embed`` runs it: one extractor (set up once per run), then the streamed loop."""
    extractor = make_extractor(model, "gradcam", bf16=bf16)

    def run(batches: Sequence[Batch]) -> AttentionArrays:
        return compute_attention(extractor, PreloadedLoader(batches), device, CAM_THRESHOLD, image_size,
                                 progress=False)
    return run


@contextmanager
def library_gradcam(model: Classifier) -> Iterator[LibraryCAM]:
    """pytorch-grad-cam's GradCAM; its hooks come off on exit, so they never slow the other measurements."""
    cam = LibraryCAM(model, "gradcam")
    try:
        yield cam
    finally:
        cam.cam.activations_and_grads.release()


def gradcam_batched(model: Classifier) -> Runner:
    def run(batches: Sequence[Batch]) -> None:
        with library_gradcam(model) as cam:
            for images, labels, _, _ in batches:
                cam.full_resolution(images, labels)
    return run


def reference_loop(model: Classifier, rgbs: dict[int, np.ndarray], out_dir: Path) -> Runner:
    """SLIM's original per-image loop: GradCAM on one image, then its overlay PNG (``rgbs`` by index)."""
    def run(singles: Sequence[Batch]) -> None:
        with library_gradcam(model) as cam:
            for image, label, index, _ in singles:
                grayscale = cam.full_resolution(image, label)[0].cpu().numpy()
                overlay = show_cam_on_image(rgbs[int(index)], grayscale, use_rgb=True)
                Image.fromarray(overlay).save(out_dir / f"{int(index):05d}.png")
    return run


def matrix_product(size: int, device: torch.device) -> tuple[Runner, int]:
    """A ``size`` x ``size`` fp32 matrix product per chunk, and its floating-point operations (2 per
    multiply-add): the fastest work this device's math library does, the ceiling for a convolution network."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)

    def run(chunk: Sequence[object]) -> None:
        for _ in chunk:
            torch.mm(a, b)
    return run, 2 * size ** 3


def forward_flops(model: Classifier, image: torch.Tensor) -> int:
    """Floating-point operations of one image's forward pass through the stage's inference backbone."""
    from torch.utils.flop_counter import FlopCounterMode

    backbone = inference_backbone(model.backbone)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone(image.contiguous(memory_format=torch.channels_last))
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run: Runner, chunk: Chunk, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run(chunk)
    synchronize(device)
    return time.perf_counter() - start


def time_chunks(methods: dict[str, tuple[Runner, list[Chunk]]], rounds: int,
                device: torch.device) -> dict[str, list[tuple[int, float]]]:
    """(images, seconds) of every chunk of every method, the methods taking turns chunk by chunk."""
    for run, chunks in methods.values():
        run(chunks[0][:1])  # warm-up: one batch, or one image of the reference loop
    names = list(methods)
    timings: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    turns = max(len(chunks) for _, chunks in methods.values())
    for turn in range(rounds * turns):
        shift = turn % len(names)
        for name in names[shift:] + names[:shift]:
            run, chunks = methods[name]
            if turn % turns < len(chunks):
                chunk = chunks[turn % turns]
                timings[name].append((count_images(chunk), seconds(run, chunk, device)))
    return timings


def rates(timings: list[tuple[int, float]]) -> dict[str, float | int]:
    """Images/s: from the median seconds per image (robust), over all time (plain), and the spread."""
    per_chunk = [images / elapsed for images, elapsed in timings]
    return {"median": 1.0 / statistics.median(elapsed / images for images, elapsed in timings),
            "plain": sum(images for images, _ in timings) / sum(elapsed for _, elapsed in timings),
            "min": min(per_chunk), "max": max(per_chunk), "chunks": len(timings)}


def benchmark(args: argparse.Namespace) -> dict[str, object]:
    device = resolve_device(args.device)
    torch.manual_seed(0)
    root = dataset_root(args.data, args.image_size, args.n_images)
    batches, num_classes = preload(root, args.image_size, args.n_images, args.batch_size, device)
    singles = single_images(batches, args.reference_images)
    rgbs = {int(index): to_rgb(image[0]) for image, _, index, _ in singles}
    model = build_model(args.arch, num_classes).to(device).eval()
    # the stage gets its own copy (same weights), so nothing it does to a model can speed up the baselines
    bf16 = args.precision == "bf16" or (args.precision == "auto" and native_bf16(device))
    attention = attention_stage(copy.deepcopy(model), device, args.image_size, bf16)
    per_batch = [[batch] for batch in batches]
    per_chunk = -(-len(singles) // len(batches))  # as many reference chunks as batches: one per turn
    reference_chunks = [singles[i:i + per_chunk] for i in range(0, len(singles), per_chunk)]
    gemm, gemm_flops = matrix_product(args.gemm_size, device)
    with tempfile.TemporaryDirectory(prefix="slim-bench-") as tmp:
        timings = time_chunks({
            "forward": (forward_only(model, device), per_batch),
            "attention": (attention, per_batch),
            "gradcam_lib": (gradcam_batched(model), per_batch),
            "reference_loop": (reference_loop(model, rgbs, Path(tmp)), reference_chunks),
            "gemm": (gemm, [[PRODUCT] * PRODUCTS_PER_CHUNK] * len(batches)),
        }, args.rounds, device)
        pngs_written = len(list(Path(tmp).glob("*.png")))
    computes_aiou = attention(batches[:1]).aiou is not None

    stats = {name: rates(chunk_timings) for name, chunk_timings in timings.items()}
    gemm_gflops = stats.pop("gemm")["median"] * gemm_flops / 1e9
    ips = {f"{name}_ips": stat["median"] for name, stat in stats.items()}
    ratios = {f"attention_over_{name}": ips["attention_ips"] / ips[f"{name}_ips"] for name in BASELINES}
    flops = forward_flops(model, batches[0][0][:1])
    return {
        **ips,
        **ratios,
        "forward_gflop_per_image": flops / 1e9,
        "gemm_gflops": gemm_gflops,
        "attention_gflops": ips["attention_ips"] * flops / 1e9,
        "attention_share_of_gemm": ips["attention_ips"] * flops / 1e9 / gemm_gflops,
        "ceiling_over_reference_loop": gemm_gflops * 1e9 / flops / ips["reference_loop_ips"],
        "targets": {f"attention_over_{name}": target for name, target in TARGETS.items()},
        "targets_met": {f"attention_over_{name}": ratios[f"attention_over_{name}"] >= target
                        for name, target in TARGETS.items()},
        "ips_stats": stats,
        "timing": f"median s/image over chunks (a batch, or {per_chunk} reference-loop images), methods "
                  f"taking turns chunk by chunk, {args.rounds} rounds, one warm-up chunk each",
        "device": str(device),
        "arch": args.arch,
        "image_size": args.image_size,
        "n_images": count_images(batches),
        "batch_size": args.batch_size,
        "reference_images": len(singles),
        "reference_pngs_written": pngs_written,
        "attention_computes_aiou": computes_aiou,
        "data": str(root),
        "data_loading": "excluded (batches preloaded)",
        "forward_precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "attention_precision": "bf16 autocast" if bf16 else "fp32",
        **describe(device),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = benchmark(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
