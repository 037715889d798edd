"""Size and accuracy after every compression stage (the survey's integration: low rank, pruning,
int8, entropy coding in one pipeline), for one model and one recipe.

Each stage is the real pass applied to the output of the one before; after each, the graph is
scored on the model's evaluation split with ONNX Runtime and its weights are measured three ways:
parameter bytes in memory, the bundle's ``weights.npz`` as it would be written, and the coded
file (``passes/entropy_code.py``) with its Shannon bound. The last row is the real bundle built by
``edgecomp.build`` with the whole recipe (its code verified against ORT on the final graph).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from edgecomp.numerics import Samples, run_ort
from edgecomp.passes import PassContext, make_passes
from edgecomp.passes.base import count_params
from edgecomp.passes.entropy_code import encode

__all__ = ["Stage", "Recipe", "run_recipe", "weights_of"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Recipe:
    """A named sequence of passes with the settings they need (``PassContext`` minus calib)."""

    name: str
    passes: Sequence[str]
    context: dict[str, Any]
    entropy: str = "zstd"


@dataclasses.dataclass
class Stage:
    stage: str
    params: int
    param_bytes: int
    npz_bytes: int
    coded_bytes: int
    bound_bytes: int
    metric: float
    metrics: dict[str, float]
    seconds: float


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The initializers as the bundle stores them (one array each)."""
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def _npz_bytes(arrays: dict[str, np.ndarray]) -> int:
    buf = io.BytesIO()
    np.savez(buf, **{f"p{i:04d}": a for i, a in enumerate(arrays.values())})
    return len(buf.getvalue())


def _measure(stage: str, proto: onnx.ModelProto, score: Callable[[list], dict[str, float]], headline: str,
             eval_feeds: Samples, seconds: float, entropy: str) -> Stage:
    arrays = weights_of(proto)
    _, report = encode(arrays, entropy)
    metrics = score(run_ort(proto, eval_feeds, [o.name for o in proto.graph.output]))
    params, nbytes = count_params(ir.serde.deserialize_model(proto))
    return Stage(stage, params, nbytes, _npz_bytes(arrays), report["coded_bytes"], report["bound_bytes"],
                 float(metrics[headline]), metrics, round(seconds, 2))


def run_recipe(
    model: onnx.ModelProto,
    recipe: Recipe,
    calib: Samples,
    eval_feeds: Samples,
    score: Callable[[list], dict[str, float]],
    headline: str,
    progress: Callable[[str], None] = lambda s: None,
) -> list[Stage]:
    """Apply the recipe's passes one by one; a ``Stage`` after the cleanup and after each pass."""
    ctx = PassContext(calib=calib, **recipe.context)
    irm = ir.serde.deserialize_model(model)
    t0 = time.perf_counter()
    for _, p in make_passes("shape,fold,dce,shape", ctx):
        irm = p(irm).model
    proto = ir.serde.serialize_model(irm)
    stages = [_measure("fp32 (cleaned)", proto, score, headline, eval_feeds, time.perf_counter() - t0, recipe.entropy)]
    progress(_line(stages[-1]))
    for name, p in make_passes(list(recipe.passes), ctx):
        t0 = time.perf_counter()
        irm = p(irm).model
        if name != "shape":
            irm = make_passes("shape")[0][1](irm).model
        proto = ir.serde.serialize_model(irm)
        stages.append(_measure(name, proto, score, headline, eval_feeds, time.perf_counter() - t0, recipe.entropy))
        progress(_line(stages[-1]))
    return stages


def _line(s: Stage) -> str:
    return (f"{s.stage:<16} params {s.params:>11,}  npz {s.npz_bytes:>11,} B  coded "
            f"{s.coded_bytes:>11,} B (bound {s.bound_bytes:,})  metric {s.metric:.4f}  ({s.seconds:.1f} s)")


def bundle_row(path: str | Path, recipe: Recipe, calib_npz: Path, eval_npz: Path, out: Path) -> dict[str, Any]:
    """Build the real bundle for the recipe (host target) and return its sizes and checks."""
    import edgecomp
    from edgecomp.bench.runner import BENCH_ACCURACY

    t0 = time.perf_counter()
    res = edgecomp.build(
        path, target="host", output=out, calib=calib_npz, reference_inputs=eval_npz, num_samples=8,
        passes=",".join(["shape", "fold", "dce", "shape", *recipe.passes]), entropy=recipe.entropy,
        accuracy=BENCH_ACCURACY, force=True, **recipe.context,
    )
    files = res.manifest["files"]
    weights = res.manifest["runtime"]["weights"]
    return {
        "weights_file": weights,
        "weights_bytes": files[weights]["bytes"],
        "code_bytes": files["model.so"]["bytes"],
        "entropy": {k: v for k, v in (res.manifest.get("entropy_coding") or {}).items() if k != "tensors"},
        "verified": res.manifest["verification"]["numerics"]["ok"],
        "build_s": round(time.perf_counter() - t0, 1),
        "graph": res.graph,
    }
