"""``edgecomp inspect``: what a model is made of, before any pass touches it.

Inputs/outputs, an op histogram, parameters (initializers; Constant-node tensors counted apart)
and the multiply-accumulates of every contraction layer (Conv, ConvTranspose, Gemm, MatMul),
from ONNX shape inference on the model with its dynamic dims fixed (given, or assumed 1).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from edgecomp.importer import default_opset, fix_input_shapes, graph_inputs, graph_outputs

__all__ = ["LayerCost", "ModelSummary", "summarize", "layer_macs"]


@dataclasses.dataclass
class LayerCost:
    node: str
    op: str
    weight_shape: list[int] | None
    output_shape: list[int] | None
    params: int
    macs: int | None  # None when shapes are unknown

    @property
    def flops(self) -> int | None:
        return None if self.macs is None else 2 * self.macs


@dataclasses.dataclass
class ModelSummary:
    inputs: list[dict]
    outputs: list[dict]
    assumed_dims: dict[str, list[int]]
    opset: int
    ops: dict[str, int]
    nodes: int
    params: int
    param_bytes: int
    initializers: int
    constant_params: int
    layers: list[LayerCost]

    @property
    def total_macs(self) -> int:
        return sum(layer.macs or 0 for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for layer, ld in zip(self.layers, d["layers"]):
            ld["flops"] = layer.flops
        d["total_macs"] = self.total_macs
        d["total_flops"] = 2 * self.total_macs
        return d


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def layer_macs(node: onnx.NodeProto, shapes: dict[str, list], attrs: dict[str, Any]) -> int | None:
    """Multiply-accumulates of one contraction node, or None if a shape is unknown."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        w, y, x = shapes.get(node.input[1]), shapes.get(node.output[0]), shapes.get(node.input[0])
        if not (_known(w) and _known(y) and _known(x)):
            return None
        k = int(np.prod(w[2:]))
        if op == "Conv":  # W: [Cout, Cin/g, k...]; every output element needs Cin/g * k MACs
            return int(np.prod(y)) * w[1] * k
        # ConvTranspose W: [Cin, Cout/g, k...]; every input element scatters Cout/g * k MACs
        return int(np.prod(x)) * w[1] * k
    if op == "Gemm":
        a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not (_known(a) and _known(y)):
            return None
        kdim = a[0] if attrs.get("transA", 0) else a[1]
        return int(np.prod(y)) * kdim
    if op in ("MatMul", "MatMulInteger"):
        a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not (_known(a) and _known(y)):
            return None
        return int(np.prod(y)) * a[-1]
    return None


CONTRACTIONS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulInteger")


def summarize(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> ModelSummary:
    input_shapes = dict(input_shapes or {})
    assumed: dict[str, list[int]] = {}
    for spec in graph_inputs(model):
        if spec.name not in input_shapes and not spec.is_static:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
            input_shapes[spec.name] = tuple(shape)
            assumed[spec.name] = shape
    fixed = fix_input_shapes(model, input_shapes)
    try:
        inferred = shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:
        inferred = fixed
    shapes: dict[str, list] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    inits = {t.name: t for t in model.graph.initializer}
    for name, t in inits.items():
        shapes[name] = list(t.dims)

    ops = collections.Counter(n.op_type for n in model.graph.node)
    params = sum(int(np.prod(t.dims)) for t in inits.values())
    param_bytes = sum(numpy_helper.to_array(t).nbytes for t in inits.values())
    constant_params = 0
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    constant_params += int(np.prod(a.t.dims))

    layers = []
    for n in inferred.graph.node:
        if n.op_type not in CONTRACTIONS:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        weight = next((i for i in n.input[1:] if i in inits), None)
        n_params = sum(int(np.prod(inits[i].dims)) for i in n.input if i in inits)
        layers.append(
            LayerCost(
                node=n.name or n.output[0],
                op=n.op_type,
                weight_shape=list(inits[weight].dims) if weight else None,
                output_shape=shapes.get(n.output[0]),
                params=n_params,
                macs=layer_macs(n, shapes, attrs),
            )
        )
    return ModelSummary(
        inputs=[s.to_json() for s in graph_inputs(model)],
        outputs=[s.to_json() for s in graph_outputs(model)],
        assumed_dims=assumed,
        opset=default_opset(model),
        ops=dict(ops.most_common()),
        nodes=len(model.graph.node),
        params=params,
        param_bytes=param_bytes,
        initializers=len(inits),
        constant_params=constant_params,
        layers=layers,
    )
