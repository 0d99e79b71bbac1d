"""Batched augmentations: shape, dtype and range kept, deterministic under a seed, identity
when every transform is switched off, and invalid parameters refused."""

from __future__ import annotations

import pytest
import torch

from common.augment import Augmenter, AugmentParams

SHAPES = [(6, 1, 8, 8), (6, 3, 8, 8), (6, 1, 32, 32), (6, 3, 32, 32)]
ALL_ON = AugmentParams(blur_p=0.5)


def batch(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[1:])))
def test_view_keeps_shape_dtype_and_unit_range(shape: tuple[int, ...]) -> None:
    view = Augmenter(ALL_ON)(batch(shape), gen(0))
    assert view.shape == shape and view.dtype == torch.float32
    assert view.min() >= 0 and view.max() <= 1


def test_float64_input_gives_float64_views() -> None:
    assert Augmenter()(batch((2, 3, 8, 8)).double(), gen(0)).dtype == torch.float64


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[1:])))
def test_same_seed_same_views(shape: tuple[int, ...]) -> None:
    x = batch(shape)
    assert torch.equal(Augmenter(ALL_ON)(x, gen(7)), Augmenter(ALL_ON)(x, gen(7)))


def test_different_seeds_give_different_views() -> None:
    x = batch((6, 3, 32, 32))
    assert not torch.allclose(Augmenter()(x, gen(1)), Augmenter()(x, gen(2)))


def test_two_views_drawn_in_sequence_differ_for_every_image() -> None:
    x, g, aug = batch((6, 3, 32, 32)), gen(0), Augmenter()
    v1, v2 = aug(x, g), aug(x, g)
    assert ((v1 - v2).abs().flatten(1).amax(dim=1) > 1e-3).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[1:])))
def test_full_crop_and_no_random_transform_is_the_identity(shape: tuple[int, ...]) -> None:
    params = AugmentParams(
        crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0
    )
    x = batch(shape)
    torch.testing.assert_close(Augmenter(params)(x, gen(0)), x, atol=1e-5, rtol=0)


def test_a_certain_flip_mirrors_the_image() -> None:
    params = AugmentParams(crop_scale=(1.0, 1.0), flip_p=1.0, jitter_p=0.0, grayscale_p=0.0)
    x = batch((2, 3, 8, 8))
    torch.testing.assert_close(Augmenter(params)(x, gen(0)), x.flip(-1), atol=1e-5, rtol=0)


def test_certain_grayscale_makes_the_channels_equal() -> None:
    params = AugmentParams(grayscale_p=1.0)
    view = Augmenter(params)(batch((4, 3, 16, 16)), gen(0))
    torch.testing.assert_close(view[:, 0], view[:, 1])
    torch.testing.assert_close(view[:, 1], view[:, 2])


def test_certain_blur_smooths_the_image() -> None:
    identity = dict(crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    x = batch((4, 1, 32, 32))
    blurred = Augmenter(AugmentParams(**identity, blur_p=1.0, blur_sigma=(1.0, 2.0)))(x, gen(0))
    assert blurred.diff(dim=-1).abs().mean() < 0.5 * x.diff(dim=-1).abs().mean()


def test_grayscale_input_stays_one_channel_and_jitter_changes_it() -> None:
    params = AugmentParams(crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=1.0)
    x = batch((4, 1, 8, 8))
    view = Augmenter(params)(x, gen(0))
    assert view.shape == x.shape and not torch.allclose(view, x)


def test_a_cuda_generator_is_refused() -> None:
    class FakeCudaGenerator:
        device = torch.device("cuda")

    with pytest.raises(ValueError, match="CPU"):
        Augmenter()(batch((2, 3, 8, 8)), FakeCudaGenerator())  # type: ignore[arg-type]


def test_non_image_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Augmenter()(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Augmenter()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize(
    "bad",
    [
        {"crop_scale": (0.0, 1.0)},
        {"crop_scale": (0.5, 0.2)},
        {"crop_scale": (0.2, 1.5)},
        {"crop_ratio": (0.0, 1.0)},
        {"flip_p": 1.5},
        {"jitter_p": -0.1},
        {"grayscale_p": 2.0},
        {"blur_p": -1.0},
        {"jitter_strength": -0.1},
        {"jitter_strength": 3.0},
        {"blur_sigma": (0.0, 1.0)},
    ],
    ids=lambda d: next(iter(d)),
)
def test_invalid_params_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        AugmentParams(**bad)


def test_lists_from_config_files_become_tuples() -> None:
    assert AugmentParams(crop_scale=[0.3, 1.0]).crop_scale == (0.3, 1.0)  # type: ignore[arg-type]


def test_digit_views_are_a_builtin_keep_shape_and_range_and_follow_the_seed() -> None:
    from common.config import TrainConfig
    from common.plugins import make_views

    view = make_views(TrainConfig(views="digits", crop_scale_min=0.8))
    x = batch((6, 1, 8, 8))
    v = view(x, gen(3))
    assert v.shape == x.shape and v.dtype == x.dtype and v.min() >= 0 and v.max() <= 1
    assert torch.equal(v, view(x, gen(3)))
    assert not torch.equal(v, view(x, gen(4)))


def test_digit_views_never_flip(monkeypatch: pytest.MonkeyPatch) -> None:
    # no crop, jitter, rotation or noise left: an image that a flip would change comes back
    from common import augment
    from common.config import TrainConfig

    monkeypatch.setattr(augment, "DIGIT_ROTATION_DEG", 0.0)
    monkeypatch.setattr(augment, "DIGIT_NOISE_STD", 0.0)
    view = augment.digit_views(TrainConfig(crop_scale_min=1.0, jitter_strength=0.0))
    x = batch((64, 1, 8, 8))
    torch.testing.assert_close(view(x, gen(0)), x, atol=1e-5, rtol=0)
