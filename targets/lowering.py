"""ONNX → Relax → compiled code, with weights kept apart from the code.

``from_onnx(keep_params_in_input=True)`` + ``detach_params`` turn every initializer into a
parameter of ``main``: the compiled library holds only code, and the weights live in the bundle's
weights file, passed at call time as ``main(*inputs, *params)``. Import failures name the ONNX node
and op that TVM could not convert.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from typing import Any

import numpy as np
import onnx

from edgecomp.errors import InputError, UnsupportedModelError
from edgecomp.targets.base import ELF_MACHINES, Target

__all__ = [
    "RelaxModel", "inline_small_constants", "gemm_weights_kn", "unsupported_nodes", "to_relax", "channels_last", "wants_channels_last", "relax_pipeline", "prepare_module", "compile_relax",
    "export_library", "elf_arch",
]

log = logging.getLogger(__name__)


class RelaxModel:
    """A Relax module whose ``main`` takes ``(*inputs, *params)``, and the params' values."""

    def __init__(self, mod: Any, param_names: list[str], params: list[np.ndarray], layouts: dict[str, str] | None = None) -> None:
        self.mod = mod
        self.param_names = param_names
        self.params = params
        # params not stored in their ONNX initializer's element order: name -> how they are stored
        # ("transposed": a Gemm weight as [K, N]; "HWIO": a Conv weight, OIHW in ONNX)
        self.layouts = dict(layouts or {})


def unsupported_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(node name, op type) of every main-graph node TVM's ONNX importer has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"If", "Constant"}
    return [(n.name or n.output[0], n.op_type) for n in model.graph.node if n.op_type not in known]


@contextlib.contextmanager
def _track_current_node():
    """Record which node TVM's importer is converting, so a failure can name it.

    TVM's importer has no hook for this; we wrap its ``_convert_operator`` for the duration of
    one import (restored afterwards) and silence the line it prints on errors.
    """
    from tvm.relax.frontend.onnx import onnx_frontend

    cls = onnx_frontend.ONNXGraphImporter
    original = cls._convert_operator
    current: dict[str, str] = {}

    def wrapper(self, op_name, inputs, attrs, opset):  # noqa: ANN001
        current["op"] = op_name
        current["node"] = str(attrs.get("tvm_custom", {}).get("name", "?"))
        if op_name == "Clip" and opset >= 11:
            clip = _clip_as_max_min(self.bb, inputs)
            if clip is not None:
                return self.bb.normalize(clip)
        return original(self, op_name, inputs, attrs, opset)

    cls._convert_operator = wrapper
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield current
    finally:
        cls._convert_operator = original


def _clip_as_max_min(bb, inputs):  # noqa: ANN001, ANN202
    """``Clip(x, lo, hi)`` with constant bounds as Relax ``maximum``/``minimum`` (None: not that case).

    TVM's importer emits Clip as ``call_tir`` of its own TE functions; Relax passes cannot see
    through those (``ConvertLayout`` wraps each one in two transposes back to NCHW: MobileNetV2's
    35 ReLU6). ``maximum(x, lo)`` then ``minimum(·, hi)`` is what those functions compute; NaN
    bounds (ONNX: unbounded) and non-constant bounds keep TVM's own conversion.
    """
    from tvm import ir, relax

    x, bounds = inputs[0], list(inputs[1:3]) + [None] * (3 - len(inputs))
    if not all(b is None or (isinstance(b, ir.expr.Constant) and b.value.numpy().size == 1
                             and not np.isnan(b.value.numpy()).any()) for b in bounds[:2]):
        return None
    if bounds[0] is not None:
        x = bb.emit(relax.op.maximum(x, relax.const(bounds[0].value.numpy().reshape(()))))
    if bounds[1] is not None:
        x = relax.op.minimum(x, relax.const(bounds[1].value.numpy().reshape(())))
    return x


# Initializers that are code, not weights: shapes, axes, pads (small integer tensors) and scalars
# (Clip limits, scales). Constant folding turns exporters' shape arithmetic into such initializers;
# as parameters TVM would see them only at run time and could not infer static shapes (an Expand
# whose target shape is a parameter fails to compile), so they are inlined as Constant nodes.
_MAX_INLINE_INT = 64
_MAX_INLINE_FLOAT = 1


