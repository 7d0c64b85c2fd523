"""Datasets: the embedded digits split, and torchvision loaders (error path and wiring on fake files)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from demem_ext.training.data import DATASETS, load_dataset, load_digits


def test_digits_shapes_range_labels():
    train, test, info = load_digits(seed=0)
    assert (len(train), len(test)) == (1198, 599)
    assert (info.name, info.num_classes, info.input_shape) == ("digits", 10, (1, 8, 8))
    assert info.input_range == (0.0, 1.0)
    for ds in (train, test):
        assert ds.inputs.shape[1:] == (1, 8, 8) and ds.inputs.dtype == torch.float32
        assert ds.targets.dtype == torch.int64 and set(ds.targets.tolist()) == set(range(10))
        assert ds.inputs.min() == 0.0 and ds.inputs.max() == 1.0
    x, y, i = train[5]
    assert x.shape == (1, 8, 8) and y.dtype == torch.int64 and i == 5


def test_digits_split_is_stratified_disjoint_and_seeded():
    train, test, _ = load_digits(seed=0)
    assert set(train.source_indices.tolist()).isdisjoint(test.source_indices.tolist())
    assert len(set(train.source_indices.tolist()) | set(test.source_indices.tolist())) == 1797
    share = torch.bincount(test.targets, minlength=10) / torch.bincount(
        torch.cat([train.targets, test.targets]), minlength=10)
    assert torch.all((share - 1 / 3).abs() < 0.02)
    again, _, _ = load_digits(seed=0)
    other, _, _ = load_digits(seed=1)
    assert torch.equal(again.source_indices, train.source_indices) and torch.equal(again.inputs, train.inputs)
    assert not torch.equal(other.source_indices, train.source_indices)
    small_train, small_test, _ = load_digits(seed=0, test_fraction=0.1)
    assert (len(small_train), len(small_test)) == (1617, 180)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


def test_digits_loader_yields_indices():
    train, _, _ = load_dataset("digits", seed=3)
    loader = DataLoader(train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    x, y, idx = next(iter(loader))
    assert x.shape == (16, 1, 8, 8) and y.dtype == torch.int64 and idx.dtype == torch.int64
    assert torch.equal(train.inputs[idx], x) and torch.equal(train.targets[idx], y)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="choose one of.*digits.*cifar10.*cifar100.*svhn"):
        load_dataset("mnist")
    assert set(DATASETS) == {"digits", "cifar10", "cifar100", "svhn"}


@pytest.mark.parametrize(("name", "expected"), [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", "train_32x32.mat"),
])
def test_missing_torchvision_dataset_names_data_dir(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and expected in message and "--download" in message


def _fake_cifar(root: Path, name: str, n: int = 6) -> None:
    """Tiny CIFAR files in torchvision's on-disk format (pickled dicts of uint8 rows)."""
    rng = np.random.default_rng(0)
    folder, files, label_key, meta, names_key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                    "labels", "batches.meta", "label_names"),
        "cifar100": ("cifar-100-python", ["train", "test"], "fine_labels", "meta", "fine_label_names"),
    }[name]
    num_classes = 10 if name == "cifar10" else 100
    (root / folder).mkdir(parents=True)
    for f in files:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, num_classes, n).tolist()}
        (root / folder / f).write_bytes(pickle.dumps(entry))
    (root / folder / meta).write_bytes(pickle.dumps({names_key: [str(c) for c in range(num_classes)]}))


def _fake_svhn(root: Path, n: int = 5) -> None:
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        savemat(root / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                              "y": np.array([[10], [1], [2], [3], [10]][:n], dtype=np.uint8)})


@pytest.fixture()
def skip_md5(monkeypatch):
    """torchvision checks md5 sums of the real files; for fakes, check only that the files exist."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    exists = lambda fpath, md5=None: Path(fpath).is_file()  # noqa: E731
    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(svhn, "check_integrity", exists)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_torchvision_wiring_on_fake_files(tmp_path, skip_md5, name):
    if name == "svhn":
        _fake_svhn(tmp_path)
    else:
        _fake_cifar(tmp_path, name)
    train, test, info = load_dataset(name, data_dir=tmp_path)
    assert info.input_shape == (3, 32, 32) and info.num_classes == (100 if name == "cifar100" else 10)
    assert len(train) == (30 if name == "cifar10" else 5 if name == "svhn" else 6)
    x, y, i = train[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert y.dtype == torch.int64 and i == 2 and y == train.targets[2]
    raw = torch.from_numpy(train.base.data[2])  # uint8; torchvision keeps CIFAR as HWC, SVHN as CHW
    assert torch.equal((x * 255).round().to(torch.uint8), raw if name == "svhn" else raw.permute(2, 0, 1))
    xb, yb, ib = next(iter(DataLoader(test, batch_size=4)))
    assert xb.shape == (4, 3, 32, 32) and torch.equal(ib, torch.arange(4))
    assert torch.equal(yb, test.targets[:4])
    if name == "svhn":
        assert train.targets.tolist() == [0, 1, 2, 3, 0]  # SVHN's label 10 is the digit 0


@pytest.mark.parametrize(("name", "flip"), [("cifar10", True), ("svhn", False)])
def test_augmentation_switch(tmp_path, skip_md5, name, flip):
    if name == "svhn":
        _fake_svhn(tmp_path)
    else:
        _fake_cifar(tmp_path, name)
    train, test, _ = load_dataset(name, data_dir=tmp_path, augment=True)
    kinds = [type(t) for t in train.base.transform.transforms]
    assert transforms.RandomCrop in kinds and (transforms.RandomHorizontalFlip in kinds) == flip
    assert isinstance(test.base.transform, transforms.ToTensor)
    plain, _, _ = load_dataset(name, data_dir=tmp_path, augment=False)
    assert isinstance(plain.base.transform, transforms.ToTensor)
    assert train[0][0].shape == (3, 32, 32)


def test_corrupted_files_fail_integrity_check(tmp_path):
    _fake_cifar(tmp_path, "cifar10")  # right names, wrong md5 sums
    with pytest.raises(ValueError, match="integrity") as err:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(tmp_path) in str(err.value)
