"""Classifiers split into a convolutional backbone and a global-average-pool + linear head.

Keeping that split explicit is what lets the attention stage compute GradCAM in closed form: for
``logits = W @ mean_ij(A) + b`` the GradCAM channel weights for class c are exactly ``W[c] / (h * w)``.
Nothing here downloads weights: ImageNet weights are used only when they already sit in the torch cache.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write
from pipeline.core.run import reading
from pipeline.model.distributed import current


class Classifier(nn.Module):
    """``backbone`` maps images to activations A (B, K, h, w); ``head`` is a linear layer on their mean."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)

    @property
    def target_layer(self) -> nn.Module:
        """The last conv block: where GradCAM looks (ResNet's ``layer4``)."""
        return self.backbone[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).mean(dim=(2, 3)))


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


def small_cnn_backbone(width: int = 16) -> tuple[nn.Sequential, int]:
    """Four conv blocks, stride 8: a 64 px image keeps an 8x8 attention map (ResNet-18 would keep 2x2)."""
    widths = [width, width * 2, width * 4, width * 8]
    layers: list[nn.Module] = []
    c_in = 3
    for i, c_out in enumerate(widths):
        layers.append(_conv_block(c_in, c_out))
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        c_in = c_out
    return nn.Sequential(*layers), widths[-1]


def resnet_backbone(arch: str, imagenet: bool) -> tuple[nn.Sequential, int]:
    builder, weights_enum = {
        "resnet18": (tv_models.resnet18, tv_models.ResNet18_Weights.IMAGENET1K_V1),
        "resnet50": (tv_models.resnet50, tv_models.ResNet50_Weights.IMAGENET1K_V2),
    }[arch]
    net = builder(weights=None)
    if imagenet:
        net.load_state_dict(_cached_imagenet_state(weights_enum.url))
    backbone = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                             net.layer4)
    return backbone, net.fc.in_features


def _cached_imagenet_state(url: str) -> dict[str, torch.Tensor]:
    """ImageNet weights from the torch cache, or a clear error: this tool never downloads."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not path.exists():
        raise PipelineError(
            f"ImageNet weights are not in the torch cache ({path}); put the file there or pass --weights PATH"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def build_model(arch: str, num_classes: int, imagenet: bool = False) -> Classifier:
    if arch == "smallcnn":
        if imagenet:
            raise PipelineError("--pretrained needs a ResNet (--arch resnet18 or resnet50); smallcnn has no ImageNet weights")
        backbone, features = small_cnn_backbone()
    elif arch in ("resnet18", "resnet50"):
        backbone, features = resnet_backbone(arch, imagenet)
    else:
        raise PipelineError(f"unknown --arch {arch!r}; choose smallcnn, resnet18 or resnet50")
    return Classifier(backbone, features, num_classes)


def load_weights(model: Classifier, path: str | Path) -> None:
    """Start from a local checkpoint: ours (``model.pt``) or a plain torchvision-style state dict."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PipelineError(f"--weights {path} does not exist; pass a local .pt/.pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a bad file raises pickle, struct, zip or runtime errors alike
        raise PipelineError(f"--weights {path} is not a readable torch checkpoint ({exc.__class__.__name__})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith("backbone.") for k in usable):
        raise PipelineError(f"--weights {path} has no tensors that fit --arch; check the architecture")
    model.load_state_dict(usable, strict=False)


def save_checkpoint(model: Classifier, path: Path, meta: dict) -> None:
    """Atomically save weights plus ``meta`` (what is needed to rebuild the model without the config)."""
    atomic_write(path, lambda handle: torch.save({"model": model.state_dict(), "meta": meta}, handle))


def load_checkpoint(path: Path) -> tuple[Classifier, dict]:
    """The model and meta of ``save_checkpoint``; a torn file is the one-line error saying what to re-run."""
    with reading(path):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        model = build_model(meta["arch"], meta["num_classes"])
        model.load_state_dict(blob["model"])
    return model.eval(), meta


def inference_backbone(backbone: nn.Module) -> nn.Module:
    """A faster copy of ``backbone`` for no-grad inference, equal up to float rounding.

    Batch norm is folded into the preceding convolutions (eval statistics) and weights use the channels-last
    layout oneDNN and cuDNN prefer: together about 1.9x a plain fp32 forward of ResNet-18 on CPU. The model
    itself is left untouched, so training and gradient-based CAM methods keep working on it.
    """
    from torch.fx.experimental.optimization import fuse

    fused = fuse(copy.deepcopy(backbone).eval())
    return fused.to(memory_format=torch.channels_last)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs natively here: any CUDA GPU, or a CPU with AVX-512 BF16 or AMX (Linux flags).

    Elsewhere bf16 is emulated and slower than fp32, so ``auto`` precision stays fp32 there.
    """
    if device.type == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error, not a silent fallback.

    Under torchrun each process takes the GPU numbered by its local rank.
    """
    if name not in ("auto", "cpu", "cuda"):
        raise PipelineError(f"unknown --device {name!r}; choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", current().local_rank)
