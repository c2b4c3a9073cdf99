"""Image classification sets read from files: Fashion-MNIST, MNIST (IDX) and CIFAR-10.

Every reader checks the format it expects and raises :class:`ImageDataError` (a
``ValueError``) naming the file and what is wrong with it: wrong magic number, a
truncated or over-long file, a label outside the classes, image and label counts
that differ. Nothing is downloaded.

- Fashion-MNIST / MNIST: the four IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
  each raw or gzip-compressed (``.gz``).
- CIFAR-10: the binary version (``cifar-10-batches-bin``: ``data_batch_1.bin`` ..
  ``data_batch_5.bin``, ``test_batch.bin``; records of 1 label byte + 3072 pixel bytes),
  or the python version (``cifar-10-batches-py``) through :class:`RestrictedUnpickler`,
  which builds nothing but dicts, lists, strings, numbers and numpy arrays.

Pixels are returned as ``uint8`` ``[N, D]`` (``D = 784`` or ``3072``, in the files'
order: CIFAR's is channel-major ``[3, 32, 32]``); the model divides by 255.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ImageDataError", "ImageData", "DATASETS", "DEFAULT_DIRS", "read_idx", "load_idx_set",
           "load_cifar10", "load_image_data", "RestrictedUnpickler", "default_data_dir"]


class ImageDataError(ValueError):
    """A missing or malformed image data set (the message names the file and the problem)."""


@dataclass
class ImageData:
    """A classification set: ``train_x: uint8 [N, D]``, ``train_y: int64 [N]``, same for test."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    image_shape: tuple[int, ...]
    num_classes: int

    @property
    def in_features(self) -> int:
        return int(self.train_x.shape[1])


#: dataset name -> (format, number of classes, image shape)
DATASETS = {
    "fashion-mnist": ("idx", 10, (28, 28)),
    "mnist": ("idx", 10, (28, 28)),
    "cifar10": ("cifar10", 10, (3, 32, 32)),
}

#: where a distribution's package installs a set (Debian's ``dataset-fashion-mnist``);
#: used when ``--data`` is not given and the folder exists.
DEFAULT_DIRS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}

_WHERE = {
    "fashion-mnist": "https://github.com/zalandoresearch/fashion-mnist (or Debian's package dataset-fashion-mnist, "
                     "which installs them under /usr/share/datasets/fashion-mnist)",
    "mnist": "http://yann.lecun.com/exdb/mnist/ (the same four IDX files, gz or raw)",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html (the binary version, cifar-10-binary.tar.gz, unpacked)",
}

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def default_data_dir(dataset: str) -> str | None:
    """The distribution folder of ``dataset`` when it exists here, else None."""
    d = DEFAULT_DIRS.get(dataset)
    return d if d is not None and os.path.isdir(d) else None


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        with open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ImageDataError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


