"""Turn model tensors into a 2-D feature matrix, the shape every monitor statistic works on.

* rank 1 ``[rows]``: one feature;
* rank 2 ``[rows, d]``: ``d`` features (one per column);
* rank 3+ (images): per channel, the mean and the standard deviation of each row's pixels, so a window of
  images becomes ``[rows, 2 * channels]``. The channel axis is axis 1 (NCHW) unless the last axis looks
  like channels (size 1, 3 or 4) and axis 1 does not.

The same function runs at build time (profile) and at serving time (drift, out-of-distribution score), so
the reference and the window always describe the same quantities.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

TensorKind = Literal["tabular", "image"]

_CHANNEL_SIZES = (1, 3, 4)


def tensor_kind(shape: tuple[int, ...]) -> TensorKind:
    return "image" if len(shape) >= 3 else "tabular"


def channel_axis(shape: tuple[int, ...]) -> int:
    """The channel axis of an image batch: 1 for NCHW, the last for NHWC, none (-1 → 1 channel) for NHW."""
    if len(shape) == 3:
        return -1
    if shape[1] in _CHANNEL_SIZES or shape[-1] not in _CHANNEL_SIZES:
        return 1
    return len(shape) - 1


def _as_channels(array: np.ndarray) -> np.ndarray:
    """[rows, channels, pixels] view of an image batch."""
    axis = channel_axis(array.shape)
    if axis == -1:
        return array.reshape(array.shape[0], 1, -1)
    moved = np.moveaxis(array, axis, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


def feature_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """The names of the features :func:`featurize` makes from a tensor of this (batch) shape."""
    if len(shape) <= 1:
        return [name]
    if len(shape) == 2:
        return [f"{name}[{j}]" for j in range(shape[1])]
    axis = channel_axis(shape)
    channels = 1 if axis == -1 else shape[axis]
    return [f"{name}[c{c}].{stat}" for c in range(channels) for stat in ("mean", "std")]


def featurize(array: np.ndarray) -> np.ndarray:
    """A float ``[rows, features]`` matrix from one tensor batch (see the module docstring)."""
    a = np.asarray(array)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim == 1:
        return a.astype(np.float64).reshape(-1, 1)
    if a.ndim == 2:
        # float32 stays float32 (no copy): the drift binning compares in the window's own precision.
        return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)
    chans = _as_channels(a).astype(np.float64, copy=False)
    mean = chans.mean(axis=2)
    std = chans.std(axis=2)
    out = np.empty((a.shape[0], 2 * mean.shape[1]), dtype=np.float64)
    out[:, 0::2] = mean
    out[:, 1::2] = std
    return out


def channel_pixels(array: np.ndarray) -> list[np.ndarray]:
    """Every pixel value of each channel, flattened (for the image summary in the profile)."""
    chans = _as_channels(np.asarray(array))
    return [chans[:, c, :].reshape(-1).astype(np.float64) for c in range(chans.shape[1])]
