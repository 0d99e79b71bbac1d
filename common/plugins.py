"""Bring your own data, encoder and views: plug-ins chosen by name or import path.

Three settings name a plug-in: ``--dataset``, ``--encoder`` and ``--views``. Each takes
a built-in name (the keys of :data:`BUILTINS`) or an import path ``package.module:name``
of an object that follows one of the small protocols below. The built-ins are nothing
but import paths under short names, resolved by the same code, so a user's plug-in
takes exactly the path a built-in takes, through the CLI, the Flower run config,
checkpoints (which record the encoder's spec) and every process of a federation.

Where a plug-in must live: importable in every process that loads data, builds the
encoder or draws views, i.e. the CLI, the ServerApp and every ClientApp. Install its
package into the environment, or, for ``flwr run``, put the module under ``common/``
(which the Flower app bundle packs; ``common/examples/dna.py`` is the worked example).

Contracts (checked where the object is used; a breach raises :class:`PluginError`
naming the plug-in and the contract):

- :class:`DatasetFactory` ``(arg, *, seed) -> Dataset``: ``x_train`` / ``x_test``
  float32 (N, C, ...) with one item shape for both splits (images (N, C, H, W),
  sequences (N, C, L), ...), ``y_*`` int64 (N,) in ``0..len(class_names)-1``. ``arg``
  is the text after the name in ``--dataset NAME:ARG`` (``""`` when there is none).
- :class:`EncoderFactory` ``(in_channels, *, embedding_dim, norm, width) ->
  ContrastiveModel`` that accepts the dataset's items: ``features(x)`` (N, F),
  ``forward(x)`` unit-norm (N, embedding_dim), on whatever device it is moved to.
- :class:`ViewFactory` ``(cfg) -> ViewFn``, called once per trainer or evaluation with
  the run's settings; the :class:`ViewFn` maps a batch to one random view of the same
  shape, dtype and device, drawing its randomness from the CPU generator it is given
  (so a seed fixes the views on any device).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # torch is imported where a plug-in runs, not where a setting is parsed
    import torch
    from torch import Tensor

    from common.config import TrainConfig
    from common.datasets import Dataset
    from common.encoders import ContrastiveModel

KINDS = ("dataset", "encoder", "views")

#: Built-in plug-ins: short names for import paths, resolved like any other.
BUILTINS: dict[str, dict[str, str]] = {
    "dataset": {
        "digits": "common.datasets:digits",
        "synthetic": "common.datasets:synthetic",
        "cifar10": "common.datasets:cifar10",
        "dna": "common.examples.dna:genomes",
    },
    "encoder": {
        "cnn": "common.encoders:cnn",
        "resnet18": "common.encoders:resnet18",
        "cnn1d": "common.examples.dna:encoder",
    },
    "views": {
        "images": "common.augment:image_views",
        "digits": "common.augment:digit_views",
        "dna": "common.examples.dna:views",
    },
}

_IDENT = r"[A-Za-z_]\w*"
_DOTTED = rf"{_IDENT}(?:\.{_IDENT})*"
#: ``package.module:name``, and for datasets an optional ``:ARG`` after it.
_IMPORT_PATH = re.compile(rf"(?P<module>{_DOTTED}):(?P<attr>{_DOTTED})(?::(?P<arg>.*))?", re.S)

_PROTOCOLS = {
    "dataset": "DatasetFactory(arg: str, *, seed: int) -> Dataset",
    "encoder": "EncoderFactory(in_channels: int, *, embedding_dim: int, norm: str, "
               "width: int | None) -> ContrastiveModel",
    "views": "ViewFactory(cfg: TrainConfig) -> ViewFn, a ViewFn being "
             "(x: Tensor, generator: torch.Generator | None) -> Tensor of x's shape, dtype, device",
}


class PluginError(ValueError):
    """A plug-in could not be resolved or broke its contract; the message names both."""


class DatasetFactory(Protocol):
    """Makes a labelled dataset in memory (see the module docstring for the contract)."""

    def __call__(self, arg: str, *, seed: int) -> Dataset:
        """``arg``: the text after ``NAME:`` (may be empty); ``seed``: the run's seed."""
        ...


