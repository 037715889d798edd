"""The pass pipeline: run graph passes, and after each one hold the model to ONNX Runtime.

Each pass works on an ``onnx_ir`` model in memory. After it, the pipeline serializes the model and
runs ORT on the reference samples. Two comparisons are recorded per pass:

- ``step``: against the stage before it. An exact pass (cleanup) must meet ``tolerance`` here.
- ``numerics``: against ORT's outputs of the *original* model. A lossy pass (``lossy = True``:
  low rank, pruning, quantization) must keep the model within the ``accuracy`` budget here.

A pass that breaks its rule stops the build with :class:`NumericsError` naming the pass.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from edgecomp.errors import EdgecompError, NumericsError, UnsupportedModelError
from edgecomp.numerics import Comparison, Samples, Tolerance, compare, run_ort
from edgecomp.passes import count_nodes, count_params
from edgecomp.progress import Progress

__all__ = ["PassRecord", "run_pipeline"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PassRecord:
    """One line of the pass log (stored in the bundle manifest and report)."""

    name: str
    modified: bool
    seconds: float
    nodes: tuple[int, int]
    params: tuple[int, int]
    param_bytes: tuple[int, int]
    lossy: bool
    stats: dict[str, Any]
    layers: list[dict[str, Any]]
    numerics: dict[str, Any]
    step: dict[str, Any]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def run_pipeline(
    model: onnx.ModelProto,
    passes: Sequence[tuple[str, ir.passes.PassBase]],
    samples: Samples,
    reference: list[list[np.ndarray]],
    output_names: Sequence[str],
    tolerance: Tolerance,
    accuracy: Tolerance | None = None,
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, list[PassRecord], list[list[np.ndarray]]]:
    """Run ``passes`` in order; returns the final model, one record per pass, and ORT's outputs
    of the final model on ``samples`` (``reference`` itself when no pass ran).

    ``tolerance`` is what an exact pass may change (vs the previous stage); ``accuracy`` how far a
    lossy pass may take the model from the original (default: ``tolerance``).
    """
    progress = progress or Progress(enabled=False)
    accuracy = accuracy or tolerance
    previous = reference
    irm = ir.serde.deserialize_model(model)
    records: list[PassRecord] = []
    for i, (name, p) in enumerate(passes, 1):
        with progress.stage(f"pass {i}/{len(passes)}: {name}"):
            nodes0, (params0, bytes0) = count_nodes(irm), count_params(irm)
            t0 = time.perf_counter()
            try:
                result = p(irm)
            except EdgecompError:
                raise
            except Exception as err:
                msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                raise UnsupportedModelError(f"pass {name!r} failed: {msg}") from err
            seconds = time.perf_counter() - t0
            irm = result.model
            proto = ir.serde.serialize_model(irm)
            got = run_ort(proto, samples, output_names)
            lossy = bool(getattr(p, "lossy", False))
            check: Comparison = compare(output_names, reference, got, accuracy if lossy else tolerance)
            step: Comparison = compare(output_names, previous, got, tolerance)
            previous = got
            record = PassRecord(
                name=name,
                modified=bool(result.modified),
                seconds=round(seconds, 4),
                nodes=(nodes0, count_nodes(irm)),
                params=(params0, count_params(irm)[0]),
                param_bytes=(bytes0, count_params(irm)[1]),
                lossy=lossy,
                stats=dict(getattr(result, "stats", {}) or {}),
                layers=list(getattr(result, "layers", []) or []),
                numerics=check.to_json(),
                step=step.to_json(),
            )
            records.append(record)
            log.info("pass %s: vs original %s", name, check.summary())
            if lossy and not check.ok:
                raise NumericsError(
                    f"pass {name!r} took the model past the accuracy budget: {'; '.join(check.failures)}"
                )
            if not lossy and not step.ok:
                raise NumericsError(
                    f"pass {name!r} changed the outputs past the tolerance: {'; '.join(step.failures)}"
                )
            if not lossy and not check.ok and not any(r.lossy for r in records):
                raise NumericsError(
                    f"pass {name!r} changed the outputs past the tolerance: {'; '.join(check.failures)}"
                )
    return ir.serde.serialize_model(irm), records, previous
