"""Datasets as in-memory tensors: sklearn digits, any ``.npz`` archive, CIFAR-10 batches, plug-ins.

Nothing here downloads. ``digits`` ships with scikit-learn; generated data (``synthetic``,
``dna``) is made from the seed; every other dataset is a file or folder the user already
has. Items are images (N, C, H, W) for the image built-ins and whatever a plug-in makes
otherwise, e.g. one-hot DNA sequences (N, 4, L) (:mod:`common.examples.dna`).

Spec strings understood by :func:`load_dataset`:

- ``digits``: sklearn's 8x8 handwritten digits (1,797 images, 10 classes).
- ``path/to/file.npz``: arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (images
  uint8, (N, H, W, C) or (N, H, W); labels integer (N,)) and optionally ``class_names``
  (a string array), read with ``allow_pickle=False``.
- ``cifar10:path/to/folder``, or a folder path: the CIFAR-10 "python version" batches
  ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (Krizhevsky 2009).
- ``synthetic:N``: N generated 8x8 grayscale training images (and N/5 test images)
  of 10 classes, each a noisy, shifted copy of its class's smooth template. Tiny data
  for scale tests (1,000 clients x 50 examples is ``synthetic:50000``).
- ``dna`` or ``dna:KEY=VALUE,...``: synthetic genomes (:func:`common.examples.dna.genomes`).
- ``package.module:name`` or ``package.module:name:ARG``: a plug-in
  :class:`~common.plugins.DatasetFactory`, called as ``name(ARG, seed=seed)``.

The built-in names resolve through :mod:`common.plugins` like any import path.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import pickle
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common import plugins

logger = logging.getLogger(__name__)

BUILTINS = ("digits", "synthetic:N", "dna[:KEY=VALUE,...]")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class DatasetError(ValueError):
    """A dataset could not be loaded; the message says what is wrong and what is expected."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled dataset held in memory.

    Attributes:
        name: where it came from (``digits``, the npz file's stem, ``cifar10``, ``dna``).
        x_train: (N, C, ...) float32: images (N, C, H, W) in [0, 1] for the image
            datasets, one-hot sequences (N, 4, L) for ``dna``; a plug-in's own layout.
        y_train: (N,) int64 class indices.
        x_test: (M, C, ...) float32, the item shape of ``x_train``.
        y_test: (M,) int64 class indices.
        class_names: one name per class, in label order.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of image items."""
        if self.x_train.ndim != 4:
            raise AttributeError(f"{self.name} items are {tuple(self.x_train.shape[1:])}, "
                                 "not images (C, H, W)")
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])


def load_dataset(spec: str, *, seed: int = 0) -> Dataset:
    """Load a dataset by name, import path or file path (see the module docstring).

    Args:
        spec: a built-in (``digits``, ``synthetic:N``, ``cifar10:<folder>``, ``dna[:...]``),
            ``package.module:name[:ARG]`` of a :class:`~common.plugins.DatasetFactory`,
            a ``.npz`` path or a CIFAR-10 folder path.
        seed: seeds generated data and the train/test split of ``digits`` (files carry
            their own split).

    Raises:
        DatasetError: missing file or folder, malformed contents, an unknown name, or a
            plug-in that returns something else than the Dataset contract.
        PluginError: a plug-in that cannot be imported or called.
    """
    parsed = plugins.parse("dataset", spec)
    if parsed is not None:
        factory: plugins.DatasetFactory = plugins.resolve("dataset", spec)
        return check_dataset(factory(parsed[1], seed=seed), spec)
    path = Path(spec).expanduser()
    if spec.endswith(".npz"):
        if not path.is_file():
            raise DatasetError(
                f"no such file: {spec} (expected an .npz archive with arrays {', '.join(NPZ_KEYS)})"
            )
        return _load_npz(path)
    if path.is_dir():
        return _load_cifar10(path)
    if "/" in spec or "\\" in spec or spec.startswith("."):
        raise DatasetError(f"no such file or folder: {spec}")
    raise DatasetError(
        f"unknown dataset {spec!r}: use a built-in ({', '.join(BUILTINS)}), a path to an "
        ".npz file, cifar10:<folder with the CIFAR-10 python batches>, or the import path "
        "package.module:name[:ARG] of a DatasetFactory (see common/plugins.py)"
    )


def check_dataset(ds: object, source: str) -> Dataset:
    """Hold what a dataset factory returned to the :class:`Dataset` contract.

    Raises:
        DatasetError: naming ``source`` and the first field that breaks the contract.
    """
    if not isinstance(ds, Dataset):
        raise DatasetError(f"--dataset {source!r} returned a {type(ds).__name__}; a dataset "
                           "factory returns a common.datasets.Dataset")
    shapes = {}
    for split in ("train", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        if not isinstance(x, Tensor) or x.dtype != torch.float32 or x.ndim < 3:
            raise DatasetError(
                f"--dataset {source!r}: x_{split} is {_describe(x)}; expected a float32 tensor "
                "(N, C, ...) such as images (N, C, H, W) or sequences (N, C, L)")
        if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != (len(x),):
            raise DatasetError(
                f"--dataset {source!r}: y_{split} is {_describe(y)} for {len(x)} items; "
                "expected int64 labels (N,)")
        if len(y) and not 0 <= int(y.min()) <= int(y.max()) < len(ds.class_names):
            raise DatasetError(
                f"--dataset {source!r}: y_{split} has labels {int(y.min())}..{int(y.max())} for "
                f"{len(ds.class_names)} class_names; labels must be 0..len(class_names)-1")
        shapes[split] = tuple(x.shape[1:])
    if shapes["train"] != shapes["test"]:
        raise DatasetError(f"--dataset {source!r}: train items are {shapes['train']} but test "
                           f"items are {shapes['test']}; both splits must share the item shape")
    return ds


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"
    return f"a {type(t).__name__}"


def digits(arg: str, *, seed: int) -> Dataset:
    """The built-in ``digits``: sklearn's 8x8 handwritten digits, split 80/20 by ``seed``."""
    if arg:
        raise DatasetError(f"digits takes no argument, got digits:{arg}")
    return _load_digits(seed)


def synthetic(arg: str, *, seed: int) -> Dataset:
    """The built-in ``synthetic:N`` (see the module docstring)."""
    return _synthetic(f"synthetic:{arg}", seed)


def cifar10(arg: str, *, seed: int) -> Dataset:
    """The built-in ``cifar10:FOLDER``: the CIFAR-10 python batches (their own split)."""
    del seed  # the batches carry their split
    if not arg:
        raise DatasetError("cifar10 needs the folder of the python batches: cifar10:FOLDER")
    return _load_cifar10(Path(arg))


SYNTHETIC_MAX = 10_000_000


def _synthetic(spec: str, seed: int) -> Dataset:
    """``synthetic:N``: 10 classes of 8x8 images, templates fixed, samples drawn from ``seed``."""
    text = spec.removeprefix("synthetic:")
    if not text.isdigit() or not 10 <= int(text) <= SYNTHETIC_MAX:
        raise DatasetError(f"{spec!r}: expected synthetic:N with N a whole number in "
                           f"[10, {SYNTHETIC_MAX:,}] (training images; N/5 more for testing)")
    n_train = int(text)
    n_test = max(10, n_train // 5)
    templates = np.random.default_rng(20261123).random((10, 10, 10))  # smooth after cropping
    templates = (templates + np.roll(templates, 1, 1) + np.roll(templates, 1, 2)) / 3.0
    rng = np.random.default_rng(seed)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 10
        rng.shuffle(y)
        dy, dx = rng.integers(0, 3, n), rng.integers(0, 3, n)
        rows = dy[:, None] + np.arange(8)[None, :]  # n x 8
        cols = dx[:, None] + np.arange(8)[None, :]
        x = templates[y[:, None, None], rows[:, :, None], cols[:, None, :]]  # n x 8 x 8
        x = np.clip(x + rng.normal(0.0, 0.15, x.shape), 0.0, 1.0)
        return (x[..., None] * 255).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Dataset(
        name="synthetic",
        x_train=_images_to_tensor(x_train, 255.0), y_train=torch.from_numpy(y_train),
        x_test=_images_to_tensor(x_test, 255.0), y_test=torch.from_numpy(y_test),
        class_names=tuple(f"class-{i}" for i in range(10)),
    )


def _images_to_tensor(x: np.ndarray, scale: float) -> Tensor:
    """uint8-valued (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float().div_(scale)


def _load_digits(seed: int) -> Dataset:
    images, labels = _digits_arrays()
    idx_train, idx_test = stratified_split(labels, test_fraction=0.2, seed=seed)
    images = images[..., None]  # N x 8 x 8 x 1, values 0..16
    return Dataset(
        name="digits",
        x_train=_images_to_tensor(images[idx_train], 16.0),
        y_train=torch.from_numpy(labels[idx_train]),
        x_test=_images_to_tensor(images[idx_test], 16.0),
        y_test=torch.from_numpy(labels[idx_test]),
        class_names=tuple(str(c) for c in range(10)),
    )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits: images (1797, 8, 8) float64 in 0..16 and labels (1797,) int64.

    Read from the file scikit-learn ships, found without importing scikit-learn:
    ``sklearn.datasets`` imports SciPy and costs about 2 s, which every process that
    loads digits paid (deployment starts a ClientApp process for each message).
    ``load_digits`` reads the same file; it is the fallback should the file move.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package, runs none of it
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    csv = Path(roots[0], "datasets", "data", "digits.csv.gz") if roots else None
    if csv is None or not csv.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target.astype(np.int64)
    data = np.loadtxt(csv, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def stratified_split(labels: np.ndarray, *, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices, stratified by ``labels``, as scikit-learn draws them.

    The same indices as ``train_test_split(np.arange(N), test_size=test_fraction,
    stratify=labels, random_state=seed)`` (its StratifiedShuffleSplit draw, one
    ``RandomState(seed)`` throughout), so that digits keeps the split of every figure
    recorded before, without importing scikit-learn; a test holds the two equal.
    """
    n = len(labels)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    classes, y_idx, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.min() < 2 or min(n_train, n_test) < len(classes):
        raise DatasetError(f"cannot split {n} items of {len(classes)} classes (smallest class "
                           f"{counts.min()}) into {n_train} train and {n_test} test, stratified")
    by_class = np.split(np.argsort(y_idx, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(len(classes)):
        members = by_class[i].take(rng.permutation(counts[i]), mode="clip")
        train.extend(members[: n_i[i]])
        test.extend(members[n_i[i]: n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Items per class in a draw of ``n_draws``: proportional shares floored, the rest given
    to the largest remainders, ties broken by ``rng`` (scikit-learn's rule, same draws)."""
    continuous = counts / counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need -= add_now
            if need == 0:
                break
    return floored.astype(int)


def _check_images(name: str, x: np.ndarray, source: Path) -> np.ndarray:
    """Validate uint8 (N, H, W[, C]) images; return them as (N, H, W, C)."""
    if x.dtype != np.uint8:
        raise DatasetError(
            f"{source}: {name} has dtype {x.dtype}, expected uint8 pixel values 0..255"
        )
    if x.ndim == 3:
        return x[..., None]
    if x.ndim != 4:
        raise DatasetError(
            f"{source}: {name} has shape {x.shape}, expected (N, H, W, C) or (N, H, W)"
        )
    return x


def _check_labels(name: str, y: np.ndarray, n: int, source: Path) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(
            f"{source}: {name} is {y.dtype} of shape {y.shape}, expected integer labels (N,)"
        )
    if len(y) != n:
        raise DatasetError(
            f"{source}: {name} has {len(y)} labels for {n} images; lengths must match"
        )
    if len(y) and y.min() < 0:
        raise DatasetError(
            f"{source}: {name} has negative label {y.min()}; labels must be 0..num_classes-1"
        )
    return y.astype(np.int64)


#: The first bytes of a zip archive, which an .npz is (``numpy.savez``).
ZIP_MAGIC = b"PK\x03\x04"


def _load_npz(path: Path) -> Dataset:
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if head != ZIP_MAGIC:
        # np.load takes anything else for a pickle and would advise allow_pickle=True: unsafe
        raise DatasetError(
            f"{path}: not an .npz archive (a zip of arrays, as numpy.savez writes; this file "
            f"starts with {head!r}); write x_train, y_train, x_test, y_test with numpy.savez"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: not a readable .npz archive ({e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(
            f"{path}: holds a single array, expected an .npz archive with {', '.join(NPZ_KEYS)}"
        )
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise DatasetError(
                f"{path}: missing arrays {', '.join(missing)} (found {', '.join(archive.files) or 'none'}); "
                f"expected {', '.join(NPZ_KEYS)} and optionally class_names"
            )
        try:
            arrays = {k: archive[k] for k in archive.files if k in (*NPZ_KEYS, "class_names")}
        except ValueError as e:  # numpy's text advises allow_pickle=True: not quoted
            raise DatasetError(
                f"{path}: an array holds Python objects, which only an unsafe pickle load could "
                "read; this loader reads arrays without pickle: save numbers, and class names "
                "as a string array (dtype str)") from e
        except (OSError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{path}: an array could not be read ({e})") from e
    x_train = _check_images("x_train", arrays["x_train"], path)
    x_test = _check_images("x_test", arrays["x_test"], path)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(
            f"{path}: x_train images are {x_train.shape[1:]} but x_test images are {x_test.shape[1:]}; "
            "both splits must share (H, W, C)"
        )
    y_train = _check_labels("y_train", arrays["y_train"], len(x_train), path)
    y_test = _check_labels("y_test", arrays["y_test"], len(x_test), path)
    top = int(max(y_train.max(initial=-1), y_test.max(initial=-1)))
    if "class_names" in arrays:
        names = arrays["class_names"]
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DatasetError(
                f"{path}: class_names is {names.dtype} of shape {names.shape}, expected strings (C,)"
            )
        class_names = tuple(str(s) for s in names)
        if top >= len(class_names):
            raise DatasetError(
                f"{path}: label {top} is out of range for {len(class_names)} class_names; labels must be 0..C-1"
            )
    else:
        class_names = tuple(str(i) for i in range(top + 1))
    logger.info(
        "loaded %s: %d train, %d test, image %s", path, len(y_train), len(y_test), x_train.shape[1:]
    )
    return Dataset(
        name=path.stem,
        x_train=_images_to_tensor(x_train, 255.0),
        y_train=torch.from_numpy(y_train),
        x_test=_images_to_tensor(x_test, 255.0),
        y_test=torch.from_numpy(y_test),
        class_names=class_names,
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Refuses every global except what a pickled numpy array needs.

    The CIFAR-10 batches are pickles by format, and unpickling runs code named by the
    file; this narrows what a hostile file can reach, but load only folders you trust.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("_codecs", "encode"),  # how Python 3 writes bytes into a protocol-2 pickle
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset batch")
        return super().find_class(module, name)


def _read_batch(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable CIFAR-10 batch ({e})") from e
    if not isinstance(raw, dict):
        raise DatasetError(
            f"{path}: holds a {type(raw).__name__}, expected a dict with data and labels"
        )
    # Python 2 pickles (the published batches) have bytes keys; Python 3 ones have str keys.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_batch(path)
    if "data" not in batch or "labels" not in batch:
        raise DatasetError(
            f"{path}: keys {sorted(batch)}; expected 'data' (N x 3072 uint8) and 'labels'"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or len(labels) != len(data)
    ):
        raise DatasetError(
            f"{path}: data is {data.dtype} {data.shape} with {len(labels)} labels; "
            "expected uint8 (N, 3072) and N labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise DatasetError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # N x 32 x 32 x 3


def _load_cifar10(folder: Path) -> Dataset:
    """Read the CIFAR-10 python batches (pickles: load only folders you trust)."""
    if not folder.is_dir():
        raise DatasetError(
            f"no such file or folder: {folder} (expected the CIFAR-10 python batches)"
        )
    missing = [b for b in (*CIFAR10_TRAIN_BATCHES, "test_batch") if not (folder / b).is_file()]
    if missing:
        raise DatasetError(
            f"{folder}: missing {', '.join(missing)}; expected data_batch_1..5 and test_batch "
            "(the CIFAR-10 python version)"
        )
    parts = [_cifar_arrays(folder / b) for b in CIFAR10_TRAIN_BATCHES]
    x_test, y_test = _cifar_arrays(folder / "test_batch")
    logger.info("loaded CIFAR-10 batches from %s", folder)
    return Dataset(
        name="cifar10",
        x_train=_images_to_tensor(np.concatenate([x for x, _ in parts]), 255.0),
        y_train=torch.from_numpy(np.concatenate([y for _, y in parts])),
        x_test=_images_to_tensor(x_test, 255.0),
        y_test=torch.from_numpy(y_test),
        class_names=CIFAR10_CLASSES,
    )


def _stratified_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices drawn without replacement so that each class keeps its share (to within
    one sample), returned in random order."""
    order = rng.permutation(len(labels))
    ranked = labels[order]
    # Rank of each drawn index within its class, as a fraction of the class size:
    # taking the n smallest fractions takes the same share of every class.
    rank = np.empty(len(order), dtype=np.float64)
    for c in np.unique(ranked):
        members = np.flatnonzero(ranked == c)
        rank[members] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    chosen = order[np.argsort(rank, kind="stable")[:n]]
    return rng.permutation(chosen)


def subset(ds: Dataset, n_train: int, n_test: int, seed: int = 0) -> Dataset:
    """A stratified random subset, e.g. for benchmarks on a slice of CIFAR-10.

    Each split keeps its class proportions to within about one sample per class, and the
    result is in random order (a split stored sorted by class comes out shuffled).

    Raises:
        DatasetError: a size < 1 or larger than its split.
    """
    for split, n, total in (
        ("n_train", n_train, len(ds.y_train)),
        ("n_test", n_test, len(ds.y_test)),
    ):
        if not 1 <= n <= total:
            raise DatasetError(f"{split} must be in 1..{total} for {ds.name}, got {n}")
    rng = np.random.default_rng(seed)
    tr = torch.from_numpy(_stratified_sample(ds.y_train.numpy(), n_train, rng))
    te = torch.from_numpy(_stratified_sample(ds.y_test.numpy(), n_test, rng))
    return replace(
        ds,
        x_train=ds.x_train[tr],
        y_train=ds.y_train[tr],
        x_test=ds.x_test[te],
        y_test=ds.y_test[te],
    )