def inline_small_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose shape-like and scalar initializers are Constant nodes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph_inputs = {vi.name for vi in out.graph.input}
    keep, consts = [], []
    for init in out.graph.initializer:
        size = int(np.prod(init.dims)) if init.dims else 1
        is_int = init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL)
        small = size <= (_MAX_INLINE_INT if is_int else _MAX_INLINE_FLOAT)
        if small and init.name not in graph_inputs:
            consts.append(onnx.helper.make_node("Constant", [], [init.name], name=f"{init.name}__const", value=init))
        else:
            keep.append(init)
    if consts:
        del out.graph.initializer[:]
        out.graph.initializer.extend(keep)
        nodes = consts + list(out.graph.node)
        del out.graph.node[:]
        out.graph.node.extend(nodes)
    return out


def gemm_weights_kn(model: onnx.ModelProto) -> tuple[onnx.ModelProto, frozenset[str]]:
    """A copy of ``model`` whose ``Gemm(transB=1)`` weights are stored transposed, as ``[K, N]``,
    and the names of the initializers transposed.

    Exporters write fully connected layers as ``Gemm(x, W[N, K], transB=1)``; TVM imports that as
    ``matmul(x, permute_dims(W))``, and since the weights are parameters (not constants), the
    transpose would run on every call (MobileNetV2's classifier: 1.28M floats, 2.5 ms of a
    17 ms run here). Transposing the stored weight once, here, is exact. Also for a weight behind a
    per-channel ``DequantizeLinear`` (int8 storage kept: the int8 tensor is transposed and its
    quantization axis moves from 0 to 1). Only initializers that feed nothing else are changed.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}

    done: set[str] = set()

    def transpose_init(name: str) -> None:
        done.add(name)
        t = inits[name]
        value = onnx.numpy_helper.to_array(t)
        t.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(value.T), name))

    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2:
            continue
        attrs = {a.name: a for a in node.attribute}
        if "transB" not in attrs or onnx.helper.get_attribute_value(attrs["transB"]) != 1:
            continue
        b = node.input[1]
        if uses.get(b, 0) != 1 or b in outputs:
            continue
        if b in inits and len(inits[b].dims) == 2:
            transpose_init(b)
        else:
            dq = producer.get(b)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or uses.get(dq.input[0], 0) != 1:
                continue
            if len(inits[dq.input[0]].dims) != 2:
                continue
            dq_attrs = {a.name: a for a in dq.attribute}
            scale = inits.get(dq.input[1])
            per_channel = scale is not None and len(scale.dims) == 1 and scale.dims[0] > 1
            axis = onnx.helper.get_attribute_value(dq_attrs["axis"]) if "axis" in dq_attrs else 1
            if scale is None or "block_size" in dq_attrs or (per_channel and axis not in (0, -2)):
                continue
            transpose_init(dq.input[0])
            if per_channel:
                for a in list(dq.attribute):
                    if a.name == "axis":
                        dq.attribute.remove(a)
                dq.attribute.append(onnx.helper.make_attribute("axis", 1))
        for a in list(node.attribute):
            if a.name == "transB":
                node.attribute.remove(a)
        node.attribute.append(onnx.helper.make_attribute("transB", 0))
    return out, frozenset(done)


def to_relax(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], input_dtypes: dict[str, str],
             channels_last_convs: bool = False, int8_arith: bool | None = False) -> RelaxModel:
    """Import a static-shape ONNX model into Relax with its weights detached.

    ``channels_last_convs``: convolutions as NHWC with HWIO weights (:func:`channels_last`; what
    :func:`wants_channels_last` says for the target); with ``int8_arith`` (a QDQ model compiled
    with int8 arithmetic) the activations' quantize/dequantize are written out first
    (:func:`decompose_qdq`), so that the layout runs through them."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    model, transposed = gemm_weights_kn(inline_small_constants(model))
    bad = unsupported_nodes(model)
    if bad:
        node, op = bad[0]
        more = f" (and {len(bad) - 1} more node(s): {', '.join(sorted({o for _, o in bad[1:]}))})" if len(bad) > 1 else ""
        raise UnsupportedModelError(f"TVM cannot import node {node!r}: op {op!r} is not supported by its ONNX frontend{more}")
    with _track_current_node() as current:
        try:
            mod = from_onnx(
                model,
                shape_dict={k: list(v) for k, v in input_shapes.items()},
                dtype_dict=dict(input_dtypes),
                keep_params_in_input=True,
            )
        except Exception as err:
            msg = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
            where = f"node {current['node']!r} (op {current['op']!r})" if current else "the model"
            raise UnsupportedModelError(f"TVM failed to import {where}: {msg}") from err
    mod, params = relax.frontend.detach_params(mod)
    values = [p.numpy() for p in params.get("main", [])]
    n_inputs = len(mod["main"].params) - len(values)
    names = [v.name for v in mod["main"].params[n_inputs:]]
    out = RelaxModel(mod, names, values, {n: "transposed" for n in names if n in transposed})
    if not channels_last_convs:
        return out
    try:
        if int8_arith:
            return channels_last(RelaxModel(decompose_qdq(out.mod), out.param_names, out.params, out.layouts))
        return channels_last(out)
    except Exception as err:  # noqa: BLE001  (a layout the pass cannot convert: NCHW code is still correct)
        msg = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
        log.warning("convolutions kept NCHW: the channels-last conversion failed (%s)", msg)
        return out


