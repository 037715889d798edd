"""The digits-cnn example's data and architecture, shared by tools/train_digits.py (which made the
shipped ONNX model) and the training studies of edgecomp.train.

Splits (deterministic, stratified, seed 0): 20% test; from the remaining 80%, 256 samples are held
out as the quantization calibration set and the rest is used for training.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SPLIT_SEED", "N_CALIB", "load_digits_splits", "digits_model", "trained_digits_model"]

SPLIT_SEED = 0
N_CALIB = 256


def load_digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return {"train","calib","test"} -> (x [N,1,8,8] float32, y [N] int64). Needs scikit-learn."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=SPLIT_SEED)
    x_train, x_calib, y_train, y_calib = train_test_split(
        x_rest, y_rest, test_size=N_CALIB, stratify=y_rest, random_state=SPLIT_SEED)
    return {"train": (x_train, y_train), "calib": (x_calib, y_calib), "test": (x_test, y_test)}


def digits_model() -> Any:
    """The digits-cnn architecture (38,282 params): conv 1→16, conv 16→32, maxpool, fc 512→64→10."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),  # -> 32x4x4
        nn.Flatten(),
        nn.Linear(512, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def trained_digits_model() -> Any:
    """digits_model() with the shipped example's trained weights (its ONNX initializers are in
    state_dict order): the fp32 teacher and baseline of the digits studies."""
    import onnx
    import torch
    from onnx import numpy_helper

    from edgecomp.examples import get_example

    proto = onnx.load(str(get_example("digits").model_path))
    model = digits_model()
    arrays = [numpy_helper.to_array(t) for t in proto.graph.initializer]
    keys = list(model.state_dict())
    if [tuple(a.shape) for a in arrays] != [tuple(v.shape) for v in model.state_dict().values()]:
        raise RuntimeError("the shipped digits model no longer matches digits_model()'s layers")
    model.load_state_dict({k: torch.from_numpy(a.copy()) for k, a in zip(keys, arrays)})
    return model.eval()
