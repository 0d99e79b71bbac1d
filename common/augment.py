"""Batched, seeded image augmentations for contrastive views, on the batch's device.

The view distribution follows SimCLR (Chen et al. 2020) and MoCo v2 (Chen et al. 2020,
"Improved Baselines with Momentum Contrastive Learning"): random resized crop,
horizontal flip, colour jitter, random grayscale, optional Gaussian blur. Every sample
of a batch gets its own parameters, but each transform runs as one batched tensor op,
so a batch of views costs a few kernels instead of a Python loop over images.

All random parameters are drawn on the CPU from the caller's ``torch.Generator`` and
then moved to the batch's device: a CPU generator drives CUDA batches too, and the same
seed gives the same views on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from common.config import TrainConfig
    from common.plugins import ViewFn

# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# torchvision's RandomResizedCrop draws up to 10 boxes before falling back to the full image.
_CROP_ATTEMPTS = 10


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    if len(value) != 2 or not (low < value[0] <= value[1] <= high):
        raise ValueError(f"{name} must be (lo, hi) with {low} < lo <= hi <= {high}, got {value}")


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


@dataclass
class AugmentParams:
    """The distribution of views.

    Attributes:
        crop_scale: (lo, hi) fraction of the image area kept by the random crop, 0 < lo <= hi <= 1.
        crop_ratio: (lo, hi) aspect ratio (width / height) of the crop, 0 < lo <= hi.
        flip_p: probability of a horizontal flip.
        jitter_strength: s in [0, 2]; brightness, contrast and saturation factors are drawn
            from [max(0, 1 - s), 1 + s] and the hue shift from [-s/4, s/4] (s = 0.4 is
            MoCo v2's ColorJitter(0.4, 0.4, 0.4, 0.1)).
        jitter_p: probability of applying the colour jitter.
        grayscale_p: probability of converting a 3-channel image to grayscale.
        blur_p: probability of a Gaussian blur.
        blur_sigma: (lo, hi) range of the blur's standard deviation in pixels, 0 < lo <= hi.

    Raises:
        ValueError: in ``__post_init__``, for any value out of its range.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_strength: float = 0.4
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        # Configuration files deliver lists; keep the tuples the annotations promise.
        self.crop_scale = tuple(self.crop_scale)
        self.crop_ratio = tuple(self.crop_ratio)
        self.blur_sigma = tuple(self.blur_sigma)
        _check_range("crop_scale", self.crop_scale, 0.0, 1.0)
        _check_range("crop_ratio", self.crop_ratio, 0.0, math.inf)
        _check_range("blur_sigma", self.blur_sigma, 0.0, math.inf)
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            _check_probability(name, getattr(self, name))
        if not 0.0 <= self.jitter_strength <= 2.0:
            raise ValueError(
                f"jitter_strength must be in [0, 2] (hue shift <= 0.5), got {self.jitter_strength}"
            )


def _uniform(
    lo: float, hi: float, shape: tuple[int, ...], generator: torch.Generator | None
) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=generator)


def _gray(x: Tensor) -> Tensor:
    """(N, 3, H, W) RGB -> (N, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """ratio * x + (1 - ratio) * other, clamped to [0, 1] as torchvision does after each op."""
    return (ratio * x + (1 - ratio) * other).clamp(0, 1)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> HSV with every channel in [0, 1]."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    gray = delta == 0
    s = delta / torch.where(gray, torch.ones_like(maxc), maxc)
    d = torch.where(gray, torch.ones_like(delta), delta)  # avoids 0/0 on gray pixels
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    """(N, 3, H, W) HSV in [0, 1] -> RGB, branch-free: c(n) = v - v s clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6 h) mod 6 and n = 5, 3, 1 for R, G, B."""
    h, s, v = (t.unsqueeze(1) for t in x.unbind(1))
    n = torch.tensor((5.0, 3.0, 1.0), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0, 1)


def _gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur with one sigma per sample: x (N, C, H, W), sigma (N,)."""
    n, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)  # K
    kernel = torch.exp(-(t**2) / (2 * sigma.unsqueeze(1) ** 2))  # N x K
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # NC x K
    # Depthwise: every (sample, channel) map is its own group with its own kernel.
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(
        F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, -1), groups=n * c
    )
    y = F.conv2d(
        F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel.view(n * c, 1, -1, 1), groups=n * c
    )
    return y.view(n, c, h, w)