def _stored_layout(shape: tuple[int, ...], ops: tuple) -> str | None:
    """How a parameter of ONNX ``shape`` is stored after ``ops`` (("T", axes) transposes and
    ("R", shape) reshapes): ``"HWIO"`` for an OIHW conv weight, ``"permuted"`` for another
    element order, None when the elements keep their ONNX order (a bias reshaped to [1,1,1,C])."""
    order = original = np.arange(int(np.prod(shape))).reshape(shape)
    for kind, arg in ops:
        order = order.transpose(arg) if kind == "T" else order.reshape(arg)
    if order.ndim == 4 and original.ndim == 4 and np.array_equal(order, original.transpose(2, 3, 1, 0)):
        return "HWIO"
    return None if np.array_equal(order.ravel(), original.ravel()) else "permuted"


def wants_channels_last(target: Target) -> bool:
    """Whether ``target``'s code wants NHWC convolutions: edgecomp's CPU pipeline does (its
    default schedules vectorize the channels: MobileNetV2 on this project's x86 VM 11.8 → 6.4 ms,
    NCHW's 7- and 14-wide rows fill a 16-lane vector badly); GPU pipelines (dlight's NCHW rules)
    keep ONNX's NCHW."""
    return target.default_pipeline == "cpu"


def decompose_qdq(mod):
    """``mod`` with each activation's ``quantize``/``dequantize`` (constant scalar scale and zero
    point) written out as elementwise ops, with TVM's own formulas (its legalization of the two
    ops): ``clip(round(x / s) + z)`` cast, and ``float(int32(q) - z) * s``. Relax's
    ``ConvertLayout`` has no layout rule for the two ops and wraps each in transposes (156 of them
    in MobileNetV2's int8 graph); elementwise ops carry NHWC through. Dequantizes of weights
    (parameters, constants) stay ops: :func:`channels_last` moves their axis, and the int8
    rewrite (``targets.int8``) recognizes both forms."""
    import tvm
    from tvm import relax

    from edgecomp.targets.int8 import written_quantize

    R = relax.op

    def scalar(expr) -> np.ndarray | None:
        if isinstance(expr, tvm.ir.expr.GenericConst) and expr.value.numpy().size == 1:
            return expr.value.numpy().reshape(())
        return None

    @relax.expr_functor.mutator
    class _Decompose(relax.PyExprMutator):
        def __init__(self, params) -> None:
            super().__init__()
            self.params = params  # the function's parameters: inputs and weights

        def visit_call_(self, call):  # noqa: ANN001, ANN202
            call = super().visit_call_(call)
            name = getattr(call.op, "name", "")
            if name not in ("relax.quantize", "relax.dequantize"):
                return call
            x, s, z = call.args
            s, z, out = scalar(s), scalar(z), str(call.attrs.out_dtype)
            if s is None or z is None or (name == "relax.dequantize" and (out != "float32" or x in self.params
                                                                          or isinstance(x, tvm.ir.expr.GenericConst))):
                return call
            if name == "relax.quantize":
                info = np.iinfo(out)
                return self.builder_.normalize(written_quantize(
                    x, relax.const(s, str(s.dtype)), relax.const(np.float32(z), "float32"), info.max, info.min, out))
            v = R.astype(R.subtract(R.astype(x, "int32"), relax.const(np.int32(z), "int32")), "float32")
            return self.builder_.normalize(R.multiply(v, relax.const(np.float32(s), "float32")))

    func = mod["main"]
    out = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    out["main"] = _Decompose(set(func.params)).visit_expr(func)
    return out


