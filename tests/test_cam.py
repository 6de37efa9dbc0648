"""The closed-form GradCAM equals pytorch-grad-cam's; library methods and the attention maths are right."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.attention import aiou, attention_vectors
from pipeline.model.cam import (
    AttentionBatch,
    ClosedFormGradCAM,
    LibraryCAM,
    make_extractor,
    normalize_cams,
    upsample_cams,
)
from pipeline.model.networks import build_model


@pytest.mark.parametrize("arch, size", [("resnet18", 96), ("resnet50", 64), ("smallcnn", 48)])
def test_closed_form_equals_pytorch_grad_cam(arch: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3).eval()
    images = torch.randn(4, 3, size, size)
    targets = torch.tensor([0, 2, 1, 2])
    ours = ClosedFormGradCAM(model)(images, targets)
    library = LibraryCAM(model, "gradcam").full_resolution(images, targets)
    assert library.shape == (4, size, size)
    assert (upsample_cams(ours.cams, size) - library).abs().max().item() <= 1e-4
    # and its logits are the model's own
    with torch.no_grad():
        assert torch.allclose(ours.logits, model(images), rtol=1e-4, atol=1e-4)


def test_make_extractor_uses_closed_form_only_for_gradcam() -> None:
    model = build_model("smallcnn", 2)
    assert isinstance(make_extractor(model, "gradcam"), ClosedFormGradCAM)
    assert isinstance(make_extractor(model, "gradcam++"), LibraryCAM)


@pytest.mark.parametrize("method", ["gradcam++", "eigencam", "layercam"])
def test_library_methods_give_normalised_low_resolution_maps(method: str) -> None:
    torch.manual_seed(1)
    model = build_model("smallcnn", 2).eval()
    batch = LibraryCAM(model, method)(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 1]))
    assert batch.cams.shape == (3, 4, 4) and batch.activations.shape[2:] == (4, 4)
    assert batch.cams.min() >= 0 and batch.cams.max() <= 1 + 1e-6
    assert torch.allclose(batch.cams.flatten(1).max(1).values, torch.ones(3), atol=1e-5)


def test_normalize_matches_library_scaling() -> None:
    cams = torch.tensor([[[1.0, 3.0], [2.0, 5.0]]])
    expected = (cams - 1.0) / (1e-7 + 4.0)
    assert torch.allclose(normalize_cams(cams), expected)


def test_aiou_counts_high_attention_inside_the_mask() -> None:
    cam = torch.zeros(3, 4, 4)
    cam[:, 0, 0] = 1.0
    cam[:, 0, 1] = 0.9
    cam[:, 3, 3] = 0.5  # below the threshold: ignored
    masks = torch.zeros(3, 4, 4)
    masks[0, 0, :2] = 1  # both hot pixels on the object
    masks[1, 0, 0] = 1  # one of them
    # masks[2]: none
    result = aiou(cam, masks, threshold=0.8)
    assert torch.allclose(result, torch.tensor([1.0, 1.0 / 1.9, 0.0]))
    assert aiou(torch.zeros(1, 4, 4), masks[:1], 0.8).item() == 0.0  # no attention at all


def test_attention_and_reverse_vectors_split_the_pooled_features() -> None:
    torch.manual_seed(2)
    activations = torch.rand(2, 5, 3, 3)
    cams = torch.rand(2, 3, 3)
    features = activations.mean(dim=(2, 3))
    attended, ignored = attention_vectors(AttentionBatch(activations, features, torch.zeros(2, 2), cams))
    assert torch.allclose(attended + ignored, activations.mean(dim=(2, 3)), atol=1e-6)
    only_corner = torch.zeros(2, 3, 3)
    only_corner[:, 0, 0] = 1.0
    attended, ignored = attention_vectors(AttentionBatch(activations, features, torch.zeros(2, 2), only_corner))
    assert torch.allclose(attended, activations[:, :, 0, 0] / 9)
    expected_ignored = (activations * (1 - only_corner[:, None])).mean(dim=(2, 3))
    assert torch.allclose(ignored, expected_ignored, atol=1e-6)