def read_idx(path: str, ndim: int) -> np.ndarray:
    """The ``uint8`` array of an IDX file with ``ndim`` dimensions (magic ``0x0000 08 ndim``).

    Raises :class:`ImageDataError` for another magic number (e.g. a labels file where
    images are expected), a header shorter than its dimensions, or a body shorter or
    longer than the dimensions say.
    """
    raw = _read_bytes(path)
    expected = bytes([0, 0, 0x08, ndim])
    if len(raw) < 4 or raw[:4] != expected:
        got = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise ImageDataError(f"{path}: not an IDX file of {ndim}-d unsigned bytes (magic {got}, "
                             f"expected {expected.hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ImageDataError(f"{path}: truncated header ({len(raw)} bytes, needs {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    body = len(raw) - header
    if body != size:
        what = "truncated" if body < size else "longer than its header says"
        raise ImageDataError(f"{path}: {what} ({body} data bytes for dimensions {dims}, expected {size})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(folder: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(stem)


def _labels(y: np.ndarray, num_classes: int, path: str) -> torch.Tensor:
    if y.size and int(y.max()) >= num_classes:
        bad = int(np.argmax(y >= num_classes))
        raise ImageDataError(f"{path}: label {int(y[bad])} at index {bad} is outside 0..{num_classes - 1}")
    return torch.from_numpy(y.astype(np.int64))


def load_idx_set(folder: str, name: str = "fashion-mnist", num_classes: int = 10) -> ImageData:
    """Fashion-MNIST or MNIST from ``folder`` (the four IDX files, raw or ``.gz``)."""
    parts = {}
    for split, (img_stem, lab_stem) in _IDX_FILES.items():
        try:
            img_path, lab_path = _find(folder, img_stem), _find(folder, lab_stem)
        except FileNotFoundError as exc:
            raise ImageDataError(f"{name}: {folder} has no {exc.args[0]}[.gz]; get the four IDX files from "
                                 f"{_WHERE.get(name, 'the data set publisher')} and pass their folder "
                                 "with --data") from None
        x = read_idx(img_path, 3)
        y = read_idx(lab_path, 1)
        if x.shape[0] != y.shape[0]:
            raise ImageDataError(f"{name}: {img_path} holds {x.shape[0]} images but {lab_path} "
                                 f"{y.shape[0]} labels")
        if x.shape[1:] != (28, 28):
            raise ImageDataError(f"{img_path}: images are {x.shape[1]}x{x.shape[2]}, expected 28x28")
        parts[split] = (torch.from_numpy(x.reshape(x.shape[0], -1).copy()), _labels(y, num_classes, lab_path))
    return ImageData(name, *parts["train"], *parts["test"], (28, 28), num_classes)


_CIFAR_RECORD = 1 + 3072
_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers and numpy arrays.

    ``find_class`` allows numpy's array reconstruction (``_reconstruct``, ``ndarray``,
    ``dtype``) and nothing else, so a pickle cannot name (and call) any other function.
    """

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (only numpy arrays and plain data)")


def _cifar_py_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path)
    try:
        d = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ImageDataError(f"{path}: not a CIFAR-10 python batch ({exc})") from None
    if not isinstance(d, dict):
        raise ImageDataError(f"{path}: holds a {type(d).__name__}, not a CIFAR-10 batch dict")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ImageDataError(f"{path}: 'data' must be a uint8 array [N, 3072]")
    if not isinstance(labels, (list, np.ndarray)) or not all(isinstance(v, (int, np.integer)) for v in labels):
        raise ImageDataError(f"{path}: 'labels' must be a list of integers")
    y = np.asarray(labels, dtype=np.int64)
    if y.shape[0] != data.shape[0]:
        raise ImageDataError(f"{path}: {data.shape[0]} images but {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() > 255):
        raise ImageDataError(f"{path}: label {int(y.max() if y.max() > 255 else y.min())} is outside 0..9")
    return data, y.astype(np.uint8)


def _cifar_bin_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
        raise ImageDataError(f"{path}: {len(raw)} bytes is not a whole number of {_CIFAR_RECORD}-byte "
                             "CIFAR-10 records (truncated, or not the binary version)")
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    return rec[:, 1:], rec[:, 0]


def load_cifar10(folder: str) -> ImageData:
    """CIFAR-10 from ``folder``: the binary batches (``*.bin``), in ``folder`` or its
    ``cifar-10-batches-bin``; else the python batches (``cifar-10-batches-py``) through
    :class:`RestrictedUnpickler`."""
    for sub, ext, reader in (("", ".bin", _cifar_bin_batch), ("cifar-10-batches-bin", ".bin", _cifar_bin_batch),
                             ("cifar-10-batches-py", "", _cifar_py_batch), ("", "", _cifar_py_batch)):
        d = os.path.join(folder, sub)
        names = _CIFAR_TRAIN + ["test_batch"]
        if all(os.path.isfile(os.path.join(d, n + ext)) for n in names):
            parts = []
            for group in (_CIFAR_TRAIN, ["test_batch"]):
                xs, ys = zip(*(reader(os.path.join(d, n + ext)) for n in group))
                y = np.concatenate(ys)
                path = os.path.join(d, group[0] + ext)
                parts += [torch.from_numpy(np.concatenate(xs).copy()), _labels(y, 10, path)]
            return ImageData("cifar10", *parts, (3, 32, 32), 10)
    raise ImageDataError(f"cifar10: {folder} holds neither data_batch_1..5.bin + test_batch.bin nor the python "
                         f"batches; get them from {_WHERE['cifar10']} and pass the folder with --data")


def load_image_data(dataset: str, data_dir: str | None = None) -> ImageData:
    """Load ``dataset`` (a :data:`DATASETS` name) from ``data_dir``, or from its
    distribution folder (:data:`DEFAULT_DIRS`) when ``data_dir`` is None."""
    if dataset not in DATASETS:
        raise ImageDataError(f"--dataset {dataset!r}: choose from {sorted(DATASETS)}")
    fmt, classes, _ = DATASETS[dataset]
    if data_dir is None:
        data_dir = default_data_dir(dataset)
        if data_dir is None:
            raise ImageDataError(f"{dataset}: no --data folder given and none installed; get the files from "
                                 f"{_WHERE[dataset]} and pass their folder with --data DIR")
    if not os.path.isdir(data_dir):
        raise ImageDataError(f"--data {data_dir}: folder not found (the {dataset} files come from "
                             f"{_WHERE[dataset]})")
    if fmt == "idx":
        return load_idx_set(data_dir, dataset, classes)
    return load_cifar10(data_dir)
