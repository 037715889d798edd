"""Reference inputs: the samples every stage of a build is checked on.

Users give real data (``.npz``, one array per input name, either one sample of the input's exact
shape or a stack of samples along a new leading axis); otherwise deterministic random samples are
drawn (standard normal for floats, small non-negative integers for ids, coin flips for bools).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from edgecomp.errors import InputError
from edgecomp.importer import TensorSpec
from edgecomp.numerics import Samples

__all__ = ["coerce_dtype", "random_samples", "samples_from_arrays", "load_npz", "load_samples_npz", "stack_samples"]


def coerce_dtype(arr: np.ndarray, dtype: object, source: str, name: str) -> np.ndarray:
    """``arr`` as the input's dtype: within a kind (float64 → float32, int32 → int64) it is cast;
    across kinds (float data for int token ids) it is a one-line error naming ``source`` and input."""
    want = np.dtype(dtype)
    if arr.dtype == want:
        return arr
    if arr.dtype.kind == want.kind or (arr.dtype.kind in "iu" and want.kind in "iu"):
        return arr.astype(want)
    raise InputError(f"{source}: input {name!r} has dtype {arr.dtype}, the model wants {want}")


def random_samples(specs: Sequence[TensorSpec], count: int = 8, seed: int = 0) -> Samples:
    """``count`` deterministic random feeds for static input ``specs``."""
    rng = np.random.default_rng(seed)
    samples: Samples = []
    for _ in range(count):
        feed = {}
        for spec in specs:
            shape = tuple(int(d) for d in spec.shape)
            dtype = np.dtype(spec.dtype)
            if dtype.kind == "f":
                feed[spec.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind in "iu":
                feed[spec.name] = rng.integers(0, 10, size=shape).astype(dtype)
            elif dtype.kind == "b":
                feed[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                raise InputError(f"input {spec.name!r}: cannot make random data of dtype {dtype}")
        samples.append(feed)
    return samples


def samples_from_arrays(arrays: dict[str, np.ndarray], specs: Sequence[TensorSpec], source: str) -> Samples:
    """Split user arrays into per-sample feeds, checking names, shapes and dtypes."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputError(f"{source}: no array for input(s) {', '.join(missing)} (has: {', '.join(arrays) or 'none'})")
    counts = {}
    for spec in specs:
        arr = arrays[spec.name]
        shape = tuple(int(d) for d in spec.shape)
        arr = coerce_dtype(arr, spec.dtype, source, spec.name)
        if arr.shape == shape:
            arr = arr[None]
        elif arr.shape[1:] != shape:
            raise InputError(
                f"{source}: input {spec.name!r} has shape {list(arr.shape)}; the model wants "
                f"{list(shape)} (or a stack of them, [K, {', '.join(map(str, shape))}])"
            )
        counts[spec.name] = arr.shape[0]
        arrays = {**arrays, spec.name: arr}
    if len(set(counts.values())) > 1:
        raise InputError(f"{source}: inputs hold different numbers of samples: {counts}")
    k = next(iter(counts.values()), 0)
    if k == 0:
        raise InputError(f"{source}: holds no samples")
    return [{n: np.asarray(arrays[n][i], order="C") for n in names} for i in range(k)]


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of a user's ``.npz`` (no pickles), or a one-line InputError."""
    if not os.path.isfile(path):
        raise InputError(f"input file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as err:
        raise InputError(f"{path} is not a readable .npz file ({str(err).splitlines()[0][:200]})") from None


def load_samples_npz(path: str | os.PathLike, specs: Sequence[TensorSpec]) -> Samples:
    return samples_from_arrays(load_npz(path), specs, str(path))


def stack_samples(names: Sequence[str], per_sample: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-sample output lists → one stacked array per name (leading axis = sample)."""
    return {n: np.stack([s[i] for s in per_sample]) for i, n in enumerate(names)}
