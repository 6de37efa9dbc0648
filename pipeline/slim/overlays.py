"""What an annotator looks at: the image, its GradCAM overlay, and where the model looked hardest.

One PNG per image with three panels side by side. Small images are enlarged so the panels stay legible in a
browser (Label Studio shows them at their own size).

The map is scaled by the attention stage's own torch code and coloured by pytorch-grad-cam; both are imported
when a picture is made, not with this module, so that the Label Studio commands and the stages that only read
the attention file start in a second and without torch's ~0.7 GB of libraries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.core.data import load_rgb
from pipeline.core.io import atomic_write

MIN_DISPLAY_SIDE = 224
GAP = 6
VIEWS = ("overview", "image", "attention")


def full_cam(low_res_cam: np.ndarray, size: int) -> np.ndarray:
    """A stored low-resolution map at ``size x size``, scaled exactly as the attention stage scales it."""
    import torch  # see the module's docstring

    from pipeline.model.cam import upsample_cams

    return upsample_cams(torch.from_numpy(low_res_cam.astype(np.float32))[None], size)[0].numpy()


def panels(rgb: np.ndarray, cam: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Original, GradCAM overlay (pytorch-grad-cam's colouring), and the thresholded view (rest dimmed)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image  # see the module's docstring

    overlay = show_cam_on_image(rgb, cam, use_rgb=True, image_weight=0.5)
    hot = (cam >= threshold)[..., None]
    dimmed = rgb.mean(axis=2, keepdims=True) * 0.25
    top = np.where(hot, rgb, dimmed)
    return [(rgb * 255).astype(np.uint8), overlay, (top * 255).astype(np.uint8)]


def _strip(views: list[tuple[np.ndarray, str]], titled: bool = True) -> Image.Image:
    """Panels side by side, each with a small title above it (Label Studio's config titles its own)."""
    side, top = views[0][0].shape[0], 18 if titled else 0
    canvas = Image.new("RGB", (len(views) * side + (len(views) - 1) * GAP, side + top), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(views):
        x = i * (side + GAP)
        canvas.paste(Image.fromarray(panel), (x, top))
        if titled:
            draw.text((x + 4, 3), title, fill="black")
    return canvas


def write_overlays(image_path: Path, low_res_cam: np.ndarray, threshold: float, targets: dict[str, Path]) -> None:
    """Write the views of one image (atomically) to ``targets[kind]``.

    ``overview``: image | GradCAM | thresholded, for people browsing a run. ``image`` and ``attention``
    (GradCAM | thresholded): the two pictures of a Label Studio task; boxes are drawn on ``image``.
    """
    with Image.open(image_path) as probe:
        side = max(max(probe.size), MIN_DISPLAY_SIDE)
    rgb = load_rgb(image_path, side)
    original, overlay, hot = panels(rgb, full_cam(low_res_cam, side), threshold)
    hot_title = f"CAM >= {threshold:g}"
    pictures = {
        "overview": _strip([(original, "image"), (overlay, "GradCAM"), (hot, hot_title)]),
        "image": Image.fromarray(original),
        "attention": _strip([(overlay, "GradCAM"), (hot, hot_title)], titled=False),
    }
    for kind, picture in pictures.items():
        atomic_write(targets[kind], lambda handle, picture=picture: picture.save(handle, format="PNG"))