def channels_last(relax_model: RelaxModel) -> RelaxModel:
    """``relax_model`` with its 2-D convolutions in NHWC, their weights stored HWIO.

    ``relax.transform.ConvertLayout`` rewrites each ``conv2d`` to NHWC/HWIO and propagates the
    layout through the elementwise ops between them, leaving transposes of the input, the
    outputs, and of each weight and bias. Those of weights would run on every call (weights are
    parameters); here they are applied once, to the stored values: each chain of
    ``permute_dims``/``reshape`` on a parameter that feeds nothing else (also through a
    ``dequantize``: the int8 tensor is transposed, its quantization axis follows) becomes a
    parameter holding the result. Exact: the same numbers in another order.
    """
    from tvm import relax

    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(relax_model.mod)
    func = mod["main"]
    n_inputs = len(func.params) - len(relax_model.params)
    param_index = {v: i for i, v in enumerate(func.params[n_inputs:])}
    bindings = [b for block in func.body.blocks for b in block.bindings]
    uses: dict[Any, int] = {}
    for expr in [b.value for b in bindings] + [func.body.body]:
        for v in relax.analysis.free_vars(expr):
            uses[v] = uses.get(v, 0) + 1

    def layout_call(value, name: str) -> bool:
        return isinstance(value, relax.Call) and getattr(value.op, "name", None) == name

    def axes_of(value, ndim: int) -> list[int]:
        return [int(a) for a in value.attrs.axes] if value.attrs.axes is not None else list(range(ndim))[::-1]

    # value: var -> (param index, array so far, the layout ops so far); a dequantized param keeps
    # its int8 array and quantization axis until the permute_dims that follows it
    values = {v: (i, relax_model.params[i], ()) for v, i in param_index.items()}
    dequantized: dict[Any, tuple] = {}
    final: dict[int, Any] = {}  # param index -> the binding var its chain ends at
    new_value: dict[Any, tuple] = {}
    for b in bindings:
        value = b.value
        arg = value.args[0] if isinstance(value, relax.Call) and value.args else None
        if arg is None or uses.get(arg, 0) != 1:
            continue
        if layout_call(value, "relax.dequantize") and arg in values:
            dequantized[b.var] = (arg, value)
            continue
        if layout_call(value, "relax.permute_dims") and arg in dequantized:
            src, dq = dequantized[arg]
            i, array, ops = values[src]
            axes = axes_of(value, array.ndim)
            values[b.var] = (i, np.ascontiguousarray(array.transpose(axes)), (*ops, ("T", axes)))
            new_value[b.var] = ("dequantize", dq, axes.index(int(dq.attrs.axis) % array.ndim))
            final[i] = b.var
        elif arg in values and new_value.get(arg, ("param",))[0] == "param" and (
                layout_call(value, "relax.permute_dims") or layout_call(value, "relax.reshape")):
            # (a chain through a dequantize ends at its permute_dims: its value is fp32 from there)
            i, array, ops = values[arg]
            if layout_call(value, "relax.permute_dims"):
                op = ("T", axes_of(value, array.ndim))
                array = np.ascontiguousarray(array.transpose(op[1]))
            else:
                op = ("R", [int(d) for d in b.var.ty.shape])
                array = array.reshape(op[1])
            values[b.var] = (i, array, (*ops, op))
            new_value[b.var] = ("param",)
            final[i] = b.var
    if not final:
        return RelaxModel(mod, relax_model.param_names, relax_model.params, relax_model.layouts)

    params, layouts = list(relax_model.params), dict(relax_model.layouts)
    new_params = list(func.params)
    replace: dict[Any, Any] = {}
    for i, last in final.items():
        _, array, ops = values[last]
        name = relax_model.param_names[i]
        params[i] = array
        var = relax.Var(name, relax.TensorType(list(array.shape), str(array.dtype)))
        new_params[n_inputs + i] = var
        kind = new_value[last]
        if kind[0] == "param":
            replace[last] = var
        else:
            dq = kind[1]
            replace[last] = relax.op.dequantize(var, dq.args[1], dq.args[2], axis=kind[2], out_dtype=str(dq.attrs.out_dtype))
        label = _stored_layout(relax_model.params[i].shape, ops)
        if label:
            layouts[name] = label

    @relax.expr_functor.mutator
    class _Repack(relax.PyExprMutator):
        def visit_var_binding_(self, binding):  # noqa: ANN001, ANN202
            if binding.var in replace:
                self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(replace[binding.var])))
            else:
                super().visit_var_binding_(binding)

    body = _Repack().visit_expr(func.body)
    new_func = relax.Function(new_params, body, func.ret_ty, func.is_pure, func.attrs)
    mod["main"] = relax.analysis.remove_all_unused(new_func)
    return RelaxModel(mod, relax_model.param_names, params, layouts)