class Augmenter:
    """Draws one random view per image of a batch.

    Order of operations: resized crop and flip (one ``affine_grid`` + bilinear
    ``grid_sample``), colour jitter (brightness, contrast, saturation, hue, in that fixed
    order, unlike torchvision's random order), grayscale, blur; output clamped to [0, 1].
    For inputs with C != 3 only brightness and contrast apply, and grayscale is skipped.

    Crops are continuous boxes (no rounding to whole pixels). A box that does not fit
    is redrawn, up to 10 times as in torchvision; after that the full image is used.

    Args:
        params: the view distribution.

    Examples:
        >>> aug = Augmenter()
        >>> g = torch.Generator().manual_seed(0)
        >>> v1, v2 = aug(x, g), aug(x, g)  # two views of x (N, C, H, W)
    """

    def __init__(self, params: AugmentParams | None = None) -> None:
        self.params = params if params is not None else AugmentParams()

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x (N, C, H, W) float in [0, 1] -> a view of the same shape, device and dtype.

        Args:
            x: the batch.
            generator: a CPU generator; ``None`` uses torch's global CPU generator.

        Raises:
            ValueError: ``x`` not a 4-d floating tensor, or a generator not on the CPU.
        """
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(
                f"expected a float tensor (N, C, H, W), got {x.dtype} of shape {tuple(x.shape)} "
                "(these are image views: for other data choose --views, e.g. dna)"
            )
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(
                f"generator is on {generator.device}: pass a CPU torch.Generator (parameters are drawn on the CPU)"
            )
        n, c, h, w = x.shape
        if n == 0:
            return x.clone()
        p = self.params
        g = generator
        s = p.jitter_strength

        # Every draw, in a fixed order, on the CPU; then one move to x's device.
        log_ratio = _uniform(
            math.log(p.crop_ratio[0]), math.log(p.crop_ratio[1]), (n, _CROP_ATTEMPTS), g
        )
        draws = {
            "scale": _uniform(*p.crop_scale, (n, _CROP_ATTEMPTS), g),
            "ratio": torch.exp(log_ratio),
            "cx": _uniform(-1.0, 1.0, (n,), g),
            "cy": _uniform(-1.0, 1.0, (n,), g),
            "flip": torch.rand(n, generator=g) < p.flip_p,
            "jitter": torch.rand(n, generator=g) < p.jitter_p,
            "brightness": _uniform(max(0.0, 1 - s), 1 + s, (n,), g),
            "contrast": _uniform(max(0.0, 1 - s), 1 + s, (n,), g),
            "saturation": _uniform(max(0.0, 1 - s), 1 + s, (n,), g),
            "hue": _uniform(-s / 4, s / 4, (n,), g),
            "grayscale": torch.rand(n, generator=g) < p.grayscale_p,
            "blur": torch.rand(n, generator=g) < p.blur_p,
            "sigma": _uniform(*p.blur_sigma, (n,), g),
        }
        d = {
            k: v.to(x.device) if v.dtype == torch.bool else v.to(x.device, x.dtype)
            for k, v in draws.items()
        }

        out = self._crop_and_flip(x, d)
        out = self._jitter(out, d)
        if c == 3:
            out = torch.where(
                d["grayscale"].view(n, 1, 1, 1), _gray(out).expand(-1, 3, -1, -1), out
            )
        if p.blur_p > 0:
            # The kernel must stay inside reflect padding's limit (radius < side).
            radius = min(math.ceil(3 * p.blur_sigma[1]), (min(h, w) - 1) // 2)
            if radius > 0:
                out = torch.where(
                    d["blur"].view(n, 1, 1, 1), _gaussian_blur(out, d["sigma"], radius), out
                )
        return out.clamp(0, 1)

    @staticmethod
    def _crop_and_flip(x: Tensor, d: dict[str, Tensor]) -> Tensor:
        """Random resized crop and horizontal flip as one affine resampling."""
        n, c, h, w = x.shape
        # Box sides as fractions of the image sides, for area fraction a and ratio r:
        # width = sqrt(a r H / W), height = sqrt(a W / (r H)).
        wf = torch.sqrt(d["scale"] * d["ratio"] * (h / w))  # N x attempts
        hf = torch.sqrt(d["scale"] / d["ratio"] * (w / h))
        fits = (wf <= 1) & (hf <= 1)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first box that fits
        any_fits = fits.any(dim=1)
        one = torch.ones((), dtype=x.dtype, device=x.device)
        wf = torch.where(any_fits, wf.gather(1, first).squeeze(1), one)  # N
        hf = torch.where(any_fits, hf.gather(1, first).squeeze(1), one)
        cx = d["cx"] * (1 - wf)  # centre, in [-1, 1] grid units, keeping the box inside
        cy = d["cy"] * (1 - hf)
        sign = torch.where(d["flip"], -one, one)
        zero = torch.zeros_like(wf)
        theta = torch.stack(
            (torch.stack((wf * sign, zero, cx), dim=1), torch.stack((zero, hf, cy), dim=1)), dim=1
        )  # N x 2 x 3
        grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
        return F.grid_sample(
            x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )

    @staticmethod
    def _jitter(x: Tensor, d: dict[str, Tensor]) -> Tensor:
        """Brightness, contrast, and for RGB saturation and hue, on the selected samples."""
        n, c = x.shape[:2]

        def per_sample(v: Tensor) -> Tensor:
            return v.view(n, 1, 1, 1)

        y = (x * per_sample(d["brightness"])).clamp(0, 1)
        luma = _gray(y) if c == 3 else y
        mean = luma.mean(dim=(1, 2, 3), keepdim=True)
        y = _blend(y, mean, per_sample(d["contrast"]))
        if c == 3:
            y = _blend(y, _gray(y), per_sample(d["saturation"]))
            hsv = _rgb_to_hsv(y)
            hue = torch.remainder(hsv[:, :1] + per_sample(d["hue"]), 1.0)
            y = _hsv_to_rgb(torch.cat((hue, hsv[:, 1:]), dim=1))
        return torch.where(per_sample(d["jitter"]), y, x)


#: The ``images`` views' smallest crop (area) when ``--crop-scale-min`` is 0.
IMAGE_CROP_MIN = 0.5
#: The ``digits`` views' smallest crop when ``--crop-scale-min`` is 0: crops that keep the
#: glyph (``bench/results/recipe_pilots.md``).
DIGIT_CROP_MIN = 0.8


def augment_params(cfg: TrainConfig, crop_min: float = IMAGE_CROP_MIN) -> AugmentParams:
    """The view distribution a config asks for; ``crop_min`` stands for a
    ``--crop-scale-min`` of 0 (the views' own)."""
    return AugmentParams(
        crop_scale=(cfg.crop_scale_min or crop_min, 1.0),
        jitter_strength=cfg.jitter_strength,
        blur_p=cfg.blur_p,
    )


def image_views(cfg: TrainConfig) -> Augmenter:
    """The built-in ``images`` views (a :class:`~common.plugins.ViewFactory`)."""
    return Augmenter(augment_params(cfg))


#: The ``digits`` views' extra transforms: rotation up to this many degrees either way,
#: then additive Gaussian noise of this std (pixels in [0, 1]).
DIGIT_ROTATION_DEG = 10.0
DIGIT_NOISE_STD = 0.05


def digit_views(cfg: TrainConfig) -> ViewFn:
    """The built-in ``digits`` views, for small grayscale glyphs such as sklearn's 8x8 digits.

    The ``images`` views (crop from ``--crop-scale-min``, jitter, blur) without the
    horizontal flip (a mirrored glyph is another glyph), then a rotation of at most
    :data:`DIGIT_ROTATION_DEG` degrees (zero padding: the background) and Gaussian noise
    of std :data:`DIGIT_NOISE_STD`, clamped to [0, 1]; the crop keeps at least
    :data:`DIGIT_CROP_MIN` of the area unless ``--crop-scale-min`` says otherwise. These
    views make default training end above random init on digits, where the ``images``
    views do not (``bench/results/recipe_pilots.md``); ``--views auto`` picks them there.
    """
    params = augment_params(cfg, DIGIT_CROP_MIN)
    params.flip_p = 0.0
    augment = Augmenter(params)
    max_angle = math.radians(DIGIT_ROTATION_DEG)

    def view(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        y = augment(x, generator)
        n = x.shape[0]
        # drawn on the CPU, in a fixed order, like Augmenter's parameters
        angle = (torch.rand(n, generator=generator) * 2 - 1) * max_angle
        noise = torch.randn(x.shape, generator=generator) * DIGIT_NOISE_STD
        cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros(n)
        theta = torch.stack((torch.stack((cos, -sin, zero), 1), torch.stack((sin, cos, zero), 1)), 1)
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return (y + noise.to(x.device, x.dtype)).clamp(0, 1)

    return view
