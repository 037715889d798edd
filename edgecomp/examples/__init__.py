"""Example models shipped with edgecomp, so ``edgecomp build --example NAME`` works offline.

Each example is a folder with the ONNX model, ``meta.json`` (build shapes, labels, how it was made)
and labelled ``test.npz`` / ``calib.npz`` splits; ``tools/train_<name>.py`` recreates it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from edgecomp.errors import InputError

__all__ = ["Example", "get_example", "EXAMPLES"]

_HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Example:
    name: str
    folder: Path
    model_file: str
    meta: dict

    @property
    def model_path(self) -> Path:
        return self.folder / self.model_file

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.meta["shape"].items()}

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the ``test`` or ``calib`` split."""
        with np.load(self.folder / f"{name}.npz") as data:
            return data["x"], data["y"]


EXAMPLES = {"digits": ("digits", "digits_cnn.onnx")}


def get_example(name: str) -> Example:
    if name not in EXAMPLES:
        raise InputError(f"unknown example {name!r} (known examples: {', '.join(EXAMPLES)})")
    folder_name, model_file = EXAMPLES[name]
    folder = _HERE / folder_name
    meta = json.loads((folder / "meta.json").read_text())
    return Example(name, folder, model_file, meta)
