"""Datasets: the bundled digits, .npz archives (validated), CIFAR-10 python batches, subsets."""

from __future__ import annotations

import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from common.datasets import DatasetError, load_dataset, stratified_split, subset


def write_npz(path: Path, **overrides: object) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (12, 5, 6, 3), dtype=np.uint8),
        "y_train": np.arange(12) % 3,
        "x_test": rng.integers(0, 256, (6, 5, 6, 3), dtype=np.uint8),
        "y_test": np.arange(6) % 3,
        "class_names": np.array(["a", "b", "c"]),
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_digits_is_1x8x8_in_unit_range_with_ten_classes() -> None:
    ds = load_dataset("digits")
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.x_train.dtype == torch.float32
    assert (ds.in_channels, ds.image_size, ds.num_classes) == (1, (8, 8), 10)
    assert len(ds.y_train) + len(ds.y_test) == 1797 and abs(len(ds.y_test) / 1797 - 0.2) < 0.01
    assert ds.x_train.min() == 0 and ds.x_train.max() == 1
    assert ds.y_train.dtype == torch.int64
    assert set(ds.y_test.tolist()) == set(range(10))


def test_digits_split_is_deterministic_per_seed() -> None:
    a, b, c = (
        load_dataset("digits", seed=1),
        load_dataset("digits", seed=1),
        load_dataset("digits", seed=2),
    )
    assert torch.equal(a.y_train, b.y_train) and torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.y_train, c.y_train)


