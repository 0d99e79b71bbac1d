"""Encoders: shapes on digits-sized and CIFAR-sized inputs, unit-norm embeddings, DP compatibility."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.encoders import (
    ContrastiveModel,
    ProjectionHead,
    SmallCNN,
    build_encoder,
    make_norm,
)
from common.plugins import builtin_names

SHAPES = [(1, 8, 8), (3, 32, 32)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
@pytest.mark.parametrize("chw", SHAPES, ids=["1x8x8", "3x32x32"])
def test_features_and_embeddings_have_the_declared_shapes(
    name: str, chw: tuple[int, int, int]
) -> None:
    width = 8 if name == "resnet18" else None  # a narrow ResNet keeps the test fast
    model = build_encoder(name, in_channels=chw[0], embedding_dim=16, width=width)
    x = torch.rand(3, *chw)
    assert model.features(x).shape == (3, model.feature_dim)
    assert model(x).shape == (3, 16)
    assert (model.in_channels, model.embedding_dim, model.encoder_name) == (chw[0], 16, name)


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_embeddings_are_unit_norm(name: str) -> None:
    model = build_encoder(name, in_channels=3, embedding_dim=32, width=8)
    z = model.embed(torch.rand(4, 3, 32, 32))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))


def test_small_cnn_accepts_tiny_and_non_square_inputs() -> None:
    cnn = SmallCNN(in_channels=1, width=4)
    for hw in [(1, 1), (2, 3), (8, 8), (13, 40), (64, 64)]:
        assert cnn(torch.rand(2, 1, *hw)).shape == (2, cnn.feature_dim)


def test_default_width_gives_documented_feature_dims() -> None:
    assert build_encoder("cnn", in_channels=1).feature_dim == 256
    assert build_encoder("resnet18", in_channels=3).feature_dim == 512


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_no_batchnorm_by_default(name: str) -> None:
    model = build_encoder(name, in_channels=3)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_default_models_pass_opacus_validation(name: str) -> None:
    from opacus import validators  # a dependency; imported here, as only DP needs it
    model = build_encoder(name, in_channels=3)
    assert validators.ModuleValidator.validate(model, strict=False) == []


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_computes_per_sample_gradients_for_every_parameter() -> None:
    import opacus
    model = opacus.GradSampleModule(build_encoder("cnn", in_channels=1, embedding_dim=8, width=4))
    model(torch.rand(5, 1, 8, 8)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape == (5, *p.shape), name


def test_batch_norm_is_available_on_request() -> None:
    model = build_encoder("cnn", in_channels=1, norm="batch")
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize(
    ("kind", "channels", "groups"),
    [("group", 256, 32), ("group", 32, 8), ("group", 6, 1), ("layer", 64, 1), ("instance", 64, 64)],
)
def test_make_norm_group_counts_divide_the_channels(kind: str, channels: int, groups: int) -> None:
    norm = make_norm(kind, channels)
    assert isinstance(norm, nn.GroupNorm)
    assert (norm.num_groups, norm.num_channels, norm.affine) == (groups, channels, True)


def test_unknown_norm_names_the_choices() -> None:
    with pytest.raises(ValueError, match="group, batch, instance, layer"):
        make_norm("weight", 8)
    with pytest.raises(ValueError, match="unknown norm"):
        build_encoder("cnn", in_channels=1, norm="weight")


def test_unknown_encoder_names_the_registry() -> None:
    with pytest.raises(ValueError, match=", ".join(builtin_names("encoder"))):
        build_encoder("vit", in_channels=3)


def test_non_positive_embedding_dim_is_refused() -> None:
    with pytest.raises(ValueError, match="embedding_dim"):
        build_encoder("cnn", in_channels=3, embedding_dim=0)


def test_contrastive_model_composes_any_backbone_and_head() -> None:
    backbone = SmallCNN(in_channels=3, width=4)
    model = ContrastiveModel(backbone, ProjectionHead(backbone.feature_dim, 16, 8, norm="layer"))
    assert model.encoder_name == "smallcnn"
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 8)
