"""Encoders: convolutional backbones, a projection head, and the model that joins them.

A :class:`ContrastiveModel` is ``backbone -> features (N, F) -> head -> L2-normalised
embedding (N, D)``, the SimCLR layout (Chen et al. 2020, "A Simple Framework for
Contrastive Learning of Visual Representations"): downstream metrics read the backbone
features, the contrastive loss reads the normalised projection.

Normalisation defaults to GroupNorm (Wu & He 2018) everywhere. BatchNorm mixes
statistics across the examples of a batch, which breaks the per-example independence
that DP-SGD's clipping needs (and Opacus refuses it); every layer used by default
(Conv2d, Linear, GroupNorm) has per-sample gradients in Opacus.

Weight standardisation (``--weight-standardization``; Qiao et al. 2019, "Micro-Batch
Training with Batch-Channel Normalization and Weight Standardization", arXiv:1903.10520,
as in BiT, Kolesnikov et al. 2020) replaces each backbone convolution by
:class:`WSConv1d` / :class:`WSConv2d`, which convolve with the weight standardised to
zero mean and unit variance per output channel. It is per example (the weight's
statistics, not the batch's), so DP-SGD still applies: :func:`register_opacus_grad_samplers`
gives Opacus their per-sample gradients.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import plugins

logger = logging.getLogger(__name__)

NORM_KINDS = ("group", "batch", "instance", "layer")


def _group_count(channels: int) -> int:
    """Groups for GroupNorm: at most 32, at least 4 channels per group where possible,
    and a divisor of ``channels`` (GroupNorm requires it)."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


def make_norm(kind: str, channels: int, dims: int = 2) -> nn.Module:
    """A normalisation layer over ``channels`` feature maps.

    Args:
        kind: ``"group"`` (GroupNorm, up to 32 groups of >= 4 channels), ``"batch"``
            (BatchNorm; not usable with DP-SGD), ``"instance"`` (GroupNorm(C, C), i.e.
            instance norm with a per-channel affine), ``"layer"`` (GroupNorm(1, C)).
        channels: number of channels C of the (N, C, H, W) or (N, C, L) input.
        dims: spatial dimensions of the input (2: BatchNorm2d, 1: BatchNorm1d); the
            GroupNorm kinds take any.

    Raises:
        ValueError: unknown ``kind`` or ``channels < 1``.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if kind == "group":
        return nn.GroupNorm(_group_count(channels), channels)
    if kind == "batch":
        return nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"unknown norm {kind!r}: choose one of {', '.join(NORM_KINDS)}")


#: Added to the per-channel weight variance before the square root (Qiao et al. add 1e-5
#: to the standard deviation; a variance floor keeps the same order for small fan-ins).
WS_EPS = 1e-5


def standardize_weight(weight: Tensor, eps: float = WS_EPS) -> Tensor:
    """``weight`` (O, I, *kernel) minus its mean, over its std, per output channel O
    (the std is sqrt(biased variance + eps))."""
    w = weight.flatten(1)
    mean = w.mean(dim=1, keepdim=True)
    var = w.var(dim=1, unbiased=False, keepdim=True)
    return ((w - mean) * torch.rsqrt(var + eps)).view_as(weight)


class WSConv1d(nn.Conv1d):
    """``nn.Conv1d`` that convolves with :func:`standardize_weight` of its weight."""

    eps = WS_EPS

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, standardize_weight(self.weight, self.eps), self.bias)


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` that convolves with :func:`standardize_weight` of its weight."""

    eps = WS_EPS

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, standardize_weight(self.weight, self.eps), self.bias)


_WS_OF = {nn.Conv1d: WSConv1d, nn.Conv2d: WSConv2d}


