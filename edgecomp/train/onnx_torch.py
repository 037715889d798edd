"""ONNX → torch → ONNX for fine-tuning a compressed model.

Why not onnx2torch (1.5.15, the usual tool; measured 2026-11-27, see
bench/results/distill-2026-11-27.md): it imports torchvision at module load, and PyPI's torchvision
wheels are CUDA builds that fail to import beside the pinned CPU torch (``operator torchvision::nms
does not exist``), so it cannot even be imported here; and with that worked around, it turns MatMul
and Gather weights into constant buffers (MiniLM: 9,984 trainable values of 22,466,426: every
projection and the embedding table frozen; low-rank MatMul factors too), has no DequantizeLinear converter, and refuses Clip with
Constant-node bounds (MiniLM before constant folding).

So :class:`OnnxModule` runs the ONNX graph itself: one torch function per node, in the graph's
order, with the float initializers as ``nn.Parameter`` s. The graph stays the single source of
truth, which gives the way back for free: :func:`to_onnx` writes the trained parameters into the
source graph's initializers (structure, node and tensor names, opset, dynamic dims unchanged), or,
with ``how="export"``, traces the module with ``torch.onnx.export(dynamo=False)`` under the
source's input/output names and opset.

- Pruned weights stay pruned: a weight (≥ 2-D) with at least :data:`PRUNED_FRACTION` exact zeros
  gets a mask; :meth:`OnnxModule.apply_masks` (after each optimizer step) puts the zeros back.
- int8 (QDQ) graphs are refused: their weights are int8 initializers behind DequantizeLinear, which
  gradients cannot move; fine-tune the float model, then quantize (``--int8``).
- Models with a static batch of 1 (edgecomp's benchmark models) train in batches through
  :func:`batched`: ``torch.func.vmap`` over samples, each sample run at the graph's own shape.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecomp.errors import InputError, UnsupportedModelError
from edgecomp.train.common import require_torch

torch = require_torch()
F = torch.nn.functional

__all__ = ["OnnxModule", "Batched", "to_torch", "to_onnx", "batched", "SUPPORTED_OPS", "PRUNED_FRACTION", "QDQ_OPS"]

#: a weight with at least this fraction of exact zeros is treated as pruned (trained dense weights
#: have essentially none; edgecomp's prune pass leaves 10-90%)
PRUNED_FRACTION = 0.01

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                     "MatMulInteger", "ConvInteger", "QGemm", "QLinearAdd"})

# Inputs of these ops are statistics, not weights: never trained.
_FROZEN_INPUTS = {"BatchNormalization": (3, 4)}


# ----------------------------------------------------------------------------------------------
# Op handlers: (inputs, attrs, ctx) -> list of outputs. Inputs are tensors or None (omitted).
# ----------------------------------------------------------------------------------------------


def _dtype(onnx_type: int):
    return _TORCH_DTYPES[np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type))]


_TORCH_DTYPES = {
    np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64, np.dtype("float16"): torch.float16,
    np.dtype("int64"): torch.int64, np.dtype("int32"): torch.int32, np.dtype("int16"): torch.int16,
    np.dtype("int8"): torch.int8, np.dtype("uint8"): torch.uint8, np.dtype("bool"): torch.bool,
}


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)]


def _axes(x, i, a):
    """Axes from input ``i`` (newer opsets) or attribute ``axes`` (older), normalized."""
    axes = _ints(x[i]) if len(x) > i and x[i] is not None else a.get("axes")
    return None if axes is None else [ax % max(x[0].dim(), 1) if x[0].dim() else ax for ax in axes]


def _unary(fn):
    return lambda x, a, c: [fn(x[0])]


def _binary(fn):
    return lambda x, a, c: [fn(x[0], x[1])]


def _div(x, a, c):
    if not x[0].is_floating_point() and not x[1].is_floating_point():
        return [torch.div(x[0], x[1], rounding_mode="trunc")]
    return [x[0] / x[1]]


def _clip(x, a, c):
    lo = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    hi = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    y = x[0]
    if lo is not None:
        y = torch.clamp(y, min=lo if not torch.is_tensor(lo) else lo.to(y.dtype))
    if hi is not None:
        y = torch.clamp(y, max=hi if not torch.is_tensor(hi) else hi.to(y.dtype))
    return [y]


def _gemm(x, a, c):
    A, B = x[0], x[1]
    if a.get("transA", 0):
        A = A.transpose(0, 1)
    if a.get("transB", 0):
        B = B.transpose(0, 1)
    y = a.get("alpha", 1.0) * (A @ B)
    if len(x) > 2 and x[2] is not None:
        y = y + a.get("beta", 1.0) * x[2]
    return [y]


def _pads(a, spatial: int) -> list[int]:
    pads = a.get("pads") or [0] * (2 * spatial)
    return list(pads)


def _same_pads(in_sizes, kernel, strides, dilations, upper: bool) -> list[int]:
    begins, ends = [], []
    for n, k, s, d in zip(in_sizes, kernel, strides, dilations):
        out = math.ceil(n / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins + ends


def _conv_pads(x_shape, kernel, a) -> list[int]:
    spatial = len(kernel)
    strides = a.get("strides") or [1] * spatial
    dilations = a.get("dilations") or [1] * spatial
    auto = a.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(x_shape[2:], kernel, strides, dilations, auto == "SAME_UPPER")
    if auto == "VALID":
        return [0] * (2 * spatial)
    return _pads(a, spatial)


def _pad_input(x, pads: list[int], value: float = 0.0):
    """ONNX pads [b1, b2, ..., e1, e2, ...] applied with F.pad (last dim first)."""
    spatial = len(pads) // 2
    torch_pads: list[int] = []
    for i in reversed(range(spatial)):
        torch_pads += [pads[i], pads[i + spatial]]
    return F.pad(x, torch_pads, value=value)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv(x, a, c):
    w = x[1]
    kernel = list(w.shape[2:])
    spatial = len(kernel)
    if spatial not in _CONV:
        raise UnsupportedModelError(f"{c}: {spatial}-D convolution")
    pads = _conv_pads(x[0].shape, kernel, a)
    inp, padding = x[0], pads[:spatial]
    if pads[:spatial] != pads[spatial:]:
        inp, padding = _pad_input(inp, pads), [0] * spatial
    b = x[2] if len(x) > 2 else None
    return [_CONV[spatial](inp, w, b, stride=a.get("strides") or 1, padding=padding,
                           dilation=a.get("dilations") or 1, groups=a.get("group", 1))]


def _pool(kind: str):
    def run(x, a, c):
        kernel = list(a["kernel_shape"])
        spatial = len(kernel)
        if spatial not in (1, 2, 3):
            raise UnsupportedModelError(f"{c}: {spatial}-D pooling")
        strides = a.get("strides") or [1] * spatial
        pads = _conv_pads(x[0].shape, kernel, a)
        inp, padding = x[0], pads[:spatial]
        if pads[:spatial] != pads[spatial:] or any(2 * p > k for p, k in zip(padding, kernel)):
            if kind == "avg" and a.get("count_include_pad", 0) == 0 and any(pads):
                raise UnsupportedModelError(f"{c}: asymmetric padding with count_include_pad=0")
            inp, padding = _pad_input(inp, pads, -math.inf if kind == "max" else 0.0), [0] * spatial
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
            return [fn(inp, kernel, strides, padding, dilation=a.get("dilations") or 1, ceil_mode=ceil)]
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        return [fn(inp, kernel, strides, padding, ceil_mode=ceil, count_include_pad=bool(a.get("count_include_pad", 0)))]

    return run


def _global_pool(kind: str):
    def run(x, a, c):
        dims = tuple(range(2, x[0].dim()))
        return [x[0].mean(dims, keepdim=True) if kind == "avg" else x[0].amax(dims, keepdim=True)]

    return run


def _batchnorm(x, a, c):
    inp, scale, bias, mean, var = x[:5]
    shape = [1, -1] + [1] * (inp.dim() - 2)
    y = (inp - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + a.get("epsilon", 1e-5))
    return [y * scale.reshape(shape) + bias.reshape(shape)]


def _layernorm(x, a, c):
    axis = a.get("axis", -1) % x[0].dim()
    shape = tuple(int(d) for d in x[0].shape[axis:])  # static (normalized dims), even when traced
    w = x[1].expand(shape) if tuple(x[1].shape) != shape else x[1]
    b = x[2] if len(x) > 2 and x[2] is not None else None
    if b is not None and tuple(b.shape) != shape:
        b = b.expand(shape)
    return [F.layer_norm(x[0], shape, w, b, eps=a.get("epsilon", 1e-5))]


def _softmax(fn, opset_axis_default):
    def run(x, a, c):
        if c.opset >= 13:
            return [fn(x[0], dim=a.get("axis", -1))]
        axis = a.get("axis", opset_axis_default) % x[0].dim()  # before 13: coerced to 2-D at axis
        flat = x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)
        return [fn(flat, dim=1).reshape(x[0].shape)]

    return run


def _flatten(x, a, c):
    axis = a.get("axis", 1) % (x[0].dim() + 1) if x[0].dim() else 0
    if axis == 0:
        return [x[0].reshape(1, -1)]
    y = x[0].flatten(axis) if axis < x[0].dim() else x[0].unsqueeze(-1)
    return [y.flatten(0, axis - 1)]  # no sizes baked in: a traced dynamic batch stays dynamic


def _reshape(x, a, c):
    shape = _ints(x[1])
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x[0].reshape(shape)]


def _transpose(x, a, c):
    perm = a.get("perm") or list(reversed(range(x[0].dim())))
    return [x[0].permute(*perm)]


def _unsqueeze(x, a, c):
    axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else a["axes"]
    out_rank = x[0].dim() + len(axes)
    y = x[0]
    for ax in sorted(ax % out_rank for ax in axes):
        y = y.unsqueeze(ax)
    return [y]


def _squeeze(x, a, c):
    axes = _axes(x, 1, a)
    if axes is None:
        return [x[0].squeeze()]
    y = x[0]
    for ax in sorted(axes, reverse=True):
        y = y.squeeze(ax)
    return [y]


def _concat(x, a, c):
    return [torch.cat([t for t in x if t is not None], dim=a["axis"])]


def _split(x, a, c):
    axis = a.get("axis", 0)
    sizes = _ints(x[1]) if len(x) > 1 and x[1] is not None else a.get("split")
    if sizes is None:
        n = a.get("num_outputs") or c.num_outputs
        size = x[0].shape[axis]
        chunk = -(-size // n)
        sizes = [min(chunk, size - i * chunk) for i in range(n)]
    return list(torch.split(x[0], list(sizes), dim=axis))


def _slice(x, a, c):
    data = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * data.dim()
    flips = []
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax %= data.dim()
        n = data.shape[ax]
        if st > 0:
            s = max(0, min(n, s + n if s < 0 else s))
            e = max(0, min(n, e + n if e < 0 else e))
            index[ax] = slice(s, e, st)
        else:  # negative step: slice the reversed axis
            s = max(-1, min(n - 1, s + n if s < 0 else s))
            e = max(-1, min(n - 1, e + n if e < 0 else e))
            index[ax] = slice(n - 1 - s, n - 1 - e, -st)
            flips.append(ax)
    if flips:
        data = data.flip(flips)
    return [data[tuple(index)]]


def _gather(x, a, c):
    data, idx = x[0], x[1]
    axis = a.get("axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    if axis == 0 and data.dim() == 2 and data.is_floating_point():
        return [F.embedding(idx, data)]  # sparse-friendly backward into the table
    flat = data.index_select(axis, idx.reshape(-1))
    return [flat.reshape(*data.shape[:axis], *idx.shape, *data.shape[axis + 1:])]


def _shape(x, a, c):
    dims = list(x[0].shape)
    start = a.get("start", 0)
    end = a.get("end", len(dims))
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


def _cast(x, a, c):
    return [x[0].to(_dtype(a["to"]))]


def _constant_of_shape(x, a, c):
    value = a.get("value")
    fill = torch.from_numpy(numpy_helper.to_array(value).copy()) if value is not None else torch.zeros(1)
    return [torch.full(_ints(x[0]), fill.reshape(-1)[0].item(), dtype=fill.dtype)]


def _expand(x, a, c):
    shape = _ints(x[1])
    out = torch.broadcast_shapes(tuple(x[0].shape), tuple(shape))
    return [x[0].expand(out)]


def _where(x, a, c):
    return [torch.where(x[0], x[1], x[2])]


def _range(x, a, c):
    return [torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)]


def _tile(x, a, c):
    return [x[0].repeat(*_ints(x[1]))]


def _reduce(name: str):
    fns = {
        "ReduceSum": lambda t, d, k: t.sum(d, keepdim=k),
        "ReduceMean": lambda t, d, k: t.mean(d, keepdim=k),
        "ReduceMax": lambda t, d, k: t.amax(d, keepdim=k),
        "ReduceMin": lambda t, d, k: t.amin(d, keepdim=k),
        "ReduceProd": lambda t, d, k: _prod(t, d, k),
        "ReduceL2": lambda t, d, k: torch.sqrt((t * t).sum(d, keepdim=k)),
        "ReduceL1": lambda t, d, k: t.abs().sum(d, keepdim=k),
        "ReduceSumSquare": lambda t, d, k: (t * t).sum(d, keepdim=k),
        "ReduceLogSumExp": lambda t, d, k: torch.logsumexp(t, d, keepdim=k),
    }
    fn = fns[name]
    axes_as_input = 13 if name == "ReduceSum" else 18

    def run(x, a, c):
        axes = _axes(x, 1, a) if c.opset >= axes_as_input else a.get("axes")
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [x[0]]
            axes = list(range(x[0].dim()))
        return [fn(x[0], tuple(ax % x[0].dim() for ax in axes), keep)]

    return run


def _prod(t, dims, keep):
    for d in sorted(dims, reverse=True):
        t = t.prod(d, keepdim=keep)
    return t


def _variadic(fn):
    def run(x, a, c):
        y = x[0]
        for t in x[1:]:
            y = fn(y, t)
        return [y]

    return run


def _gelu(x, a, c):
    approx = a.get("approximate", "none")
    return [F.gelu(x[0], approximate=approx.decode() if isinstance(approx, bytes) else approx)]


def _pad(x, a, c):
    mode = a.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = _ints(x[1]) if len(x) > 1 and x[1] is not None else list(a["pads"])
    value = float(x[2].item()) if len(x) > 2 and x[2] is not None else float(a.get("value", 0.0))
    if len(x) > 3 and x[3] is not None:
        raise UnsupportedModelError(f"{c}: Pad with axes")
    rank = x[0].dim()
    torch_pads: list[int] = []
    for i in reversed(range(rank)):
        torch_pads += [pads[i], pads[i + rank]]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    if mode == "constant":
        return [F.pad(x[0], torch_pads, value=value)]
    return [F.pad(x[0], torch_pads, mode={"reflect": "reflect", "edge": "replicate"}[mode])]


_HANDLERS: dict[str, Callable] = {
    "Identity": _unary(lambda t: t),
    "Dropout": lambda x, a, c: [x[0]],  # inference graphs only: dropout is the identity
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
    "Pow": _binary(torch.pow), "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Exp": _unary(torch.exp),
    "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt), "Reciprocal": _unary(torch.reciprocal),
    "Erf": _unary(torch.erf), "Tanh": _unary(torch.tanh), "Sigmoid": _unary(torch.sigmoid),
    "Relu": _unary(F.relu), "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil),
    "LeakyRelu": lambda x, a, c: [F.leaky_relu(x[0], a.get("alpha", 0.01))],
    "Elu": lambda x, a, c: [F.elu(x[0], a.get("alpha", 1.0))],
    "HardSigmoid": lambda x, a, c: [torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0, 1)],
    "HardSwish": _unary(F.hardswish), "Softplus": _unary(F.softplus), "Gelu": _gelu,
    "Min": _variadic(torch.minimum), "Max": _variadic(torch.maximum), "Sum": _variadic(torch.add),
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le), "GreaterOrEqual": _binary(torch.ge),
    "Not": _unary(torch.logical_not), "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or),
    "Where": _where, "Clip": _clip, "MatMul": _binary(torch.matmul), "Gemm": _gemm, "Conv": _conv,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_pool("avg"), "GlobalMaxPool": _global_pool("max"),
    "BatchNormalization": _batchnorm, "LayerNormalization": _layernorm,
    "Softmax": _softmax(torch.softmax, 1), "LogSoftmax": _softmax(torch.log_softmax, 1),
    "Flatten": _flatten, "Reshape": _reshape, "Transpose": _transpose, "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze, "Concat": _concat, "Split": _split, "Slice": _slice, "Gather": _gather,
    "Shape": _shape, "Cast": _cast, "ConstantOfShape": _constant_of_shape, "Expand": _expand,
    "Range": _range, "Tile": _tile, "Pad": _pad,
    **{name: _reduce(name) for name in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                                        "ReduceL2", "ReduceL1", "ReduceSumSquare", "ReduceLogSumExp")},
}

#: ONNX ops (default domain) the converter runs; ``Constant`` is evaluated when the module is made
SUPPORTED_OPS = frozenset(_HANDLERS) | {"Constant"}


class _NodeCtx:
    """What a handler may need besides inputs and attributes (and its name, for errors)."""

    __slots__ = ("label", "opset", "num_outputs")

    def __init__(self, label: str, opset: int, num_outputs: int) -> None:
        self.label, self.opset, self.num_outputs = label, opset, num_outputs

    def __str__(self) -> str:
        return self.label


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[attr.name] = value
    return out


def _constant_value(node: onnx.NodeProto, label: str) -> np.ndarray:
    a = {attr.name: attr for attr in node.attribute}
    if "value" in a:
        return numpy_helper.to_array(a["value"].t)
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in a:
            return np.asarray(helper.get_attribute_value(a[key]), dtype=dtype)
    raise UnsupportedModelError(f"{label}: Constant without a tensor/float/int value ({', '.join(a)})")


def _label(node: onnx.NodeProto, i: int) -> str:
    return f"node {node.name or f'#{i}'} ({node.op_type})"


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


class OnnxModule(torch.nn.Module):
    """An ONNX graph as a torch module: float initializers are parameters, the rest buffers.

    ``forward(*inputs)`` takes the graph inputs in order (or by name as keywords) and returns a
    tuple of the graph outputs. ``names[i]`` is the initializer behind ``weights[i]``.
    """

    def __init__(self, model: onnx.ModelProto, *, where: str = "model") -> None:
        super().__init__()
        graph = model.graph
        if graph.sparse_initializer:
            raise UnsupportedModelError(f"{where}: sparse initializers are not supported for fine-tuning")
        self.opset = _opset(model)
        for i, node in enumerate(graph.node):
            label = _label(node, i)
            if node.domain not in ("", "ai.onnx"):
                raise UnsupportedModelError(f"{where}: {label}: ops of domain {node.domain!r} are not supported "
                                            f"for fine-tuning")
            if node.op_type in QDQ_OPS:
                raise UnsupportedModelError(
                    f"{where}: {label}: int8 (QDQ) models cannot be fine-tuned (their weights are int8 tensors "
                    f"that gradients cannot move); fine-tune the float model, then quantize it (--int8)")
            if node.op_type not in SUPPORTED_OPS:
                raise UnsupportedModelError(f"{where}: {label}: op not supported by edgecomp's ONNX→torch "
                                            f"converter (edgecomp.train.onnx_torch.SUPPORTED_OPS)")
        inits = {t.name: t for t in graph.initializer}
        self.input_names = [v.name for v in graph.input if v.name not in inits]
        self.output_names = [v.name for v in graph.output]
        frozen = {node.input[k] for node in graph.node for k in _FROZEN_INPUTS.get(node.op_type, ())
                  if k < len(node.input)}
        self.names: list[str] = []
        self.weights = torch.nn.ParameterList()
        self._slots: dict[str, tuple[str, int]] = {}  # tensor name -> ("w"|"b", index)
        buffers: list[torch.Tensor] = []
        for name, t in inits.items():
            arr = numpy_helper.to_array(t)
            if arr.dtype.kind not in "fiub":
                raise UnsupportedModelError(f"{where}: initializer {name!r} has dtype {arr.dtype}")
            tensor = torch.from_numpy(np.array(arr, copy=True))
            if arr.dtype == np.float32 and arr.size > 1 and name not in frozen:
                self._slots[name] = ("w", len(self.names))
                self.names.append(name)
                self.weights.append(torch.nn.Parameter(tensor))
            else:
                self._slots[name] = ("b", len(buffers))
                buffers.append(tensor)
        self._steps: list[tuple[Callable, list[str], list[str], dict, _NodeCtx]] = []
        for i, node in enumerate(graph.node):
            label = _label(node, i)
            if node.op_type == "Constant":
                self._slots[node.output[0]] = ("b", len(buffers))
                buffers.append(torch.from_numpy(np.array(_constant_value(node, label), copy=True)))
                continue
            self._steps.append((_HANDLERS[node.op_type], list(node.input), list(node.output), _attrs(node),
                                _NodeCtx(f"{where}: {label}", self.opset, len(node.output))))
        for k, b in enumerate(buffers):
            self.register_buffer(f"c{k}", b, persistent=False)
        self._nbuffers = len(buffers)
        # last use of each value, so intermediates are dropped as soon as they are consumed
        self._last_use: dict[str, int] = {}
        for k, (_, ins, _, _, _) in enumerate(self._steps):
            for n in ins:
                self._last_use[n] = k
        for n in self.output_names:
            self._last_use[n] = len(self._steps)
        # pruned weights: masks that keep their zeros zero
        self.masks: dict[int, torch.Tensor] = {}
        for k, w in enumerate(self.weights):
            if w.dim() >= 2:
                zeros = int((w.detach() == 0).sum())
                if zeros >= PRUNED_FRACTION * w.numel():
                    self.masks[k] = (w.detach() != 0)

    def _value(self, name: str) -> torch.Tensor:
        kind, k = self._slots[name]
        return self.weights[k] if kind == "w" else getattr(self, f"c{k}")

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(args) + len(kwargs) != len(self.input_names):
            raise InputError(f"the model takes {len(self.input_names)} input(s) ({', '.join(self.input_names)}), "
                             f"got {len(args) + len(kwargs)}")
        env: dict[str, torch.Tensor] = dict(zip(self.input_names, args))
        env.update(kwargs)
        for k, (fn, ins, outs, attrs, ctx) in enumerate(self._steps):
            xs = [None if not n else (env[n] if n in env else self._value(n)) for n in ins]
            results = fn(xs, attrs, ctx)
            for name, value in zip(outs, results):
                if name:
                    env[name] = value
            for n in ins:
                if n in env and self._last_use.get(n) == k:
                    del env[n]
        return tuple(env[n] if n in env else self._value(n) for n in self.output_names)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Put the zeros of pruned weights back (call after every optimizer step)."""
        for k, mask in self.masks.items():
            self.weights[k].mul_(mask)

    def mask_gradients(self) -> None:
        """Zero the gradients of pruned entries (so optimizer state never builds up there)."""
        for k, mask in self.masks.items():
            g = self.weights[k].grad
            if g is not None:
                g.mul_(mask)

    def trained_arrays(self) -> dict[str, np.ndarray]:
        """Initializer name → current value (float32), for every trainable weight."""
        return {n: w.detach().cpu().numpy().astype(np.float32, copy=True) for n, w in zip(self.names, self.weights)}