class EncoderFactory(Protocol):
    """Builds a :class:`~common.encoders.ContrastiveModel` for items with ``in_channels`` channels."""

    def __call__(
        self, in_channels: int, *, embedding_dim: int, norm: str, width: int | None
    ) -> ContrastiveModel:
        """``width`` is the base width (``None``: the factory's default); ``norm`` see
        :func:`common.encoders.make_norm` (GroupNorm keeps DP-SGD possible)."""
        ...


class ViewFn(Protocol):
    """One random view per item of a batch."""

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x (N, C, ...) -> a view (N, C, ...) of the same shape, dtype and device."""
        ...


class ViewFactory(Protocol):
    """Makes the run's :class:`ViewFn` from its settings (``crop_scale_min``, ...)."""

    def __call__(self, cfg: TrainConfig) -> ViewFn: ...


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown plug-in kind {kind!r}: one of {', '.join(KINDS)}")


def builtin_names(kind: str) -> tuple[str, ...]:
    """The short names of ``kind``'s built-ins, sorted."""
    _check_kind(kind)
    return tuple(sorted(BUILTINS[kind]))


def _usage(kind: str) -> str:
    form = ("NAME[:ARG] or package.module:name[:ARG]" if kind == "dataset"
            else "a built-in name or an import path package.module:name")
    return (f"{form}; built-ins: {', '.join(builtin_names(kind))}; a plug-in follows "
            f"{_PROTOCOLS[kind]} (see common/plugins.py)")


def parse(kind: str, spec: str) -> tuple[str, str] | None:
    """Split ``spec`` into (import path ``module:attr``, argument).

    Returns ``None`` when ``spec`` is neither a built-in name nor an import path (for a
    dataset: a file or folder path, which :func:`common.datasets.load_dataset` reads).
    Only datasets take an argument (``synthetic:500``, ``package.module:name:ARG``).

    Raises:
        PluginError: an encoder or views spec that is neither, or an argument given to
            an encoder or views.
    """
    _check_kind(kind)
    head, sep, rest = spec.partition(":")
    if head in BUILTINS[kind]:
        if sep and kind != "dataset":
            raise PluginError(f"--{kind} {spec!r}: only datasets take an argument after "
                              f"the name; expected {_usage(kind)}")
        return BUILTINS[kind][head], rest
    match = _IMPORT_PATH.fullmatch(spec)
    if match is not None and (kind == "dataset" or match["arg"] is None):
        return f"{match['module']}:{match['attr']}", match["arg"] or ""
    if kind == "dataset":
        return None
    raise PluginError(f"--{kind} {spec!r} is neither a built-in {kind} nor an import path: "
                      f"expected {_usage(kind)}")


def _load(kind: str, spec: str, target: str) -> Any:
    module_name, attr = target.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # an import runs arbitrary code: report whatever it raised
        hint = ("" if "." in module_name or kind != "dataset" else
                f" ({module_name!r} is not a built-in dataset either: "
                f"{', '.join(builtin_names(kind))})")
        raise PluginError(
            f"--{kind} {spec!r}: cannot import module {module_name!r} "
            f"({type(exc).__name__}: {exc}){hint}. The module must be importable in every "
            "process of the run: install its package, or put it under common/ for flwr run"
        ) from exc
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([module_name, *attr.split(".")[:i]])
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=3)
            suggestion = f"; did you mean {', '.join(close)}?" if close else ""
            raise PluginError(f"--{kind} {spec!r}: {owner!r} has no attribute {part!r}"
                              f"{suggestion} (expected {_PROTOCOLS[kind]})")
        obj = getattr(obj, part)
    return obj


