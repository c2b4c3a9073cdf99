"""Image classification sets generated in the exact file formats (IDX), for the tests."""

from __future__ import annotations

import gzip
import os

import numpy as np


def idx_bytes(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_file(path, payload: bytes, gz: bool) -> None:
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(payload)
    else:
        with open(path, "wb") as fh:
            fh.write(payload)


def blobs(n: int, seed: int, d: int = 784, classes: int = 10):
    """Separable synthetic images: each class brightens its own band of pixels."""
    g = np.random.default_rng(seed)
    y = g.integers(0, classes, n)
    x = g.integers(0, 60, (n, d))
    band = d // classes
    for i, c in enumerate(y):
        x[i, c * band:(c + 1) * band] += 150
    return x.clip(0, 255).astype(np.uint8), y.astype(np.uint8)


def make_idx_set(folder, n_train=512, n_test=128, gz=True, seed=0):
    os.makedirs(folder, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        x, y = blobs(n, s)
        write_file(os.path.join(folder, f"{split}-images-idx3-ubyte"), idx_bytes(x.reshape(n, 28, 28)), gz)
        write_file(os.path.join(folder, f"{split}-labels-idx1-ubyte"), idx_bytes(y), gz)
    return str(folder)