def to_torch(model: onnx.ModelProto | str | os.PathLike) -> OnnxModule:
    """An :class:`OnnxModule` for a model (proto or file; files are loaded with edgecomp's checks)."""
    if not isinstance(model, onnx.ModelProto):
        from edgecomp.importer import load_onnx

        where = str(model)
        model = load_onnx(model)
        return OnnxModule(model, where=where)
    return OnnxModule(model)


class Batched(torch.nn.Module):
    """``OnnxModule`` over a batch along a new leading axis ([B, *input_shape] → [B, *output_shape]).

    ``per_sample``: the graph has a fixed batch (usually 1), so the batch is mapped with
    ``torch.func.vmap`` over samples, each run at the graph's own shape; else the inputs' leading
    axis is the graph's own (dynamic) batch axis and they are fed as they are. A module (not a
    function) so that ``fit`` can wrap it in DistributedDataParallel under ``torchrun``.
    """

    def __init__(self, inner: OnnxModule, per_sample: bool) -> None:
        super().__init__()
        self.inner = inner
        self.per_sample = per_sample

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.per_sample:
            return self.inner(*inputs)
        return torch.func.vmap(self.inner, in_dims=0, out_dims=0, randomness="error")(*inputs)


def batched(module: OnnxModule, per_sample: bool) -> Batched:
    """Shorthand for :class:`Batched`."""
    return Batched(module, per_sample)