#: How each kind is called, to check a plug-in's signature before any work is done.
_SAMPLE_CALL: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "dataset": (("",), {"seed": 0}),
    "encoder": ((1,), {"embedding_dim": 1, "norm": "group", "width": None}),
    "views": ((None,), {}),
}


def resolve(kind: str, spec: str) -> Callable[..., Any]:
    """The factory that ``spec`` names (for a dataset spec with an argument, see :func:`parse`).

    Raises:
        PluginError: an unknown name, a module that cannot be imported, a missing
            attribute, or an object that cannot be called the way ``kind`` is called.
    """
    parsed = parse(kind, spec)
    if parsed is None:
        raise PluginError(f"--{kind} {spec!r} is not a plug-in: expected {_usage(kind)}")
    obj = _load(kind, spec, parsed[0])
    if not callable(obj):
        raise PluginError(f"--{kind} {spec!r} is a {type(obj).__name__}, not callable; "
                          f"expected {_PROTOCOLS[kind]}")
    args, kwargs = _SAMPLE_CALL[kind]
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have none: trust the call
        return obj
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise PluginError(f"--{kind} {spec!r} has the signature {signature}, which cannot "
                          f"be called as {_PROTOCOLS[kind]} ({exc})") from exc
    return obj


#: ``--views auto``: the views a built-in dataset comes with (by its name before any
#: ``:ARG``); any other dataset gets ``images``.
DATASET_VIEWS = {"digits": "digits", "dna": "dna"}


def views_for(cfg: TrainConfig) -> str:
    """The views a run uses: ``cfg.views``, with ``auto`` resolved by the dataset."""
    if cfg.views != "auto":
        return cfg.views
    return DATASET_VIEWS.get(cfg.dataset.split(":", 1)[0], "images")


def check(kind: str, spec: str) -> None:
    """Resolve ``spec`` without calling it (a dataset path is left to the loader)."""
    if (kind == "dataset" and parse(kind, spec) is None) or (kind == "views" and spec == "auto"):
        return
    resolve(kind, spec)


class CheckedViews:
    """A :class:`ViewFn` that holds its plug-in to the contract on every call.

    The checks cost a few attribute reads; a view of the wrong shape would otherwise
    fail deep inside the encoder with a message that names neither.
    """

    def __init__(self, fn: ViewFn, spec: str) -> None:
        self.fn = fn
        self.spec = spec

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x (N, C, ...) -> a view of the same shape, dtype and device."""
        from torch import Tensor

        out = self.fn(x, generator)
        if not isinstance(out, Tensor):
            raise PluginError(f"--views {self.spec!r} returned a {type(out).__name__} for a "
                              f"batch {_describe(x)}; expected a Tensor of the batch's shape, "
                              "dtype and device")
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise PluginError(f"--views {self.spec!r} returned {_describe(out)} for a batch "
                              f"{_describe(x)}; a view must keep the batch's shape, dtype and "
                              "device (pad or resize crops back to the item shape)")
        return out


def _describe(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)} on {t.device}"


def make_views(cfg: TrainConfig) -> ViewFn:
    """The run's view function (``spec``, :func:`views_for`), checked on every call."""
    spec = views_for(cfg)
    factory: ViewFactory = resolve("views", spec)
    try:
        fn = factory(cfg)
    except Exception as exc:  # the plug-in's own code: name it, keep the cause
        raise PluginError(
            f"--views {spec!r}: calling it with the run's settings raised "
            f"{type(exc).__name__}: {exc}. It must be a factory, {_PROTOCOLS['views']}: "
            "a view function itself is not (wrap it: def views(cfg): return my_views)"
        ) from exc
    if not callable(fn):
        raise PluginError(f"--views {spec!r} returned a {type(fn).__name__} when called "
                          f"with the run's settings; expected {_PROTOCOLS['views']} (a view "
                          "function itself is not a factory: wrap it, def views(cfg): return "
                          "my_views)")
    return CheckedViews(fn, spec)
