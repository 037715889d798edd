"""Integer arithmetic for QDQ models: dequantize → matmul/conv2d → … becomes int8×int8 → int32.

TVM 0.27's ONNX importer turns a QDQ model (ONNX Runtime ``quantize_static`` with
``QuantFormat.QDQ``) into ``R.dequantize`` ops feeding fp32 ``matmul``/``conv2d``: int8 weights
are stored as int8 but every product is fp32. This module pass (``tvm.relax.dpl``) finds

- ``matmul(dequantize(x_q, sx, zx), dequantize(w_q, sw, zw))``           (ONNX MatMul)
- ``matmul(dequantize(x_q, …), permute_dims(dequantize(w_q, …)))``       (ONNX Gemm, transB=1)
- ``conv2d(dequantize(x_q, …), dequantize(w_q, …))``                     (ONNX Conv, NCHW/OIHW)

(``w_q`` may be a weight or another quantized activation, e.g. attention's batched matmuls) and
rewrites each into integer arithmetic with an fp32 requantization epilogue::

    acc = op(x8, w8, out_dtype="int32")              # int8 × int8, int32 accumulation
          - zx·Σ_k w8  - zw·Σ_k x8  + K·zx·zw        # zero-point terms, exact in int32
    y   = float32(acc) · (sx · sw)                   # per output channel

``y`` replaces the fp32 result, so whatever followed (bias add, activation, the next
``quantize``) is unchanged: a site that ended in ``quantize`` is requantized from ``y``, and
the bias (ORT stores it as int32 with scale ``sx·sw``) is added in fp32, which is exact for any
bias scale. Matched but left on the fp32 path (counted, with a reason): activation scale or zero
point not a constant scalar, weights quantized along the reduction axis, layouts other than
NCHW/OIHW, symbolic shapes. Not matched at all: conv1d/conv3d, Gemm with transA.

Zero points are handled exactly:

- uint8 operands are shifted into int8 (``q - 128``, zero point ``z - 128``), so the product
  is signed int8 × int8 (what NEON ``sdot`` multiplies); with ``unsigned_activations`` (x86
  VNNI, which multiplies uint8 × int8) a matmul's first operand is uint8 instead (int8 shifted
  by +128) and its second int8;
- the activation zero point must be a constant scalar (edgecomp's ``to_relax`` inlines them);
  conv padding is applied explicitly with the zero point's value, so that the correction term
  is the same at the borders as inside;
- weight zero points that are constants or (with ``params``) parameters equal to zero drop
  their term; otherwise the ``zw·Σ_k x8`` term is computed (a row sum for matmul, a windowed
  sum for conv2d).

``Σ_k w8`` depends on the weights only. By default it is computed in the graph, so the compiled
code stays valid for any weights passed at run time. ``fold_weight_terms=True`` with ``params``
folds it, per site, into a small int32 constant: the code is then tied to those weight values
(the site records it in :class:`SiteStats`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

__all__ = ["SiteStats", "Int8Stats", "rewrite_int8", "fold_epilogues", "reciprocal_scales", "count_int_ops"]

_INT8 = ("int8", "uint8")


@dataclasses.dataclass
class SiteStats:
    """One matched dequantize → op site."""

    op: str  # "matmul" | "matmul_t" (Gemm transB) | "conv2d"
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    x_dtype: str
    w_dtype: str
    rewritten: bool
    reason: str = ""  # why not, when not rewritten
    act_zero_point: int | None = None  # in the domain of the product: int8 (a uint8 shifted), or uint8 (unsigned_activations)
    weight_zero_point: str = ""  # "zero" | "nonzero-const" | "runtime"
    folded_weight_terms: bool = False


@dataclasses.dataclass
class Int8Stats:
    sites: list[SiteStats]

    @property
    def matched(self) -> int:
        return len(self.sites)

    @property
    def rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)

    def to_json(self) -> dict:
        return {"matched": self.matched, "rewritten": self.rewritten, "sites": [dataclasses.asdict(s) for s in self.sites]}


def _shape(expr) -> tuple[int, ...] | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except TypeError:  # symbolic dimension
        return None


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _const_value(expr, params: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
    """The value of a constant, or of a parameter listed in ``params``; None if unknown."""
    import tvm

    if isinstance(expr, tvm.ir.expr.GenericConst):
        return expr.value.numpy()
    if params is not None and isinstance(expr, tvm.ir.expr.Var) and str(expr.name) in params:
        return np.asarray(params[str(expr.name)])
    return None


def written_quantize(x, s, z, hi: float, lo: float, out: str, reciprocal: bool = False):
    """``quantize`` written out elementwise, with TVM's own formula (its legalization of the op):
    ``astype(clip(round(x / s) + z, lo, hi), out)``; ``s``/``z`` Relax expressions, ``z`` float32.
    ``reciprocal`` (``s`` a constant): ``round(x * (1 / s))`` instead, see :func:`reciprocal_scales`."""
    from tvm import relax

    R = relax.op
    f32 = lambda v: relax.const(np.float32(v), "float32")  # noqa: E731
    if reciprocal:
        scaled = R.multiply(x, f32(np.float32(1) / _const_value(s, None).reshape(()).astype(np.float32)))
    else:
        scaled = R.divide(x, s)
    return R.astype(R.maximum(R.minimum(R.add(R.round(scaled), z), f32(hi)), f32(lo)), out)


def _written_quantize_pattern(x, w: dict):
    """A ``tvm.relax.dpl`` pattern of :func:`written_quantize` (dividing by the scale) applied to
    ``x``: ``astype(maximum(minimum(add(round(divide(x, s)), z), hi), lo))``, the wildcards ``s``,
    ``z``, ``hi``, ``lo`` taken from ``w``."""
    from tvm.relax.dpl import is_op

    rounded = is_op("relax.round")(is_op("relax.divide")(x, w["s"]))
    return is_op("relax.astype")(is_op("relax.maximum")(is_op("relax.minimum")(
        is_op("relax.add")(rounded, w["z"]), w["hi"]), w["lo"]))


def _to_int8(q, zp: Any):
    """(int8 tensor, int8-domain zero point) for an int8/uint8 tensor; uint8 shifts by -128."""
    from tvm import relax

    R = relax.op
    if isinstance(zp, np.ndarray):
        zp = zp.astype(np.int32)
    if _dtype(q) == "int8":
        return q, zp
    shifted = R.astype(R.subtract(R.astype(q, "int16"), relax.const(128, "int16")), "int8")
    if isinstance(zp, np.ndarray):
        return shifted, np.asarray(zp - 128, np.int32)  # (0-d arithmetic gives a numpy scalar)
    return shifted, R.subtract(R.astype(zp, "int32"), relax.const(128, "int32"))


def _to_uint8(q, zp: np.ndarray):
    """(uint8 tensor, uint8-domain zero point) for an int8/uint8 tensor; int8 shifts by +128
    (x86 VNNI multiplies unsigned × signed bytes)."""
    from tvm import relax

    R = relax.op
    zp = zp.astype(np.int32)
    if _dtype(q) == "uint8":
        return q, zp
    shifted = R.astype(R.add(R.astype(q, "int16"), relax.const(128, "int16")), "uint8")
    return shifted, np.asarray(zp + 128, np.int32)


class _Rewriter:
    def __init__(self, params: Mapping[str, np.ndarray] | None, fold_weight_terms: bool, unsigned_activations: bool) -> None:
        self.params = params
        self.fold = fold_weight_terms and params is not None
        self.unsigned = unsigned_activations
        self.sites: list[tuple[Any, SiteStats]] = []

    # -- bookkeeping -------------------------------------------------------------------------
    def _record(self, orig, site: SiteStats):
        for seen, _ in self.sites:
            if seen.same_as(orig):
                return
        self.sites.append((orig, site))

    def _skip(self, orig, site: SiteStats, reason: str):
        site.rewritten, site.reason = False, reason
        self._record(orig, site)
        return orig

    # -- shared checks -----------------------------------------------------------------------
    def _operands(self, orig, m, pats, kind: str, w_axis: int):
        """Validate a match; returns (site, x_q, zx(int), sx, w_q, zw(np|expr), zw_known, sw) or a skip."""
        x_q, sx, zx_e = m[pats["xq"]], m[pats["sx"]], m[pats["zx"]]
        w_q, sw, zw_e = m[pats["wq"]], m[pats["sw"]], m[pats["zw"]]
        x_shape, w_shape = _shape(x_q), _shape(w_q)
        site = SiteStats(kind, x_shape or (), w_shape or (), _dtype(x_q), _dtype(w_q), False)
        if x_shape is None or w_shape is None:
            return site, "symbolic shape"
        if site.x_dtype not in _INT8 or site.w_dtype not in _INT8:
            return site, f"operand dtypes {site.x_dtype}×{site.w_dtype} are not 8-bit"
        if _dtype(orig) != "float32":
            return site, f"result dtype {_dtype(orig)} is not float32"
        sx_v, zx_v = _const_value(sx, None), _const_value(zx_e, None)
        if sx_v is None or zx_v is None or sx_v.size != 1 or zx_v.size != 1:
            return site, "activation scale/zero point is not a constant scalar"
        dq_w = m[pats["dqw"]]
        sw_shape = _shape(sw)
        if sw_shape is None:
            return site, "weight scale has a symbolic shape"
        n_sw = int(np.prod(sw_shape)) if sw_shape else 1
        if n_sw != 1 and (len(sw_shape) != 1 or int(dq_w.attrs.axis) % len(w_shape) != w_axis % len(w_shape)):
            return site, f"weight quantized along axis {int(dq_w.attrs.axis)}, not the output-channel axis"
        zw_v = _const_value(zw_e, self.params)
        return site, (x_q, int(zx_v.reshape(())), sx, w_q, zw_v if zw_v is not None else zw_e, zw_v is not None, sw)

    # -- matmul ------------------------------------------------------------------------------
    def matmul(self, orig, m, pats, transposed: bool):
        from tvm import relax

        R = relax.op
        kind = "matmul_t" if transposed else "matmul"
        if transposed:
            perm = m[pats["perm"]]
            axes = [int(a) for a in perm.attrs.axes] if perm.attrs.axes is not None else None
            w_rank = len(_shape(m[pats["wq"]]) or ())
            if w_rank != 2 or axes not in (None, [1, 0]):
                site = SiteStats(kind, _shape(m[pats["xq"]]) or (), _shape(m[pats["wq"]]) or (), _dtype(m[pats["xq"]]), _dtype(m[pats["wq"]]), False)
                return self._skip(orig, site, f"permute_dims {axes} of a rank-{w_rank} weight")
            w_axis = 0  # W is [N, K]
        else:
            w_axis = -1  # W is [..., K, N]
        site, got = self._operands(orig, m, pats, kind, w_axis)
        if isinstance(got, str):
            return self._skip(orig, site, got)
        x_q, zx, sx, w_q, zw, zw_known, sw = got
        if len(site.x_shape) < 2 or len(site.w_shape) < 2:
            return self._skip(orig, site, "matmul of a vector")
        k = site.x_shape[-1]

        x8, zx8 = (_to_uint8 if self.unsigned else _to_int8)(x_q, np.array(zx))
        zx8 = int(zx8)
        w8, zw8 = _to_int8(w_q, zw)
        w_kn = R.permute_dims(w8, [1, 0]) if transposed else w8
        acc = R.matmul(x8, w_kn, out_dtype="int32")

        zw_zero = zw_known and not np.any(zw8)
        # Weight-only term: zx·Σ_k w - K·zx·zw (per output column), exact in int32.
        if zx8 != 0:
            if self.fold and len(site.w_shape) == 2 and self._weights_known(w_q):
                wv = _const_value(w_q, self.params).astype(np.int32) - (128 if site.w_dtype == "uint8" else 0)
                term = zx8 * wv.sum(axis=1 if transposed else 0)  # [N]
                if zw_known:
                    term = term - k * zx8 * np.asarray(zw8, np.int32).reshape(-1)
                acc = R.subtract(acc, relax.const(term.astype(np.int32), "int32"))
                site.folded_weight_terms = True
            else:
                colsum = R.sum(R.astype(w_kn, "int32"), axis=[-2], keepdims=True)
                acc = R.subtract(acc, R.multiply(relax.const(zx8, "int32"), colsum))
            if not zw_zero and not (site.folded_weight_terms and zw_known):  # K·zx·zw, unless folded
                acc = R.add(acc, R.multiply(relax.const(k * zx8, "int32"), self._zw_expr(zw8)))
        if not zw_zero:
            rowsum = R.sum(R.astype(x8, "int32"), axis=[-1], keepdims=True)
            acc = R.subtract(acc, R.multiply(self._zw_expr(zw8), rowsum))

        site.act_zero_point = zx8
        site.weight_zero_point = "zero" if zw_zero else ("nonzero-const" if zw_known else "runtime")
        site.rewritten = True
        self._record(orig, site)
        return R.multiply(R.astype(acc, "float32"), self._scale(sx, sw))

    # -- conv2d ------------------------------------------------------------------------------
    def conv2d(self, orig, m, pats):
        from tvm import relax

        R = relax.op
        attrs = orig.attrs
        layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
        nhwc = layouts == ("NHWC", "HWIO", "NHWC")
        site, got = self._operands(orig, m, pats, "conv2d", 3 if nhwc else 0)
        if isinstance(got, str):
            return self._skip(orig, site, got)
        if layouts != ("NCHW", "OIHW", "NCHW") and not nhwc:
            return self._skip(orig, site, f"layout {attrs.data_layout}/{attrs.kernel_layout}")
        x_q, zx, sx, w_q, zw, zw_known, sw = got
        # OIHW or HWIO: the output channels, each one's reduction (cin/g, kh, kw), its axes
        out_ch, groups = site.w_shape[3 if nhwc else 0], int(attrs.groups)
        cin_g, kh, kw = (site.w_shape[2], *site.w_shape[:2]) if nhwc else site.w_shape[1:]
        red_axes = (0, 1, 2) if nhwc else (1, 2, 3)
        per_channel = (lambda e: R.reshape(e, [1, 1, 1, out_ch])) if nhwc else (lambda e: R.reshape(e, [1, out_ch, 1, 1]))
        strides = [int(s) for s in attrs.strides]
        dilation = [int(d) for d in attrs.dilation]
        top, left, bottom, right = (int(p) for p in attrs.padding)

        zw_n = int(np.prod(_shape(m[pats["zw"]]) or ()))
        x8, zx8 = (_to_uint8 if self.unsigned else _to_int8)(x_q, np.array(zx))
        zx8 = int(zx8)
        if pats["xperm"] in m:  # transpose the 8-bit input instead of the dequantized one
            x8 = R.permute_dims(x8, [int(a) for a in m[pats["xperm"]].attrs.axes])
        w8, zw8 = _to_int8(w_q, zw)
        # Pad with the zero point: padded positions then contribute x - zx = 0, as in fp32. A zero
        # point of 0 (a ReLU's output in the uint8 domain) is the conv's own zero padding, which
        # stays in its kernel; another value is a pad of its own (MobileNetV2: 7 pad kernels, 0.15 ms).
        padding = [top, left, bottom, right] if zx8 == 0 else [0, 0, 0, 0]
        if (top or left or bottom or right) and zx8 != 0:
            hw = [top, bottom, left, right]
            x8 = R.nn.pad(x8, [0, 0, *hw, 0, 0] if nhwc else [0, 0, 0, 0, *hw], pad_value=float(zx8))

        def conv(data, weight, g):
            return R.nn.conv2d(data, weight, strides=strides, padding=padding, dilation=dilation, groups=g, out_dtype="int32",
                               data_layout=layouts[0], kernel_layout=layouts[1], out_layout=layouts[2])

        acc = conv(x8, w8, groups)
        k = cin_g * kh * kw
        zw_zero = zw_known and not np.any(zw8)
        if zx8 != 0:
            if self.fold and self._weights_known(w_q):
                wv = _const_value(w_q, self.params).astype(np.int32)
                wv = wv - 128 if site.w_dtype == "uint8" else wv
                term = zx8 * wv.sum(axis=red_axes)
                if zw_known:
                    term = term - k * zx8 * np.broadcast_to(np.asarray(zw8, np.int32).reshape(-1), (out_ch,))
                acc = R.subtract(acc, per_channel(relax.const(term.astype(np.int32), "int32")))
                site.folded_weight_terms = True
            else:
                colsum = R.sum(R.astype(w8, "int32"), axis=list(red_axes))  # [O]
                acc = R.subtract(acc, R.multiply(relax.const(zx8, "int32"), per_channel(colsum)))
            if not zw_zero and not (site.folded_weight_terms and zw_known):  # K·zx·zw, unless folded
                acc = R.add(acc, R.multiply(relax.const(k * zx8, "int32"), self._zw_channels(zw8, zw_n, per_channel)))
        if not zw_zero:
            # Σ_k x over each output's window (per group), broadcast to the group's channels.
            ones_shape = (kh, kw, cin_g, groups) if nhwc else (groups, cin_g, kh, kw)
            win = conv(R.astype(x8, "int32"), relax.const(np.ones(ones_shape, np.int32), "int32"), groups)  # [.., groups, ..]
            if groups > 1 and out_ch != groups:
                win = R.repeat(win, out_ch // groups, axis=3 if nhwc else 1)
            acc = R.subtract(acc, R.multiply(self._zw_channels(zw8, zw_n, per_channel), win))

        site.act_zero_point = zx8
        site.weight_zero_point = "zero" if zw_zero else ("nonzero-const" if zw_known else "runtime")
        site.rewritten = True
        self._record(orig, site)
        scale = self._scale(sx, sw)
        if (_shape(sw) or ()) not in ((), (1,)):
            scale = per_channel(scale)
        return R.multiply(R.astype(acc, "float32"), scale)

    # -- helpers -----------------------------------------------------------------------------
    def _scale(self, sx, sw):
        """``sx · sw``: with ``fold_weight_terms`` and a known weight scale, one float32 constant
        (the product TVM would compute, rounded the same) instead of a kernel of its own per site
        at run time (49 tiny kernels in MobileNetV2's int8 graph)."""
        from tvm import relax

        sx_v, sw_v = _const_value(sx, None), _const_value(sw, self.params)
        if self.fold and sx_v is not None and sw_v is not None and sx_v.dtype == sw_v.dtype == np.float32:
            return relax.const(np.multiply(sx_v, sw_v), "float32")
        return relax.op.multiply(sx, sw)

    def _weights_known(self, w_q) -> bool:
        return _const_value(w_q, self.params) is not None

    @staticmethod
    def _zw_expr(zw8):
        from tvm import relax

        if isinstance(zw8, np.ndarray):
            return relax.const(zw8.astype(np.int32), "int32")
        return relax.op.astype(zw8, "int32")

    def _zw_channels(self, zw8, n: int, per_channel):
        """The weight zero point broadcastable against the conv output (``n``: its number of
        elements; ``per_channel``: reshapes a [C] vector for the output layout)."""
        expr = self._zw_expr(zw8)
        return per_channel(expr) if n > 1 else expr


def _patterns():
    from tvm.relax.dpl import is_op, wildcard

    pats = {k: wildcard() for k in ("xq", "sx", "zx", "wq", "sw", "zw")}
    # an activation's dequantize, as an op or written out elementwise (decompose_qdq, for the layout pass)
    written_out = is_op("relax.multiply")(
        is_op("relax.astype")(is_op("relax.subtract")(is_op("relax.astype")(pats["xq"]), pats["zx"])), pats["sx"])
    pats["dqx"] = is_op("relax.dequantize")(pats["xq"], pats["sx"], pats["zx"]) | written_out
    pats["dqw"] = is_op("relax.dequantize")(pats["wq"], pats["sw"], pats["zw"])
    pats["perm"] = is_op("relax.permute_dims")(pats["dqw"])
    pats["xperm"] = is_op("relax.permute_dims")(pats["dqx"])  # an NCHW input made NHWC for a conv
    return pats


def rewrite_int8(mod, params: Mapping[str, np.ndarray] | None = None, *, fold_weight_terms: bool = False,
                 unsigned_activations: bool = False):
    """Rewrite every dequantize → matmul/conv2d site of every Relax function into int8 arithmetic.

    Args:
        mod: a Relax ``IRModule`` (e.g. ``to_relax(...).mod``).
        params: parameter values by name (``dict(zip(model.param_names, model.params))``); used
            to see that weight zero points are zero, and by ``fold_weight_terms``.
        fold_weight_terms: fold ``Σ_k w`` zero-point terms into constants (needs ``params``;
            ties the code to these weights).
        unsigned_activations: a matmul's first operand as uint8 (uint8 × int8 products, what
            x86 VNNI multiplies; int8 activations shift by +128) instead of int8 (int8 × int8,
            what NEON SDOT multiplies). Convolutions keep int8.

    Returns:
        ``(new_mod, Int8Stats)``; functions without a site are returned unchanged.
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call

    rw = _Rewriter(params, fold_weight_terms, unsigned_activations)
    pats = _patterns()
    mm = is_op("relax.matmul")(pats["dqx"], pats["dqw"])
    mm_t = is_op("relax.matmul")(pats["dqx"], pats["perm"])
    conv = is_op("relax.nn.conv2d")(pats["dqx"] | pats["xperm"], pats["dqw"])

    out = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        new = rewrite_call(mm_t, lambda o, m: rw.matmul(o, m, pats, transposed=True), func)
        new = rewrite_call(mm, lambda o, m: rw.matmul(o, m, pats, transposed=False), new)
        new = rewrite_call(conv, lambda o, m: rw.conv2d(o, m, pats), new)
        if not new.same_as(func):
            out[gv] = relax.analysis.remove_all_unused(new)
    return out, Int8Stats([s for _, s in rw.sites])


def fold_epilogues(mod, params: Mapping[str, np.ndarray]):
    """Shorter per-element epilogues for int8 arithmetic, each rewrite exact (same output bits).

    After :func:`rewrite_int8` every int8 conv/matmul output runs, per element, its requantize as
    :func:`~edgecomp.targets.lowering.decompose_qdq` wrote it out (``clip(round(y / s) + z)``
    cast), often behind a ReLU/ReLU6 and ahead of the +128 shift into the next layer's uint8
    domain: 15 ops on MobileNetV2's 112×112×96 expansion, whose int8 kernel took 0.32 ms against
    0.18 ms in fp32 (4 dot instructions per 16 outputs: the epilogue is the kernel). Three folds:

    - a ReLU/ReLU6 clamp ahead of the quantize goes into its integer clamp: for a scale ``s > 0``
      ``round(clamp(y, a, b) / s) + z`` = ``clamp(round(y / s) + z, round(a / s) + z, round(b / s) + z)``
      (division by ``s > 0`` and rounding never reorder values);
    - a quantized tensor read by a domain shift (``q + 128`` to uint8, ``q - 128`` to int8) is
      quantized in the shifted domain directly: ``clip(v, lo, hi) + d`` = ``clip(v + d, lo + d,
      hi + d)`` when both ranges fit their dtypes; its other readers must be written-out
      dequantizes (a residual add's), which take the zero point ``z + d`` (``flips_of``);
    - the dequantize of a parameter with known values (an int32 bias, scale ``sx·sw``) becomes a
      constant (``FoldConstant`` then folds its reshape/transpose: 13 kernels of their own in
      MobileNetV2's int8 graph).
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    R = relax.op

    def const(expr) -> np.ndarray | None:
        value = _const_value(expr, None)
        return value if value is not None and value.size == 1 else None

    w = {k: wildcard() for k in ("x", "y", "s", "z", "hi", "lo", "a", "b", "d")}

    def quantize_of(x):
        return _written_quantize_pattern(x, w)

    quantize = quantize_of(w["x"])

    def fold_clamp(kind):
        def rewrite(orig, m):
            s, z, hi, lo = (const(m[w[k]]) for k in ("s", "z", "hi", "lo"))
            a = const(m[w["a"]]) if "a" in kind else np.float32(-np.inf)
            b = const(m[w["b"]]) if "b" in kind else np.float32(np.inf)
            if any(v is None or v.dtype != np.float32 for v in (s, z, hi, lo, a, b)) or not s > 0 or not a <= b:
                return orig
            step = lambda v: np.rint(np.float32(v) / s.reshape(())) + z.reshape(())  # noqa: E731
            new_hi, new_lo = min(float(hi), float(step(b))), max(float(lo), float(step(a)))
            if new_lo > new_hi:  # a constant output (the clamp range quantizes outside [lo, hi]): leave it
                return orig
            return written_quantize(m[w["y"]], m[w["s"]], m[w["z"]], new_hi, new_lo, _dtype(orig))
        return rewrite

    relus = {
        "ab": is_op("relax.minimum")(is_op("relax.maximum")(w["y"], w["a"]), w["b"]),
        "ba": is_op("relax.maximum")(is_op("relax.minimum")(w["y"], w["b"]), w["a"]),
        "a": is_op("relax.maximum")(w["y"], w["a"]),
    }

    widened = is_op("relax.astype")(quantize)
    shifts = [is_op("relax.astype")(is_op(op)(widened, w["d"])) for op in ("relax.add", "relax.subtract")]
    dequantized = is_op("relax.subtract")(widened, w["d"])  # a written-out dequantize's int32(q) - z

    def shifted_quantize(m, d: int, out: str):
        """The quantize of ``m`` in the domain shifted by ``d`` (dtype ``out``); None if its range does not fit."""
        hi, lo, z = const(m[w["hi"]]), const(m[w["lo"]]), const(m[w["z"]])
        info = np.iinfo(out)
        if hi is None or lo is None or z is None or float(lo) + d < info.min or float(hi) + d > info.max:
            return None
        return written_quantize(m[w["x"]], m[w["s"]], relax.const(np.float32(z.reshape(()) + d)),
                                float(hi) + d, float(lo) + d, out)

    def flips_of(func) -> dict:
        """Quantized tensors to produce in the shifted domain: ``var -> (d, dtype)`` for each one
        that a domain shift reads and whose every reader is such a shift (the same one) or a
        written-out dequantize (``int32(q) - z``, which takes ``z + d`` instead). One tensor read
        by a shift and by a residual's dequantize so costs no kernel of its own (MobileNetV2: 5)."""
        value_of, users = {}, {}
        for block in func.body.blocks:
            for binding in block.bindings:
                value_of[binding.var] = binding.value
                for v in relax.analysis.free_vars(binding.value):
                    users.setdefault(v, []).append(binding.var)
        for v in relax.analysis.free_vars(func.body.body):
            users.setdefault(v, []).append(None)

        def op(var, name: str, dtype: str | None = None):
            value = value_of.get(var)
            return (isinstance(value, relax.Call) and getattr(value.op, "name", "") == name
                    and (dtype is None or _dtype(value) == dtype))

        def only_user(var):
            us = users.get(var, [])
            return us[0] if len(us) == 1 else None

        flips = {}  # keyed by the var and by its value (a pattern match yields either)
        for q, value in value_of.items():
            if not op(q, "relax.astype") or _dtype(value) not in _INT8 or not users.get(q):
                continue
            kinds = set()
            for u in users[q]:
                nxt = only_user(u) if u is not None else None
                if op(u, "relax.astype", "int16") and nxt is not None and (op(nxt, "relax.add") or op(nxt, "relax.subtract")):
                    d, last = const(value_of[nxt].args[1]), only_user(nxt)
                    if d is None or last is None or not op(last, "relax.astype") or _dtype(value_of[last]) not in _INT8:
                        break
                    kinds.add(((1 if op(nxt, "relax.add") else -1) * int(d.reshape(())), _dtype(value_of[last])))
                elif op(u, "relax.astype", "int32") and nxt is not None and op(nxt, "relax.subtract") \
                        and const(value_of[nxt].args[1]) is not None:
                    kinds.add("dequantize")
                else:
                    break
            else:
                shift = [k for k in kinds if k != "dequantize"]
                if len(shift) == 1:
                    flips[q] = flips[value] = shift[0]
        return flips

    def fold_shift(flips):
        def rewrite(orig, m):
            d_dtype = flips.get(m[quantize])
            if d_dtype is None or _dtype(m[widened]) != "int16" or d_dtype[1] != _dtype(orig):
                return orig  # another reader needs the quantized tensor as it is: keep it
            new = shifted_quantize(m, *d_dtype)
            return orig if new is None else new
        return rewrite

    def fold_dequantized(flips):
        def rewrite(orig, m):
            d_dtype = flips.get(m[quantize])
            z = const(m[w["d"]])
            if d_dtype is None or _dtype(m[widened]) != "int32" or z is None:
                return orig
            new = shifted_quantize(m, *d_dtype)
            if new is None:
                return orig
            return R.subtract(R.astype(new, "int32"), relax.const(np.int32(int(z.reshape(())) + d_dtype[0])))
        return rewrite

    dq = is_op("relax.dequantize")(w["x"], w["s"], w["z"])

    def fold_dequantize(orig, m):
        q, s, z = (_const_value(m[w[k]], params) for k in ("x", "s", "z"))
        if q is None or s is None or z is None or str(orig.attrs.out_dtype) != "float32" or s.dtype != np.float32:
            return orig
        if q.dtype != np.int32:  # weights stay parameters; an int32 tensor is a bias (scale sx·sw)
            return orig
        shape = [1] * q.ndim
        if s.size > 1 or z.size > 1:
            shape[int(orig.attrs.axis) % q.ndim] = -1
        value = (q - z.astype(np.int32).reshape(shape)).astype(np.float32) * s.reshape(shape)
        return relax.const(value.astype(np.float32), "float32")

    out = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        new = rewrite_call(dq, fold_dequantize, func)
        for kind, relu in relus.items():
            new = rewrite_call(quantize_of(relu), fold_clamp(kind), new)
        new = relax.analysis.remove_all_unused(new)
        flips = flips_of(new)
        if flips:
            for shift in shifts:
                new = rewrite_call(shift, fold_shift(flips), new)
            new = rewrite_call(dequantized, fold_dequantized(flips), new)
            # each reader got its own copy of the shifted quantize: one binding, one kernel
            new = relax.transform.EliminateCommonSubexpr()(tvm.IRModule({"main": new}))["main"]
        if not new.same_as(func):
            out[gv] = relax.analysis.remove_all_unused(new)
    return out


def reciprocal_scales(mod):
    """Every written-out quantize with a constant scale multiplies by ``1 / s`` instead of dividing
    by ``s``: ``round(x * (1 / s))``. A division per element is the slowest instruction of the
    requantize epilogue (x86 ``vdivps``: one per 10 cycles for 16 lanes). MobileNetV2's int8 conv
    kernels took 10% less time in total (2.61 -> 2.36 ms, kernels timed alone).

    Not bit-exact: ``x * (1 / s)`` is within an ulp or so of ``x / s``, so an output moves by one
    step where ``x / s`` lies that close to a rounding tie (:func:`fold_epilogues`' rewrites are
    exact, this one is not). ONNX Runtime's own int8 kernels (QLinearConv, QLinearMatMul) also
    requantize by multiplying with a precomputed scale.
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import rewrite_call, wildcard

    w = {k: wildcard() for k in ("x", "s", "z", "hi", "lo")}
    quantize = _written_quantize_pattern(w["x"], w)

    def rewrite(orig, m):
        s, hi, lo = (_const_value(m[w[k]], None) for k in ("s", "hi", "lo"))
        if any(v is None or v.size != 1 or v.dtype != np.float32 for v in (s, hi, lo)) or not s.reshape(()) > 0:
            return orig
        return written_quantize(m[w["x"]], m[w["s"]], m[w["z"]], float(hi.reshape(())), float(lo.reshape(())),
                                _dtype(orig), reciprocal=True)

    out = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            new = rewrite_call(quantize, rewrite, func)
            if not new.same_as(func):
                out[gv] = new
    return out


def count_int_ops(mod) -> dict[str, int]:
    """How many matmul/conv2d calls of the module produce int32, float32 or another dtype.

    The int32 count includes the rewrite's helper convolutions (windowed sums for non-zero
    weight zero points), so it is at least the number of rewritten sites.
    """
    from tvm import relax

    counts = {"int32": 0, "float32": 0, "other": 0}

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") in ("relax.matmul", "relax.nn.conv2d"):
            dtype = _dtype(expr)
            counts[dtype if dtype in counts else "other"] += 1

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return counts
