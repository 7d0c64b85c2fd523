"""Datasets that yield ``(x, y, index)``: scikit-learn's digits (embedded) and torchvision ones.

Inputs are float32 in [0, 1] (no mean/std normalisation, so attack budgets are in pixel units);
labels are int64; ``index`` is the sample's position in its dataset, for per-sample bookkeeping
(loss traces, membership labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

DATASETS = ("digits", "cifar10", "cifar100", "svhn")
DEFAULT_DATA_DIR = "data"


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and an attack need to know about a dataset."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    input_range: tuple[float, float] = (0.0, 1.0)


class IndexedTensorDataset(Dataset):
    """In-memory dataset of ``inputs[i], targets[i], i``.

    ``source_indices[i]`` is the sample's index in the full source dataset before any split.
    """

    def __init__(self, inputs: Tensor, targets: Tensor, source_indices: Tensor | None = None) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"inputs and targets differ in length: {len(inputs)} != {len(targets)}")
        self.inputs = inputs
        self.targets = targets
        self.source_indices = torch.arange(len(targets)) if source_indices is None else source_indices

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self.inputs[index], self.targets[index], index


class IndexedDataset(Dataset):
    """Wraps a dataset of ``(x, y)`` pairs so that it yields ``(x, targets[index], index)``."""

    def __init__(self, base: Dataset, targets: Tensor) -> None:
        self.base = base
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Tensor, int]:
        x, _ = self.base[index]
        return x, self.targets[index], index


def load_digits(seed: int = 0, test_fraction: float = 1 / 3
                ) -> tuple[IndexedTensorDataset, IndexedTensorDataset, DatasetInfo]:
    """scikit-learn's 1,797 8x8 digits as 1x8x8 float32 in [0, 1], split stratified by label.

    The split depends only on ``seed`` and ``test_fraction`` (1/3 gives 1,198 train / 599 test).
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = sklearn_digits()
    images = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    info = dataset_info("digits")
    return (IndexedTensorDataset(images[train_idx], labels[train_idx], train_idx),
            IndexedTensorDataset(images[test_idx], labels[test_idx], test_idx), info)


@dataclass(frozen=True)
class _VisionSpec:
    num_classes: int
    folder: str  # relative to data_dir; "" when the files lie directly in it
    files: tuple[str, ...]
    flip: bool  # horizontal flips are label-preserving (not for house numbers)


_VISION = {
    "cifar10": _VisionSpec(10, "cifar-10-batches-py",
                           tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
                           flip=True),
    "cifar100": _VisionSpec(100, "cifar-100-python", ("train", "test", "meta"), flip=True),
    "svhn": _VisionSpec(10, "", ("train_32x32.mat", "test_32x32.mat"), flip=False),
}


def _check_files(name: str, data_dir: Path) -> None:
    spec = _VISION[name]
    folder = data_dir / spec.folder
    missing = [f for f in spec.files if not (folder / f).is_file()]
    if missing:
        where = f"the folder {folder}" if spec.folder else f"{data_dir} itself"
        raise FileNotFoundError(
            f"{name} not found under data_dir={str(data_dir)!r}: torchvision expects the files "
            f"{', '.join(spec.files)} in {where} (missing: {', '.join(missing)}). "
            f"Pass download=True (`--download` on the command line) to fetch them where a network exists."
        )


def _vision_transforms(name: str, augment: bool) -> tuple[Any, Any]:
    from torchvision import transforms

    to_tensor = transforms.ToTensor()
    if not augment:
        return to_tensor, to_tensor
    steps = [transforms.RandomCrop(32, padding=4)]
    if _VISION[name].flip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose([*steps, to_tensor]), to_tensor


def load_torchvision(name: str, data_dir: str | Path | None = None, download: bool = False,
                     augment: bool = False) -> tuple[IndexedDataset, IndexedDataset, DatasetInfo]:
    """CIFAR-10, CIFAR-100 or SVHN from ``data_dir`` (default ``./data``) through torchvision.

    ``augment`` adds random 32x32 crops with 4 pixels of padding to the training set, and horizontal
    flips for CIFAR. Missing files raise ``FileNotFoundError`` unless ``download`` is set; files that fail
    torchvision's integrity check raise ``ValueError``.
    """
    from torchvision import datasets

    if name not in _VISION:
        raise ValueError(f"unknown torchvision dataset {name!r}; choose one of {sorted(_VISION)}")
    root = Path(DEFAULT_DATA_DIR if data_dir is None else data_dir)
    if not download:
        _check_files(name, root)
    train_tf, test_tf = _vision_transforms(name, augment)
    try:
        if name == "svhn":
            train = datasets.SVHN(str(root), split="train", transform=train_tf, download=download)
            test = datasets.SVHN(str(root), split="test", transform=test_tf, download=download)
            train_y, test_y = train.labels, test.labels
        else:
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            train = cls(str(root), train=True, transform=train_tf, download=download)
            test = cls(str(root), train=False, transform=test_tf, download=download)
            train_y, test_y = train.targets, test.targets
    except RuntimeError as exc:  # torchvision's "not found or corrupted" (md5 mismatch)
        raise ValueError(
            f"{name} under data_dir={str(root)!r} failed torchvision's integrity check ({exc}); "
            f"delete the files and fetch them again with download=True (`--download`)."
        ) from exc
    info = dataset_info(name)
    return (IndexedDataset(train, torch.as_tensor(np.asarray(train_y), dtype=torch.int64)),
            IndexedDataset(test, torch.as_tensor(np.asarray(test_y), dtype=torch.int64)), info)


def dataset_info(name: str) -> DatasetInfo:
    """The classes and input shape of a dataset, without loading it."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    if name == "digits":
        return DatasetInfo("digits", 10, (1, 8, 8))
    return DatasetInfo(name, _VISION[name].num_classes, (3, 32, 32))


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = False,
                 augment: bool = False, seed: int = 0) -> tuple[Dataset, Dataset, DatasetInfo]:
    """``(train, test, info)`` for "digits", "cifar10", "cifar100" or "svhn".

    ``seed`` fixes the digits split (the torchvision datasets have fixed official splits);
    ``data_dir``, ``download`` and ``augment`` apply to the torchvision datasets (digits are
    embedded and have no standard augmentation).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    if name == "digits":
        return load_digits(seed=seed)
    return load_torchvision(name, data_dir=data_dir, download=download, augment=augment)