def standardize_convs(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Conv1d`` / ``nn.Conv2d`` in ``module`` weight-standardised,
    in place, and return ``module``.

    Each conv is replaced by its :class:`WSConv1d` / :class:`WSConv2d` twin holding the
    same parameter objects, so ``state_dict`` keys, shapes and an optimiser built before
    are unchanged. Convs with string padding (``"same"``) are refused (the per-sample
    gradient below takes numeric padding).
    """
    for name, child in module.named_children():
        cls = _WS_OF.get(type(child))
        if cls is None:
            standardize_convs(child)
            continue
        if isinstance(child.padding, str) or child.padding_mode != "zeros":
            raise ValueError(f"weight standardisation needs numeric zero padding, {name} has "
                             f"padding={child.padding!r}, padding_mode={child.padding_mode!r}")
        twin = cls(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                   padding=child.padding, dilation=child.dilation, groups=child.groups,
                   bias=child.bias is not None, device="meta")
        twin.weight = child.weight
        twin.bias = child.bias
        twin.train(child.training)
        setattr(module, name, twin)
    return module


def _ws_conv_grad_sample(
    layer: WSConv1d | WSConv2d, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Opacus grad sampler of :class:`WSConv1d` / :class:`WSConv2d`: each example's
    gradient with respect to the standardised weight (unfolded input times output
    gradient, as Opacus does for a plain conv), then through the standardisation.

    For one output channel with m weights, w_hat = (w - mean) / s, s = sqrt(var + eps):
    dL/dw = (g - mean(g) - w_hat mean(g w_hat)) / s with g = dL/dw_hat; the map is the
    same for every example, so it applies to all of them at once.
    """
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    weight = layer.weight
    ret: dict[nn.Parameter, Tensor] = {}
    if n == 0:
        if weight.requires_grad:
            ret[weight] = torch.zeros_like(weight).unsqueeze(0)
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)
        return ret
    if isinstance(layer, nn.Conv1d):  # as a 1 x L image
        x = x.unsqueeze(-2)
        kernel, padding = (1, *layer.kernel_size), (0, *layer.padding)
        stride, dilation = (1, *layer.stride), (1, *layer.dilation)
    else:
        kernel, padding, stride, dilation = (
            layer.kernel_size, layer.padding, layer.stride, layer.dilation)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # N x IK x P
    grads = backprops.reshape(n, layer.out_channels, -1)  # N x O x P
    if weight.requires_grad:
        g, o = layer.groups, layer.out_channels
        cols = cols.view(n, g, -1, cols.shape[-1])  # N x G x (I/G)K x P
        grads_g = grads.view(n, g, o // g, -1)  # N x G x O/G x P
        g_hat = torch.einsum("ngop,ngqp->ngoq", grads_g, cols).reshape(n, o, -1)  # N x O x m
        with torch.no_grad():
            w = weight.detach().flatten(1)
            var = w.var(dim=1, unbiased=False, keepdim=True)
            inv_s = torch.rsqrt(var + layer.eps)
            w_hat = (w - w.mean(dim=1, keepdim=True)) * inv_s  # O x m
        dw = g_hat - g_hat.mean(dim=2, keepdim=True) - w_hat * (g_hat * w_hat).mean(
            dim=2, keepdim=True)
        ret[weight] = (dw * inv_s).view(n, *weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = grads.sum(dim=2)
    return ret


def register_opacus_grad_samplers() -> None:
    """Register :func:`_ws_conv_grad_sample` with Opacus for the weight-standardised convs
    (idempotent). Imports Opacus, so it is called where DP-SGD is set up; without it
    Opacus would fall back to its slower functorch path for these layers."""
    from opacus.grad_sample.utils import register_grad_sampler

    register_grad_sampler([WSConv1d, WSConv2d])(_ws_conv_grad_sample)


def _conv_block(in_ch: int, out_ch: int, norm: str, stride: int = 1) -> nn.Sequential:
    # No conv bias: the normalisation that follows has its own shift.
    # ReLU not in place: Opacus' backward hooks reject in-place edits of hooked outputs.
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        make_norm(norm, out_ch),
        nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """Four conv3x3-norm-ReLU blocks, widths (w, 2w, 4w, 8w), then global average pooling.

    After each of the first three blocks the maps are halved by 2x2 max pooling, but only
    while both sides are at least 4 pixels, so an 8x8 input (sklearn digits) goes
    8 -> 4 -> 2 -> 2 and a 32x32 input goes 32 -> 16 -> 8 -> 4; nothing shrinks below
    2x2 and any input size >= 1x1 works.

    Args:
        in_channels: C of the (N, C, H, W) input.
        width: channels of the first block.
        norm: see :func:`make_norm`.

    Attributes:
        feature_dim: F = 8 * width, the length of the output feature vector.
    """

    def __init__(self, in_channels: int, width: int = 32, norm: str = "group") -> None:
        super().__init__()
        if in_channels < 1 or width < 1:
            raise ValueError(f"in_channels and width must be >= 1, got {in_channels}, {width}")
        widths = (width, 2 * width, 4 * width, 8 * width)
        chans = (in_channels, *widths)
        self.blocks = nn.ModuleList(_conv_block(chans[i], chans[i + 1], norm) for i in range(4))
        self.in_channels = in_channels
        self.feature_dim = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, F)."""
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < 3 and min(x.shape[-2:]) >= 4:
                x = F.max_pool2d(x, 2)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # N x F


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two conv3x3 with a residual connection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), make_norm(norm, out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))  # out-of-place add: see _conv_block


class ResNet18(nn.Module):
    """ResNet-18 in its CIFAR form: 3x3 stem without max pooling, BasicBlocks [2, 2, 2, 2]
    with widths (w, 2w, 4w, 8w) and strides (1, 2, 2, 2), adaptive average pooling.

    A stride-2 3x3 convolution with padding 1 maps 1x1 to 1x1, so inputs as small as 8x8
    (8 -> 8 -> 4 -> 2 -> 1) work.

    Args:
        in_channels: C of the (N, C, H, W) input.
        norm: see :func:`make_norm`; GroupNorm by default (DP-compatible).
        width: channels of the stem and first stage (64 in the paper).

    Attributes:
        feature_dim: F = 8 * width (512 by default).
    """

    def __init__(self, in_channels: int, norm: str = "group", width: int = 64) -> None:
        super().__init__()
        if in_channels < 1 or width < 1:
            raise ValueError(f"in_channels and width must be >= 1, got {in_channels}, {width}")
        self.stem = _conv_block(in_channels, width, norm)
        layers: list[nn.Module] = []
        in_ch = width
        for i, stride in enumerate((1, 2, 2, 2)):
            out_ch = width * 2**i
            layers += [BasicBlock(in_ch, out_ch, stride, norm), BasicBlock(out_ch, out_ch, 1, norm)]
            in_ch = out_ch
        self.layers = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.feature_dim = in_ch

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, F)."""
        x = self.layers(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # N x F


class ProjectionHead(nn.Module):
    """SimCLR's projection MLP: Linear -> [norm] -> ReLU -> Linear (Chen et al. 2020).

    Args:
        in_dim: F, the backbone feature length.
        hidden_dim: width of the hidden layer.
        out_dim: D, the embedding length.
        norm: ``None`` (default), ``"layer"`` or ``"group"`` (GroupNorm on the hidden
            vector, DP-compatible), or ``"batch"`` (BatchNorm1d, not DP-compatible).
            ``"instance"`` is refused: on a vector it normalises each unit to zero.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, norm: str | None = None) -> None:
        super().__init__()
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError(f"dimensions must be >= 1, got {in_dim}, {hidden_dim}, {out_dim}")
        if norm == "instance":
            raise ValueError(
                "norm 'instance' on a vector is degenerate: use None, 'layer' or 'group'"
            )
        hidden_norm: nn.Module = nn.Identity()
        if norm == "batch":
            hidden_norm = nn.BatchNorm1d(hidden_dim)
        elif norm is not None:
            hidden_norm = make_norm(norm, hidden_dim)  # GroupNorm also accepts (N, C)
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), hidden_norm, nn.ReLU(), nn.Linear(hidden_dim, out_dim)
        )
        self.out_dim = out_dim

    def forward(self, h: Tensor) -> Tensor:
        """(N, F) -> (N, D), not normalised."""
        return self.net(h)


class ContrastiveModel(nn.Module):
    """Backbone plus projection head; :meth:`forward` returns unit-norm embeddings.

    Args:
        backbone: maps items (N, C, ...) (images (N, C, H, W), sequences (N, C, L)) to
            (N, F); must have ``in_channels`` and ``feature_dim`` attributes.
        head: maps (N, F) to (N, D); must have an ``out_dim`` attribute.
        encoder_name: the built-in name or import path it was built from, recorded for
            checkpoints and run outputs (defaults to the backbone's class name, lower-cased).

    Attributes:
        in_channels, feature_dim (F), embedding_dim (D), encoder_name.
        predictor: BYOL's prediction MLP on the projection (D -> D), or ``None`` (the
            default: its state dict then holds backbone and head only). Set by
            :func:`common.model.build_model` for ``--objective byol``.
    """

    def __init__(
        self, backbone: nn.Module, head: nn.Module, encoder_name: str | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.in_channels: int = backbone.in_channels
        self.feature_dim: int = backbone.feature_dim
        self.embedding_dim: int = head.out_dim
        self.encoder_name = encoder_name or type(backbone).__name__.lower()
        self.predictor: nn.Module | None = None

    def features(self, x: Tensor) -> Tensor:
        """Backbone features (N, F), the representation that downstream metrics probe."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """L2-normalised projection (N, D), the input that :func:`common.loss.info_nce` expects."""
        return F.normalize(self.head(self.backbone(x)), dim=1)

    def embed(self, x: Tensor) -> Tensor:
        """Alias of :meth:`forward`."""
        return self(x)

    def predict(self, x: Tensor) -> Tensor:
        """BYOL's online prediction q(g(f(x))) (N, D), not normalised (Grill et al. 2020):
        the predictor reads the projection before its normalisation."""
        if self.predictor is None:
            raise ValueError("this model has no predictor: build it with --objective byol")
        return self.predictor(self.head(self.backbone(x)))


def with_projection_head(backbone: nn.Module, embedding_dim: int) -> ContrastiveModel:
    """``backbone`` (with ``in_channels`` and ``feature_dim``) plus a projection head of
    hidden width F: what an :class:`~common.plugins.EncoderFactory` usually returns."""
    if embedding_dim <= 0:
        raise ValueError(f"embedding_dim must be > 0, got {embedding_dim}")
    head = ProjectionHead(backbone.feature_dim, backbone.feature_dim, embedding_dim)
    return ContrastiveModel(backbone, head)


def with_head_norm(model: ContrastiveModel, norm: str) -> ContrastiveModel:
    """``model`` with a new projection head of the same sizes whose hidden layer is
    normalised by ``norm`` (see :class:`ProjectionHead`); the head is initialised afresh.

    BYOL needs it: without batch statistics in its projector and predictor the
    projection collapses to a constant (Grill et al. 2020 use BatchNorm there; measured
    here on digits in docs/experiments.md).

    Raises:
        ValueError: the model's head is not a :class:`ProjectionHead` (a plug-in's own).
    """
    head = model.head
    if not isinstance(head, ProjectionHead):
        raise ValueError(f"a head norm needs the built-in ProjectionHead, this encoder has a "
                         f"{type(head).__name__}")
    first = head.net[0]
    model.head = ProjectionHead(first.in_features, first.out_features, head.out_dim, norm=norm)
    return model


def cnn(
    in_channels: int, *, embedding_dim: int = 128, norm: str = "group", width: int | None = None
) -> ContrastiveModel:
    """The built-in ``cnn`` encoder: :class:`SmallCNN` (width 32 by default) with a head."""
    backbone = SmallCNN(in_channels, norm=norm, **({} if width is None else {"width": width}))
    return with_projection_head(backbone, embedding_dim)


def resnet18(
    in_channels: int, *, embedding_dim: int = 128, norm: str = "group", width: int | None = None
) -> ContrastiveModel:
    """The built-in ``resnet18`` encoder: :class:`ResNet18` (width 64 by default) with a head."""
    backbone = ResNet18(in_channels, norm=norm, **({} if width is None else {"width": width}))
    return with_projection_head(backbone, embedding_dim)


def build_encoder(
    name: str = "cnn",
    *,
    in_channels: int,
    embedding_dim: int = 128,
    norm: str = "group",
    width: int | None = None,
    weight_standardization: bool = False,
) -> ContrastiveModel:
    """Build the encoder that ``name`` names, a built-in or an import path.

    Args:
        name: a built-in (``cnn``, ``resnet18``, ``cnn1d``) or ``package.module:name`` of
            an :class:`~common.plugins.EncoderFactory`; recorded as ``encoder_name``.
        in_channels: C of the items (1 for digits, 3 for CIFAR-10, 4 for DNA).
        embedding_dim: D, the length of the normalised embedding.
        norm: backbone normalisation, see :func:`make_norm`.
        width: backbone base width; the factory's own default when ``None``.
        weight_standardization: make the backbone's convolutions weight-standardised
            (:func:`standardize_convs`; any encoder, plug-ins included).

    Raises:
        ValueError: unknown name or norm, or ``embedding_dim <= 0``.
        PluginError: a plug-in that cannot be resolved or returns something else than a
            ContrastiveModel of ``in_channels`` and ``embedding_dim``.
    """
    if embedding_dim <= 0:
        raise ValueError(f"embedding_dim must be > 0, got {embedding_dim}")
    factory: plugins.EncoderFactory = plugins.resolve("encoder", name)
    model = factory(in_channels, embedding_dim=embedding_dim, norm=norm, width=width)
    if not isinstance(model, ContrastiveModel):
        raise plugins.PluginError(
            f"--encoder {name!r} returned a {type(model).__name__}; an EncoderFactory returns "
            "a common.encoders.ContrastiveModel (wrap a backbone with with_projection_head)"
        )
    if (model.in_channels, model.embedding_dim) != (in_channels, embedding_dim):
        raise plugins.PluginError(
            f"--encoder {name!r} was asked for in_channels={in_channels}, "
            f"embedding_dim={embedding_dim} and built in_channels={model.in_channels}, "
            f"embedding_dim={model.embedding_dim}"
        )
    if weight_standardization:
        standardize_convs(model.backbone)
    model.encoder_name = name
    logger.debug("built encoder %s: F=%d D=%d norm=%s ws=%s", name, model.feature_dim,
                 embedding_dim, norm, weight_standardization)
    return model