def _save_atomic(model: onnx.ModelProto, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def to_onnx(module: OnnxModule, source: onnx.ModelProto, path: str | os.PathLike | None = None, *,
            how: str = "weights", example_inputs: Sequence[np.ndarray] | None = None) -> onnx.ModelProto:
    """The trained model as ONNX; written to ``path`` atomically (temp file + rename) when given.

    ``how="weights"`` (default): ``source`` (the graph the module was made from) with its
    initializers replaced by the trained values: nodes, names, opset and dims are the source's.
    ``how="export"``: ``torch.onnx.export(dynamo=False)`` of the module traced on
    ``example_inputs`` (one sample of each input), with the source's input/output names and
    opset, and its symbolic dims declared dynamic.
    """
    if how == "weights":
        out = onnx.ModelProto()
        out.CopyFrom(source)
        trained = module.trained_arrays()
        seen = set()
        for t in out.graph.initializer:
            if t.name in trained:
                new = numpy_helper.from_array(trained[t.name], t.name)
                if tuple(new.dims) != tuple(t.dims):
                    raise InputError(f"trained weight {t.name!r} has shape {list(new.dims)}, the graph {list(t.dims)}")
                t.CopyFrom(new)
                seen.add(t.name)
        missing = sorted(set(trained) - seen)
        if missing:
            raise InputError(f"the graph has no initializer {missing[0]!r} for a trained weight (not its source?)")
    elif how == "export":
        out = _export(module, source, example_inputs)
    else:
        raise InputError(f"unknown export method {how!r} (weights, export)")
    if path is not None:
        _save_atomic(out, Path(path))
    return out


def _export(module: OnnxModule, source: onnx.ModelProto, example_inputs) -> onnx.ModelProto:
    import io
    import warnings

    if example_inputs is None:
        raise InputError("how='export' needs example_inputs (one sample of each input)")
    dynamic: dict[str, dict[int, str]] = {}
    for vi in [*source.graph.input, *source.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        sym = {i: d.dim_param or f"{vi.name}_dim{i}" for i, d in enumerate(dims) if not d.HasField("dim_value")}
        if sym:
            dynamic[vi.name] = sym
    buf = io.BytesIO()
    args = tuple(torch.from_numpy(np.asarray(x)) for x in example_inputs)
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, buf, dynamo=False, input_names=module.input_names,
                              output_names=module.output_names, opset_version=max(module.opset, 7),
                              dynamic_axes=dynamic or None, do_constant_folding=True)
    finally:
        module.train(was_training)
    return onnx.load_from_string(buf.getvalue())