def test_digits_are_sklearns_images_and_split_read_without_importing_sklearn() -> None:
    """Digits keeps the data and the split of every recorded figure (sklearn's
    ``load_digits`` and stratified ``train_test_split``) without sklearn's 2 s of imports."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    for seed in (0, 1, 7):
        ds = load_dataset("digits", seed=seed)
        idx_train, idx_test = train_test_split(np.arange(1797), test_size=0.2,
                                               stratify=bunch.target, random_state=seed)
        assert torch.equal(ds.x_train[:, 0].double(), torch.from_numpy(bunch.images[idx_train] / 16))
        assert torch.equal(ds.y_test, torch.from_numpy(bunch.target[idx_test]).long())
    code = ("import sys; from common.datasets import load_dataset; load_dataset('digits'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1], timeout=120)
    assert out.stdout.strip() == "[]"


def test_digits_fall_back_to_load_digits_when_the_file_is_not_where_sklearn_kept_it(monkeypatch):
    import importlib.util

    from common import datasets

    direct = datasets._digits_arrays()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    fallback = datasets._digits_arrays()
    assert all(np.array_equal(a, b) for a, b in zip(direct, fallback, strict=True))


@pytest.mark.parametrize("seed", range(6))
def test_stratified_split_draws_as_sklearn_does_ties_included(seed: int) -> None:
    """Small uneven classes leave remainders to share out, which sklearn breaks at random."""
    from sklearn.model_selection import train_test_split

    labels = np.random.default_rng(seed).integers(0, 7, size=101)
    for fraction in (0.2, 0.33):
        ours = stratified_split(labels, test_fraction=fraction, seed=seed)
        theirs = train_test_split(np.arange(101), test_size=fraction, stratify=labels,
                                  random_state=seed)
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_stratified_split_refuses_a_class_it_cannot_share() -> None:
    with pytest.raises(DatasetError, match="smallest class 1"):
        stratified_split(np.array([0, 0, 0, 1, 1, 1, 2]), test_fraction=0.3, seed=0)


def test_npz_round_trip_hwc(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "tiny.npz")
    ds = load_dataset(str(path))
    raw = np.load(path)
    assert ds.name == "tiny" and ds.class_names == ("a", "b", "c")
    assert ds.x_train.shape == (12, 3, 5, 6) and ds.image_size == (5, 6)
    torch.testing.assert_close(
        ds.x_train, torch.from_numpy(raw["x_train"]).permute(0, 3, 1, 2).float() / 255
    )
    assert ds.y_test.tolist() == raw["y_test"].tolist()


def test_npz_round_trip_grayscale_hw_without_class_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = write_npz(
        tmp_path / "gray.npz",
        x_train=rng.integers(0, 256, (12, 7, 7), dtype=np.uint8),
        x_test=rng.integers(0, 256, (6, 7, 7), dtype=np.uint8),
        class_names=None,
    )
    ds = load_dataset(str(path))
    assert ds.x_train.shape == (12, 1, 7, 7) and ds.in_channels == 1
    assert ds.class_names == ("0", "1", "2")
    torch.testing.assert_close(
        ds.x_test[:, 0], torch.from_numpy(np.load(path)["x_test"]).float() / 255
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"y_test": None}, "missing arrays y_test"),
        ({"x_train": np.zeros((12, 5, 6, 3), dtype=np.float32)}, "expected uint8"),
        ({"y_train": np.zeros(11, dtype=np.int64)}, "11 labels for 12 images"),
        ({"y_test": np.full(6, 3)}, "label 3 is out of range"),
        ({"y_train": -np.ones(12, dtype=np.int64)}, "negative label"),
        ({"x_test": np.zeros((6, 4, 4, 3), dtype=np.uint8)}, "must share"),
        ({"x_train": np.zeros((12, 2, 5, 6, 3), dtype=np.uint8)}, "expected \\(N, H, W, C\\)"),
    ],
    ids=[
        "missing-key",
        "float-pixels",
        "length-mismatch",
        "label-range",
        "negative-label",
        "image-size",
        "ndim",
    ],
)
def test_malformed_npz_is_refused(tmp_path: Path, overrides: dict, message: str) -> None:
    path = write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(path))


def test_a_file_that_is_not_a_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "text.npz"
    path.write_text("not an archive")
    with pytest.raises(DatasetError, match="not an .npz archive") as caught:
        load_dataset(str(path))
    assert "allow_pickle" not in str(caught.value)  # never advise an unsafe load


def test_pickled_object_arrays_are_not_loaded(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "objects.npz", class_names=np.array(["a", "b", None], dtype=object))
    with pytest.raises(DatasetError, match="without pickle") as caught:
        load_dataset(str(path))
    assert "allow_pickle" not in str(caught.value)


@pytest.mark.parametrize("spec", ["missing.npz", "cifar10:/no/such/folder", "./no/such/folder"])
def test_missing_file_or_folder(tmp_path: Path, spec: str) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(spec if spec.startswith("cifar10:") else str(tmp_path / spec))


def test_unknown_name_lists_the_builtins() -> None:
    with pytest.raises(DatasetError, match="digits"):
        load_dataset("imagenet")


def write_cifar_folder(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 3, 9, 1]}
        (folder / name).write_bytes(
            pickle.dumps(batch, protocol=2)
        )  # the published batches are protocol 2
    return folder


def test_cifar10_batches_load_from_a_folder(tmp_path: Path) -> None:
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py")
    for spec in (f"cifar10:{folder}", str(folder)):
        ds = load_dataset(spec)
        assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
        assert ds.num_classes == 10 and ds.class_names[0] == "airplane"
    raw = pickle.loads((folder / "data_batch_1").read_bytes())[b"data"]
    torch.testing.assert_close(
        ds.x_train[0], torch.from_numpy(raw[0].reshape(3, 32, 32)).float() / 255
    )


def test_cifar10_batches_refuse_arbitrary_globals(tmp_path: Path) -> None:
    folder = write_cifar_folder(tmp_path / "cifar")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": print, b"labels": []}))
    with pytest.raises(DatasetError, match="refusing to load builtins.print"):
        load_dataset(str(folder))


def test_folder_without_batches_says_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data_batch_1..5 and test_batch"):
        load_dataset(str(tmp_path))


def test_subset_is_stratified_shuffled_and_deterministic() -> None:
    ds = load_dataset("digits")
    # Sort the test split by class, as the CIFAR-10 benchmark file stores it.
    order = torch.argsort(ds.y_test, stable=True)
    sorted_ds = replace(ds, x_test=ds.x_test[order], y_test=ds.y_test[order])
    small = subset(sorted_ds, 500, 100, seed=3)
    assert (len(small.y_train), len(small.y_test)) == (500, 100)
    share = torch.bincount(ds.y_test, minlength=10) * 100 / len(ds.y_test)
    assert (torch.bincount(small.y_test, minlength=10) - share).abs().max() <= 1
    assert not torch.equal(small.y_test, small.y_test.sort().values)
    assert torch.equal(small.x_train, subset(sorted_ds, 500, 100, seed=3).x_train)
    with pytest.raises(DatasetError, match="n_test"):
        subset(ds, 10, 10_000)
