"""Encoders: shapes on digits-sized and CIFAR-sized inputs, unit-norm embeddings, DP compatibility."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.encoders import (
    ContrastiveModel,
    ProjectionHead,
    SmallCNN,
    WSConv1d,
    WSConv2d,
    build_encoder,
    make_norm,
    register_opacus_grad_samplers,
    standardize_convs,
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


# --- weight standardisation ------------------------------------------------------------

#: (encoder, input shape) for each built-in backbone, small enough to run in a test
WS_ENCODERS = {"cnn": (1, 8, 8), "resnet18": (3, 8, 8), "cnn1d": (4, 24)}


def _ws_model(name: str) -> ContrastiveModel:
    torch.manual_seed(0)
    return build_encoder(name, in_channels=WS_ENCODERS[name][0], embedding_dim=8, width=4,
                         weight_standardization=True)


@pytest.mark.parametrize("name", list(WS_ENCODERS))
def test_weight_standardization_makes_every_backbone_conv_standardised(name: str) -> None:
    plain = build_encoder(name, in_channels=WS_ENCODERS[name][0], embedding_dim=8, width=4)
    model = _ws_model(name)
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
    assert convs and all(isinstance(m, WSConv1d | WSConv2d) for m in convs)
    assert not any(isinstance(m, WSConv1d | WSConv2d) for m in plain.modules())
    # same parameters under the same names: checkpoints and federated weights line up
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()}
    x = torch.rand(2, *WS_ENCODERS[name])
    assert model.features(x).shape == (2, model.feature_dim)
    assert model(x).shape == (2, 8)


@pytest.mark.parametrize("cls", [nn.Conv1d, nn.Conv2d])
def test_the_weight_a_ws_conv_convolves_with_has_zero_mean_and_unit_variance(cls) -> None:
    conv = standardize_convs(nn.Sequential(cls(3, 5, 3, padding=1, bias=False)))[0]
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(torch.randn_like(conv.weight))  # far from standardised
    used = []  # the weight the forward pass convolves with, captured where it is applied
    original = conv._conv_forward
    conv._conv_forward = lambda x, w, b: used.append(w) or original(x, w, b)
    conv(torch.rand(2, 3, 6) if cls is nn.Conv1d else torch.rand(2, 3, 6, 6))
    assert len(used) == 1
    w = used[0].flatten(1)  # O x (I K)
    torch.testing.assert_close(w.mean(dim=1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.var(dim=1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)


def test_a_ws_conv_is_invariant_to_the_scale_and_shift_of_its_weight() -> None:
    conv = standardize_convs(nn.Sequential(nn.Conv2d(2, 4, 3, bias=False)))[0]
    x = torch.rand(3, 2, 5, 5)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.5)
    # up to eps (1e-5) against a weight variance of about 0.02: a relative 1e-3
    torch.testing.assert_close(conv(x), before, atol=2e-3, rtol=2e-3)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("name", list(WS_ENCODERS))
def test_opacus_per_sample_gradients_through_ws_convs_equal_per_example_autograd(
    name: str
) -> None:
    import opacus

    register_opacus_grad_samplers()
    # float64: in float32 the batched and one-example convolutions round differently by
    # more than the tolerance on some CPUs (1.4e-5 on resnet18's stem at 1e-5 allowed)
    model = _ws_model(name).double()
    reference = _ws_model(name).double()
    x = torch.randn(4, *WS_ENCODERS[name], generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    expected = []
    for i in range(len(x)):
        reference.zero_grad()
        reference(x[i : i + 1]).pow(2).sum().backward()
        expected.append([p.grad.clone() for p in reference.parameters()])
    gsm = opacus.GradSampleModule(model)
    gsm(x).pow(2).sum().backward()
    for j, (pname, p) in enumerate(model.named_parameters()):
        for i in range(len(x)):
            torch.testing.assert_close(p.grad_sample[i], expected[i][j], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, pname=pname: f"{pname}: {m}")
    # the registered sampler, not Opacus's generic functorch fallback, did the WS convs
    assert not any(hasattr(m, "ft_compute_sample_grad") for m in model.modules()
                   if isinstance(m, WSConv1d | WSConv2d))


def test_ws_models_pass_opacus_validation() -> None:
    from opacus import validators

    assert validators.ModuleValidator.validate(_ws_model("resnet18"), strict=False) == []


def test_a_checkpoint_rebuilds_the_weight_standardised_encoder(tmp_path) -> None:
    from common.checkpoint import encoder_spec, load_encoder, save_encoder

    model = _ws_model("cnn").eval()
    save_encoder(model, encoder_spec("cnn", 1, 8, "group", 4, True), tmp_path / "encoder.pt")
    loaded = load_encoder(tmp_path)
    assert any(isinstance(m, WSConv2d) for m in loaded.modules())
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))
