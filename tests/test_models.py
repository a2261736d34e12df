"""Tests for sfrik_scale.models: backbones, projector specs, SSLModel, SyncBatchNorm, export."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from sfrik_scale import models
from sfrik_scale.models import (
    BACKBONES,
    Projector,
    SSLModel,
    backbone_state_dict_for_torchvision,
    build_backbone,
    build_model,
    convert_sync_batchnorm,
    parse_projector_spec,
    register_backbone,
    remove_classifier_head,
    torchvision_classifier,
)

IMAGES = torch.randn(2, 3, 64, 64)


def _output_width(backbone: nn.Module, images: torch.Tensor = IMAGES) -> int:
    backbone.eval()
    with torch.no_grad():
        out = backbone(images)
    assert out.ndim == 2 and out.shape[0] == images.shape[0]
    return out.shape[1]


# --- backbones -------------------------------------------------------------------------------


def test_resnet18_fc_head_is_replaced_by_identity_and_feature_dim_is_512() -> None:
    backbone, feature_dim = build_backbone("resnet18")
    assert isinstance(backbone.fc, nn.Identity)
    assert backbone.removed_head == "fc"
    assert feature_dim == torchvision_classifier("resnet18").fc.in_features == 512
    assert _output_width(backbone) == feature_dim


def test_mobilenet_v3_small_last_classifier_linear_is_replaced_and_feature_dim_matches_output() -> None:
    backbone, feature_dim = build_backbone("mobilenet_v3_small")
    reference = torchvision_classifier("mobilenet_v3_small")
    assert isinstance(backbone.classifier[-1], nn.Identity)
    # Only the last Linear goes: the hidden Linear-Hardswish before it stays in the backbone.
    assert isinstance(backbone.classifier[0], nn.Linear)
    assert feature_dim == reference.classifier[-1].in_features
    assert _output_width(backbone) == feature_dim


def test_squeezenet_conv_head_is_replaced_and_feature_dim_matches_output() -> None:
    backbone, feature_dim = build_backbone("squeezenet1_1")
    assert backbone.removed_head == "classifier.1"
    assert isinstance(backbone.classifier[1], nn.Identity)
    assert _output_width(backbone) == feature_dim


def test_heads_container_like_vit_has_its_last_linear_removed() -> None:
    class HeadsNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(12, 6)
            self.heads = nn.Sequential()
            self.heads.add_module("head", nn.Linear(6, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.heads(self.body(x.flatten(1)[:, :12]))

    net = HeadsNet()
    assert remove_classifier_head(net) == ("heads.head", 6)
    assert isinstance(net.heads.head, nn.Identity)


def test_feature_dim_is_measured_when_parameterised_layers_follow_the_removed_one() -> None:
    class ScaledConcat(nn.Module):
        """Has a parameter and doubles the width, so in_features of the removed Linear is wrong."""

        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, self.scale * x], dim=1)

    class OddHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(3, 5), ScaledConcat())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.pool(x))

    net = OddHead()
    assert remove_classifier_head(net, probe_image_size=8) == ("head.1", 6)


def test_tiny_cnn_is_registered_and_outputs_its_feature_dim() -> None:
    assert "tiny_cnn" in BACKBONES.names()
    backbone, feature_dim = build_backbone("tiny_cnn")
    assert _output_width(backbone, torch.randn(2, 3, 32, 32)) == feature_dim


def test_unknown_backbone_raises_value_error_listing_valid_names() -> None:
    with pytest.raises(ValueError, match="resnt18") as info:
        build_backbone("resnt18")
    message = str(info.value)
    assert "resnet18" in message and "resnet50" in message and "tiny_cnn" in message


def test_registry_refuses_a_duplicate_backbone_name() -> None:
    with pytest.raises(ValueError, match="tiny_cnn"):
        BACKBONES.register("tiny_cnn")(lambda: (nn.Identity(), 1))


def test_register_backbone_refuses_a_torchvision_name() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        register_backbone("resnet18")
    assert "resnet18" not in BACKBONES


# --- projector -------------------------------------------------------------------------------


def test_projector_has_linear_batchnorm_relu_blocks_then_a_bias_free_linear() -> None:
    projector = Projector(16, "32-24-8")
    kinds = [type(m) for m in projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    widths = [(m.in_features, m.out_features) for m in projector if isinstance(m, nn.Linear)]
    assert widths == [(16, 32), (32, 24), (24, 8)]
    assert projector[-1].bias is None
    assert all(m.bias is not None for m in list(projector)[:-1] if isinstance(m, nn.Linear))
    assert projector.out_dim == 8


def test_projector_with_a_single_width_is_one_bias_free_linear() -> None:
    projector = Projector(16, "8")
    assert len(projector) == 1 and isinstance(projector[0], nn.Linear) and projector[0].bias is None
    assert projector.out_dim == 8


def test_parse_projector_spec_reads_widths() -> None:
    assert parse_projector_spec("8192-8192-32768") == [8192, 8192, 32768]
    assert parse_projector_spec(" 64 - 2 ") == [64, 2]


@pytest.mark.parametrize(
    "spec", ["", "   ", "abc", "8192-x", "8192--8192", "8192-", "-8", "8192--1", "1.5", "64-0-8", "64-1", "0"]
)
def test_bad_projector_spec_raises_value_error_naming_the_spec(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_projector_spec(spec)
    assert repr(spec) in str(info.value)
    with pytest.raises(ValueError):
        Projector(16, spec)


# --- SSLModel ----------------------------------------------------------------------------------


def test_sslmodel_forward_returns_batch_by_q() -> None:
    model = build_model("tiny_cnn", "32-16")
    x = torch.randn(4, 3, 32, 32)
    assert model.q == 16
    assert model(x).shape == (4, 16)
    assert model.features(x).shape == (4, model.feature_dim)


def test_sslmodel_rejects_backbone_output_of_wrong_width() -> None:
    model = SSLModel(nn.Flatten(), feature_dim=7, projector_spec="8-4")
    with pytest.raises(ValueError, match=r"\(2, 12\)"):
        model(torch.randn(2, 3, 2, 2))


def test_models_module_imports_neither_deepspeed_nor_torch_distributed() -> None:
    tree = ast.parse(Path(models.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not {m for m in imported if m.startswith(("deepspeed", "torch.distributed"))}


# --- SyncBatchNorm -----------------------------------------------------------------------------


def test_convert_sync_batchnorm_converts_every_batchnorm() -> None:
    model = build_model("tiny_cnn", "32-32-16")
    n_batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert n_batchnorms == 5  # 3 in the backbone, 2 in the projector
    converted = convert_sync_batchnorm(model)
    kinds = [type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [nn.SyncBatchNorm] * n_batchnorms


def test_convert_sync_batchnorm_keeps_state_dict_keys() -> None:
    model = build_model("tiny_cnn", "32-16")
    keys = list(model.state_dict())
    assert list(convert_sync_batchnorm(model).state_dict()) == keys


# --- export to torchvision ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_backbone_state_dict_loads_into_torchvision_model_with_only_the_head_missing(name: str) -> None:
    model = build_model(name, "16-8")
    state = backbone_state_dict_for_torchvision(model)
    reference = torchvision_classifier(name)
    result = reference.load_state_dict(state, strict=False)
    head = model.backbone.removed_head
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(k for k in reference.state_dict() if k.startswith(head + "."))
    assert result.missing_keys  # the head really is missing
    loaded = reference.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_backbone_state_dict_from_a_wrapped_model_state_dict_strips_prefixes() -> None:
    model = build_model("tiny_cnn", "16-8")
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    assert list(backbone_state_dict_for_torchvision(wrapped)) == list(model.backbone.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_batchnorm_matches_an_fp32_reference_and_keeps_low_precision_inputs(dtype):
    import copy

    from sfrik_scale.models import batchnorm_in_fp32

    torch.manual_seed(0)
    ref = nn.BatchNorm2d(6)
    nn.init.uniform_(ref.weight, 0.5, 1.5)
    nn.init.uniform_(ref.bias, -0.5, 0.5)
    low = batchnorm_in_fp32(copy.deepcopy(ref))
    low.weight.data, low.bias.data = low.weight.data.to(dtype), low.bias.data.to(dtype)  # as DeepSpeed casts
    x = (3 * torch.randn(8, 6, 5, 5) + 1).to(dtype)
    xr, xl = x.float().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(8, 6, 5, 5).to(dtype)
    for _ in range(2):  # two forwards, as two views: running statistics updated twice
        out_r, out_l = ref(xr), low(xl)
    saved = out_l.grad_fn.saved_tensors  # kept for backward: the input in its own dtype, no fp32 copy
    assert saved[0].dtype == dtype and saved[0].shape == x.shape
    assert all(t.dim() == 1 for t in saved[1:] if t is not None)
    (out_r * g.float()).sum().backward()
    (out_l.float() * g.float()).sum().backward()
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert out_l.dtype == dtype and xl.grad.dtype == dtype and low.weight.grad.dtype == dtype
    torch.testing.assert_close(out_l.float(), out_r, atol=tol, rtol=tol)
    torch.testing.assert_close(xl.grad.float(), xr.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(low.running_mean, ref.running_mean)
    torch.testing.assert_close(low.running_var, ref.running_var)


def test_small_resnet_keeps_small_images_large_enough_and_reports_its_width() -> None:
    from sfrik_scale.models import SmallResNet

    backbone, feature_dim = build_backbone("small_resnet")
    assert isinstance(backbone, SmallResNet) and feature_dim == 128
    assert backbone.stem[0].kernel_size == (3, 3) and not any(isinstance(m, nn.MaxPool2d) for m in backbone.modules())
    x = torch.randn(2, 3, 32, 32)
    maps = backbone.stages(backbone.stem(x))
    assert maps.shape == (2, 128, 4, 4)  # 32 -> 16 (stem) -> 16 -> 8 -> 4
    assert backbone(x).shape == (2, 128)
    with pytest.raises(ValueError, match="equal length"):
        SmallResNet(widths=(8, 16), blocks=(1,))
