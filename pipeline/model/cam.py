"""Class activation maps: closed-form GradCAM in the forward pass, pytorch-grad-cam for everything else.

Every extractor answers the same question for a batch: activations A at the last conv block, logits, and the
low-resolution CAM for the requested classes, min-max normalised to [0, 1] per image exactly as
pytorch-grad-cam's ``scale_cam_image`` does (subtract the min, divide by ``max + 1e-7``).

For a global-average-pool + linear head, GradCAM's channel weights are ``d y_c / d A_k`` averaged over space,
which is ``W[c, k] / (h * w)`` for every image: no backward pass is needed, and the map costs one weighted
sum over channels of activations the forward pass computed anyway. :func:`make_extractor` picks that path
for ``gradcam`` and hands every other method to pytorch-grad-cam.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.core.errors import PipelineError
from pipeline.model.networks import Classifier, inference_backbone

EPS = 1e-7  # pytorch-grad-cam's epsilon in scale_cam_image


@dataclass
class AttentionBatch:
    activations: torch.Tensor  # (B, K, h, w), float32
    features: torch.Tensor  # (B, K): the pooled activations the head sees
    logits: torch.Tensor  # (B, C), float32
    cams: torch.Tensor  # (B, h, w) in [0, 1]


def normalize_cams(cams: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to [0, 1], as pytorch-grad-cam scales its maps."""
    flat = cams.flatten(1)
    shifted = flat - flat.min(dim=1, keepdim=True).values
    return (shifted / (EPS + shifted.max(dim=1, keepdim=True).values)).view_as(cams)


def upsample_cams(cams: torch.Tensor, size: int) -> torch.Tensor:
    """Low-resolution maps to ``size x size``, as pytorch-grad-cam finishes them.

    Bilinear with half-pixel centres (what cv2.resize does), then min-max again: the library re-scales after
    resizing, and bilinear samples rarely land exactly on the low-resolution extremes.
    """
    full = F.interpolate(cams[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return normalize_cams(full)


class AttentionExtractor(ABC):
    """Computes an :class:`AttentionBatch` for images and target classes."""

    def __init__(self, model: Classifier) -> None:
        self.model = model.eval()

    @abstractmethod
    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> AttentionBatch: ...


class ClosedFormGradCAM(AttentionExtractor):
    """GradCAM for a GAP + linear head, from the head's weights, inside one no-grad forward pass.

    The forward runs on an inference copy of the backbone (BN folded, channels-last); ``bf16`` autocasts it
    (the default on CUDA; on CPU only when asked, since maps then differ from fp32 by up to ~0.05).
    """

    def __init__(self, model: Classifier, bf16: bool = False) -> None:
        super().__init__(model)
        self.backbone = inference_backbone(model.backbone)
        self.bf16 = bf16

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> AttentionBatch:
        device = images.device
        self.backbone.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            activations = self.backbone(images.contiguous(memory_format=torch.channels_last))
        activations = activations.float().contiguous()
        features = activations.mean(dim=(2, 3))
        logits = self.model.head(features)
        weights = self.model.head.weight[targets] / (activations.shape[2] * activations.shape[3])
        cams = torch.relu(torch.einsum("bk,bkhw->bhw", weights, activations))
        return AttentionBatch(activations, features, logits, normalize_cams(cams))


class LibraryCAM(AttentionExtractor):
    """Any pytorch-grad-cam method; its full-resolution map is pooled back to the activation grid."""

    def __init__(self, model: Classifier, method: str) -> None:
        super().__init__(model)
        from pytorch_grad_cam import (
            EigenCAM,
            GradCAM,
            GradCAMPlusPlus,
            HiResCAM,
            LayerCAM,
            ScoreCAM,
            XGradCAM,
        )

        methods = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "eigencam": EigenCAM,
                   "layercam": LayerCAM, "scorecam": ScoreCAM, "hirescam": HiResCAM}
        if method not in methods:
            raise PipelineError(f"unknown --cam {method!r}; choose one of {', '.join(methods)}")
        self.cam = methods[method](model=model, target_layers=[model.target_layer])

    def full_resolution(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The library's own output: (B, H, W) maps at input size, normalised by the library."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        maps = self.cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        return torch.from_numpy(maps).to(images.device)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> AttentionBatch:
        full = self.full_resolution(images, targets)
        with torch.no_grad():
            activations = self.model.backbone(images).float()
            features = activations.mean(dim=(2, 3))
            logits = self.model.head(features)
        low = F.adaptive_avg_pool2d(full[:, None].float(), activations.shape[2:])[:, 0]
        return AttentionBatch(activations, features, logits, normalize_cams(low))


def make_extractor(model: Classifier, method: str, bf16: bool = False) -> AttentionExtractor:
    """Closed form where it is exact (GradCAM on our GAP + linear head), the library otherwise."""
    if method == "gradcam" and isinstance(model, Classifier) and isinstance(model.head, torch.nn.Linear):
        return ClosedFormGradCAM(model, bf16=bf16)
    return LibraryCAM(model, method)