def cpu_pipeline(tvm_target: Any, default_schedules: bool = True):
    """edgecomp's Relax pipeline for LLVM (CPU) targets.

    TVM's own CPU pipeline (``relax.backend.cpu_generic``: library dispatch, legalize and fuse,
    lowering, memory planning) with :mod:`edgecomp.targets.cpu_schedules`' default schedules
    applied to the fused kernels between fusion and lowering. ``default_schedules=False``: TVM's
    pipeline as it is (unscheduled loop nests, as plain ``tvm.compile`` gives).
    """
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from edgecomp.targets.cpu_schedules import apply_default_schedules

    schedule = [apply_default_schedules()] if default_schedules else []

    @tvm.transform.module_pass(opt_level=0, name="EdgecompCPUPipeline")
    def _pipeline(mod, _ctx):
        with tvm_target:
            passes = (cpu.library_dispatch_passes(tvm_target) + cpu.legalize_passes(tvm_target) + schedule
                      + cpu.dataflow_lower_passes(tvm_target) + cpu.finalize_passes(tvm_target))
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def relax_pipeline(target: Target, default_schedules: bool = True):
    """The Relax pipeline object for ``target`` (its record's ``default_pipeline``).

    ``cpu``: :func:`cpu_pipeline` (``default_schedules=False``: without edgecomp's schedules).
    ``target``: ``relax.get_default_pipeline(tvm_target)``, TVM's per-target pipeline; for GPUs
    it applies the ``tvm.s_tir.dlight`` GPU rules (Matmul, GEMV, Reduction, Fallback; Adreno: its
    own rules). A pipeline *object* from ``relax.get_pipeline("default")`` would skip them, and
    ``tvm.compile`` then emits unscheduled GPU functions without a kernel (measured: a CUDA build
    of digits held no CUDA module at all).
    """
    from tvm import relax

    if target.default_pipeline == "cpu":
        return cpu_pipeline(target.tvm(), default_schedules)
    if target.default_pipeline == "target":
        return relax.get_default_pipeline(target.tvm())
    return relax.get_pipeline(target.default_pipeline)


def vectorizable_rounding() -> None:
    """Mark TIR's ``nearbyint`` (the ``round`` of every quantize) vectorizable.

    TVM 0.27 registers ``TVectorizable`` for ``round``/``floor``/… but not for ``nearbyint``, so its
    vectorizer turned every loop holding one into a scalar loop, which LLVM then vectorized at its
    preferred 256 bits (or not at all). Each lane stays ``llvm.nearbyint`` (round half to even in
    the default rounding mode): the same bits. MobileNetV2's int8 bundle (host, AVX-512): 3.50 ->
    3.05 ms with this, the per-register int32 write-back of ``cpu_schedules`` and
    :func:`edgecomp.targets.int8.reciprocal_scales`. Process-wide: an op attribute cannot be
    scoped. The CUDA codegen writes a vector ``nearbyint`` out lane by lane (``nearbyintf(v.x)``, …).
    """
    import tvm

    if tvm.ir.Op.get("tirx.nearbyint").get_attr("TVectorizable") is None:
        tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)


