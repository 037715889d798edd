"""Import ONNX models as exporters really write them.

Checks the file before anything else touches it (exists, parses, passes the ONNX checker, external
data stays inside the model's folder), then fixes dynamic input dimensions from user-given shapes
so that shape inference, constant folding and TVM's importer see a static graph. The input file is
only ever read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import external_data_helper, helper

from edgecomp.errors import InputError, UnsupportedModelError

__all__ = [
    "TensorSpec",
    "MIN_OPSET",
    "load_onnx",
    "parse_input_shapes",
    "fix_input_shapes",
    "graph_inputs",
    "graph_outputs",
    "sha256_file",
]

MIN_OPSET = 11


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, shape and numpy dtype of a graph input or output (dims may be ``None`` or names)."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) and d > 0 for d in self.shape)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes of a graph and all its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Every external-data file must exist, be large enough, and live under the model's folder."""
    base = path.parent.resolve()
    for tensor in _all_tensors(model.graph):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = info.location or ""
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise InputError(
                f"{path}: tensor {tensor.name!r} points to external data {location!r} outside the "
                f"model's folder; refusing to read it"
            )
        if not target.is_file():
            raise InputError(
                f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing"
            )
        needed = (info.offset or 0) + (info.length or 0)
        if info.length and target.stat().st_size < needed:
            raise InputError(
                f"{path}: external data file {location!r} is truncated ({target.stat().st_size} "
                f"bytes, tensor {tensor.name!r} needs {needed})"
            )


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX model, with its external data, or raise a one-line InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not an ONNX model file")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise InputError(f"{path} is not a valid ONNX model (cannot parse: {_first_line(err)})") from None
    if model.ir_version == 0 or not model.HasField("graph") or not model.opset_import:
        raise InputError(f"{path} is not an ONNX model (no IR version, graph or opset)")
    _check_external_data(model, path)
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as err:
        raise InputError(f"{path}: cannot read external data ({_first_line(err)})") from None
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise InputError(f"{path} fails the ONNX checker: {_first_line(err)}") from None
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"{path} uses ONNX opset {opset}; edgecomp needs opset >= {MIN_OPSET} "
            f"(upgrade it with onnx.version_converter.convert_version)"
        )
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def parse_input_shapes(items: Iterable[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME=1,3,224,224`` strings (``x`` also accepted as separator)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        name, sep, dims = item.rpartition("=")
        if not sep or not name:
            raise InputError(f"--input-shape {item!r}: expected NAME=D1,D2,... (e.g. input=1,3,224,224)")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise InputError(f"--input-shape {item!r}: dimensions must be integers") from None
        if not shape or any(d <= 0 for d in shape):
            raise InputError(f"--input-shape {item!r}: dimensions must be positive integers")
        shapes[name] = shape
    return shapes


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | str | None, ...]:
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return ()
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _spec(value_info: onnx.ValueInfoProto) -> TensorSpec:
    tt = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type"):
        raise UnsupportedModelError(f"graph input/output {value_info.name!r} is not a tensor")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
    return TensorSpec(value_info.name, _dims(value_info), dtype)


def graph_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The real inputs of the graph (initializers listed as inputs are not inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [_spec(vi) for vi in model.graph.input if vi.name not in inits]


def graph_outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(vi) for vi in model.graph.output]


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs all have static shapes.

    Dynamic dims come from ``shapes``; a dynamic input without one is an error naming it. The
    output shapes are cleared so that shape inference recomputes them for the fixed inputs.
    """
    inputs = {spec.name: spec for spec in graph_inputs(model)}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise InputError(
            f"--input-shape names {', '.join(unknown)}, which the model does not have "
            f"(inputs: {', '.join(inputs)})"
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        if vi.name not in inputs:
            continue
        spec = inputs[vi.name]
        given = shapes.get(vi.name)
        if given is None:
            if not spec.is_static:
                shown = ",".join("?" if not isinstance(d, int) else str(d) for d in spec.shape)
                raise InputError(
                    f"input {vi.name!r} has dynamic shape [{shown}]: give it with "
                    f"--input-shape {vi.name}={','.join(str(d) if isinstance(d, int) else '1' for d in spec.shape)}"
                )
            continue
        if spec.shape and len(given) != len(spec.shape):
            raise InputError(
                f"--input-shape {vi.name}: rank {len(given)} but the model's input has rank "
                f"{len(spec.shape)} {list(spec.shape)}"
            )
        for i, (want, got) in enumerate(zip(spec.shape, given)):
            if isinstance(want, int) and want != got:
                raise InputError(
                    f"--input-shape {vi.name}: dim {i} is {got} but the model fixes it to {want}"
                )
        tt = vi.type.tensor_type
        tt.ClearField("shape")
        for d in given:
            tt.shape.dim.add().dim_value = d
    # Let shape inference recompute outputs/intermediates for the fixed input shapes.
    for vi in out.graph.output:
        elem = vi.type.tensor_type.elem_type
        vi.type.tensor_type.ClearField("shape")
        vi.type.tensor_type.elem_type = elem
    del out.graph.value_info[:]
    return out
