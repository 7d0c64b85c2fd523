"""Architectures: output shapes, parameter counts, norms, per-sample gradients under vmap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from demem_ext.training.models import (
    MODELS,
    ResNet18,
    SmallCNN,
    WideResNet,
    build_model,
    has_batchnorm,
    norm_layer,
)


@pytest.mark.parametrize("norm", ["none", "group", "batch"])
def test_cnn_shapes_and_size(norm):
    model = SmallCNN(num_classes=10, in_channels=1, norm=norm)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert 20_000 <= sum(p.numel() for p in model.parameters()) <= 60_000
    assert SmallCNN(num_classes=7, in_channels=3, norm=norm)(torch.rand(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_resnet18_shape(norm):
    model = ResNet18(num_classes=100, in_channels=3, norm=norm)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_small_wideresnet_shape(norm):
    model = WideResNet(depth=10, widen_factor=2, num_classes=10, in_channels=3, norm=norm)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "count"),
    [("resnet18", 11_173_962), ("wrn28-10", 36_479_194), ("wrn34-10", 46_160_474)],
)
def test_reference_parameter_counts(name, count):
    """The published sizes of CIFAR-10 ResNet-18 and WRN-28-10 / 34-10 (10 classes)."""
    model = build_model(name, num_classes=10, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == count


def test_build_model_defaults_and_errors():
    assert isinstance(build_model("cnn", 10, 1), SmallCNN)
    assert not has_batchnorm(build_model("cnn", 10, 1))
    assert has_batchnorm(build_model("resnet18", 10, 3))
    assert not has_batchnorm(build_model("resnet18", 10, 3, norm="group"))
    assert has_batchnorm(build_model("cnn", 10, 1, norm="batch"))
    assert set(MODELS) == {"cnn", "resnet18", "wrn28-10", "wrn34-10"}
    with pytest.raises(ValueError, match="choose one of.*cnn.*resnet18.*wrn28-10.*wrn34-10"):
        build_model("vgg16", 10, 3)
    with pytest.raises(ValueError, match="norm"):
        build_model("resnet18", 10, 3, norm="none")
    with pytest.raises(ValueError, match="norm"):
        build_model("cnn", 10, 1, norm="layer")
    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=12)


def test_has_batchnorm_variants():
    assert has_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    assert not has_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2)))


@pytest.mark.parametrize(("channels", "groups"), [(16, 16), (64, 32), (160, 32), (24, 8)])
def test_group_norm_groups_divide_channels(channels, groups):
    layer = norm_layer("group", channels)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == groups


@pytest.mark.parametrize(
    "make",
    [lambda: SmallCNN(norm="group"), lambda: WideResNet(depth=10, widen_factor=1, norm="group")],
    ids=["cnn", "wrn10-1"],
)
def test_group_norm_per_sample_grads_under_vmap(make):
    torch.manual_seed(0)
    model = make()
    shape = (1, 8, 8) if isinstance(model, SmallCNN) else (3, 32, 32)
    x, y = torch.rand(3, *shape), torch.tensor([0, 3, 9])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-4, atol=1e-6)