def prepare_module(relax_model: RelaxModel, target: Target, int8_arith: bool | None = None, fast_math: bool | None = None):
    """The Relax module that is compiled (and tuned: a tuning database matches it structurally).

    ``fast_math`` (default: on for the ``cpu`` pipeline): ``relax.transform.FastMathTransform``,
    ``erf``/``exp``/``tanh``/``softmax`` as TVM's vectorizable polynomial approximations instead of
    a libm call per element (MiniLM's GELU: 7 ms of a 9 ms matmul kernel here without it).

    ``int8_arith=True`` rewrites QDQ dequantize → matmul/conv2d sites into int8×int8 → int32
    arithmetic (:func:`edgecomp.targets.int8.rewrite_int8`, weight-only zero-point terms and scale
    products folded for ``relax_model.params``, so the code is tied to those weights), then shortens
    the requantize epilogues (:func:`edgecomp.targets.int8.fold_epilogues`, exact) and multiplies by
    each quantize's reciprocal scale (:func:`edgecomp.targets.int8.reciprocal_scales`, within one
    step of dividing). GPU targets get C-safe
    parameter names (their kernel source is C).
    """
    vectorizable_rounding()
    mod = relax_model.mod
    if fast_math if fast_math is not None else target.default_pipeline == "cpu":
        from tvm import relax

        mod = relax.transform.FastMathTransform()(mod)
    if int8_arith:
        from edgecomp.targets.cpu_schedules import int8_dot
        from edgecomp.targets.int8 import fold_epilogues, reciprocal_scales, rewrite_int8

        dot = int8_dot(target.tvm()) if target.default_pipeline == "cpu" else None
        params = dict(zip(relax_model.param_names, relax_model.params))
        mod, stats = rewrite_int8(mod, params, fold_weight_terms=True, unsigned_activations=dot is not None and dot[2] == "uint8")
        log.info("int8 arithmetic: %d of %d dequantize→matmul/conv2d sites rewritten", stats.rewritten, stats.matched)
        mod = reciprocal_scales(fold_epilogues(mod, params))
    if target.device_kind.kernel_file is not None:
        from edgecomp.targets.kernels import safe_param_names

        mod = safe_param_names(mod)  # kernel source is C: ONNX names like "0.weight" are not identifiers
    return mod


def compile_relax(relax_model: RelaxModel, target: Target, int8_arith: bool | None = None, system_lib_prefix: str | None = None,
                  db: str | os.PathLike | None = None, default_schedules: bool = True):
    """``tvm.compile`` for ``target`` with its default pipeline; returns the VM executable.

    The module is :func:`prepare_module`'s (``int8_arith``: int8 arithmetic instead of
    dequantize → fp32).

    ``db``: a MetaSchedule tuning database (``edgecomp tune``): its schedules are applied to the
    raw module (:func:`edgecomp.targets.tuning.apply_database`) before the target's pipeline.

    ``system_lib_prefix``: build a *system library* (``relax.build(..., system_lib=True)``) whose
    objects register the model under this prefix in a statically linked program (firmware).
    """
    import tvm
    from tvm import relax

    mod = prepare_module(relax_model, target, int8_arith, fast_math=None if default_schedules else False)
    if db is not None:
        from edgecomp.targets.tuning import apply_database

        mod = apply_database(mod, target, db)
    try:
        pipeline = relax_pipeline(target, default_schedules)
        if system_lib_prefix is not None:
            # The prefix is a module attribute (0.27 has no target option for it). Measured here: a
            # 7-character prefix ("digits_", a tvm-ffi SmallStr) made relax.build fail converting
            # the attribute; edgecomp's prefixes are "edgecomp_<name>_", always longer.
            mod = mod.with_attr("system_lib_prefix", system_lib_prefix)
            return relax.build(mod, target=target.tvm(), relax_pipeline=pipeline, system_lib=True)
        return tvm.compile(mod, target=target.tvm(), relax_pipeline=pipeline)
    except Exception as err:
        msg = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
        raise UnsupportedModelError(f"TVM failed to compile for {target.name}: {msg}") from err


def export_library(executable: Any, path: str | os.PathLike, target: Target) -> None:
    """Link the executable into a shared object for the target's machine."""
    import tvm

    if target.cross_compiler is None:
        executable.export_library(str(path))
        return
    if shutil.which(target.cross_compiler) is None:
        pkgs = " ".join(target.apt_packages)
        raise InputError(
            f"target {target.name} needs the cross compiler {target.cross_compiler}, which is not "
            f"installed (Debian: apt-get install {pkgs})"
        )
    fcompile = tvm.support.cc.cross_compiler(target.cross_compiler, options=list(target.link_options) or None)
    executable.export_library(str(path), fcompile=fcompile)


def elf_arch(path: str | os.PathLike) -> str | None:
    """CPU architecture of an ELF file, from its header (None if not ELF)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    little = head[5] == 1
    machine = int.from_bytes(head[18:20], "little" if little else "big")
    for arch, code in ELF_MACHINES.items():
        if code == machine:
            return arch
    return f"elf-machine-{machine}"
