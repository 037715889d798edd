"""Low-rank decomposition of ``Conv(x, W, [B])`` with a constant 4-D weight ``W: [Cout, Cin, kh, kw]``.

One Conv becomes a short chain of cheaper Convs (``config.conv_method``):

- ``tucker2`` (Kim et al. 2016): ``W ≈ G ×₀ U_out ×₁ U_in`` with ranks ``(r_out, r_in)``:
  1x1 ``Cin→r_in`` (``U_inᵀ``), ``kh×kw`` ``r_in→r_out`` (the core ``G``, with the original
  stride/pads/dilation), 1x1 ``r_out→Cout`` (``U_out``, with the bias). HOSVD start (eigenvectors
  of the two unfoldings' Gram matrices), refined by a few HOOI sweeps of tensorly's
  ``partial_tucker``.
- ``cp`` (Lebedev et al. 2015): rank-R CP ``W ≈ Σ_r a_r ∘ b_r ∘ h_r ∘ w_r`` (tensorly's
  ``parafac``, SVD init, ``random_state=0``): 1x1 ``Cin→R``, depthwise ``kh×1`` (group R, the H
  stride/pads/dilation), depthwise ``1×kw`` (group R, the W ones), 1x1 ``R→Cout`` with the bias.
- ``spatial`` (Jaderberg et al. 2014): SVD of W reshaped to ``[Cin·kh, Cout·kw]``: ``kh×1``
  ``Cin→R`` then ``1×kw`` ``R→Cout`` (+bias), stride/pads/dilation split per axis.
- a 1x1 conv is a matrix ``[Cout, Cin]``: whatever the method, plain SVD into two 1x1 convs (the
  first keeps stride/pads, the second the bias); ``method`` is then ``"svd"``.

Per-axis splitting is exact because a Conv's H and W axes are independent: zero padding of one
axis commutes with a kernel that spans only the other, and ``auto_pad`` ``SAME_*``/``VALID`` pads
each axis from that axis' own size, stride, kernel and dilation, so it is carried as is. The
leading 1x1 convs (Tucker-2, CP) have no bias, so the zeros the next conv pads with are still the
zeros of the original input.

**One driver rank → a decomposition.** The driver hands one integer per layer:

- ``tucker2``: ``full_rank = D = max(Cout, Cin)``; rank ``r`` keeps ``r_out = round(r·Cout/D)``
  and ``r_in = round(r·Cin/D)`` (each at least 1), i.e. the same *fraction* of both channel dims,
  further clipped to the multilinear rank bounds (``r_out ≤ r_in·kh·kw``, ``r_in ≤ r_out·kh·kw``).
  At ``r = D`` both factors are square orthogonal and the chain is exact (the chain always has
  its three convs, even when ``r_in = Cin``: the cost model counts them, so the driver only
  picks such a chain when it still pays). ``spectrum()`` is the
  singular values of the unfolding along the larger channel dim (mode 0 when ``Cout ≥ Cin``),
  zero-padded to ``D``, so ``erank``/``energy``/``l1`` pick the rank of that mode and the other
  follows in proportion.
- ``cp``: ``full_rank = max(Cout, Cin)`` and the same spectrum as Tucker-2, so a policy gives
  comparable ranks for either method. CP is *not* exact at that rank (a 4-way tensor's CP rank can
  reach ``kh·kw·min(Cout, Cin)``); since the driver keeps ``rank ≥ full_rank`` dense anyway, this
  only means the largest CP rank offered is ``D - 1``.
- ``spatial`` and 1x1 SVD: the matrix rank; ``full_rank = min`` of the matrix dims, ``spectrum``
  its singular values (exact at full rank).

**Left alone:** depthwise convs (``group > 1`` and ``Cin/group == 1``, channel multipliers
included: there is nothing across channels to factor), and every other grouped conv (``group >
1``) — a deliberate choice: a per-group decomposition needs grouped 1x1 convs whose saving is
``1/group`` of the already small dense cost, and grouped convs in real models are mostly the
depthwise kind. Also left alone: weights that are not constant initializers, are graph inputs
(overridable defaults), feed more than one node (tied), are not float, or are not 4-D (Conv1d/3d).

``error(rank)`` is the relative weight-space error ``‖W − W_r‖_F / ‖W‖_F``, except for 1x1 convs,
which are data-aware like MatMul: with calibration data their input's channel second moment
whitens the SVD (the math is ``lowrank_gemm.GemmLayer``'s on ``W[:, :, 0, 0]ᵀ``) and the error is
the output error on the calibration data. ``cost(rank)`` counts weights + bias and MACs per
inference from the graph's shapes (input and output spatial sizes; an unknown batch counts as 1).
Decompositions are cached per rank on the layer: the driver asks for the same rank several times.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any

import numpy as np
import onnx_ir as ir

from edgecomp.errors import InputError
from edgecomp.passes.base import taken_names, unique_name
from edgecomp.passes.lowrank import Cost, FactorizableLayer, LowRankConfig, register_factorizer
from edgecomp.passes.lowrank_gemm import GemmLayer

__all__ = ["ConvGeometry", "ConvLayer", "find_conv_layers", "CONV_METHODS", "HOOI_ITERS", "CP_ITERS"]

log = logging.getLogger(__name__)

CONV_METHODS = ("tucker2", "cp", "spatial")
#: HOOI sweeps after the HOSVD start. Each sweep is two SVDs of ``[C, r·kh·kw]`` unfoldings; the
#: error gain past the first sweeps is small (random 256x256x3x3 at rank 128: 0.736 → 0.732).
HOOI_ITERS = 3
#: CP-ALS sweeps (tensorly's parafac). A sweep costs ~4·Cout·Cin·kh·kw·R MACs; past ~25 sweeps the
#: error moves little (digits 32x16x3x3 at R=16: 0.522 → 0.497 at 100 sweeps).
CP_ITERS = 25
#: stop earlier when an ALS sweep improves the relative error by less than this
_CP_TOL = 1e-7
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """What the cost model and the rewrite need to know about one Conv (no graph references)."""

    cout: int
    cin: int
    kh: int
    kw: int
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # (top, left, bottom, right), ONNX order
    auto_pad: str  # NOTSET | SAME_UPPER | SAME_LOWER | VALID
    has_bias: bool
    batch: int
    hin: int
    win: int
    hout: int
    wout: int

    def attrs(self, axis: str, kernel: tuple[int, int]) -> dict[str, Any]:
        """Attributes of a chain conv: ``axis`` is ``"hw"`` (both axes, the original spatial
        behaviour), ``"h"`` / ``"w"`` (that axis only) or ``""`` (a plain 1x1)."""
        sh, sw = self.strides if "h" in axis or "w" in axis else (1, 1)
        dh, dw = self.dilations
        pt, pl, pb, pr = self.pads
        if axis == "h":
            sw, dw, pl, pr = 1, 1, 0, 0
        elif axis == "w":
            sh, dh, pt, pb = 1, 1, 0, 0
        elif axis == "":
            dh = dw = 1
            pt = pl = pb = pr = 0
        out: dict[str, Any] = {"kernel_shape": list(kernel), "strides": [sh, sw], "dilations": [dh, dw]}
        if axis and self.auto_pad != "NOTSET":
            out["auto_pad"] = self.auto_pad
        else:
            out["pads"] = [pt, pl, pb, pr]
        return out


@dataclasses.dataclass
class _Decomposition:
    stages: list[tuple[np.ndarray, dict[str, Any]]]  # (float64 weight, Conv attributes); bias on the last
    error: float


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else list(default)


def _out_size(size: int, k: int, s: int, d: int, p0: int, p1: int, auto_pad: str) -> int:
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return -(-size // s)
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


def _shape_of(value: ir.Value | None, inferred: dict[str, list[int | None]]) -> list[int | None] | None:
    """The value's dims (ints, or None where unknown): its own shape, else ONNX-inferred ones."""
    if value is None:
        return None
    own = [d if isinstance(d, int) else None for d in value.shape] if value.shape is not None else None
    other = inferred.get(value.name or "")
    if own is None:
        return other
    if other is not None and len(other) == len(own):
        return [a if a is not None else b for a, b in zip(own, other)]
    return own


def _infer_shapes(model: ir.Model) -> dict[str, list[int | None]]:
    """Static dims of every value ONNX shape inference can work out, on a serialized copy (the
    model itself is not touched): the pass may run before any shape pass has recorded them."""
    import onnx

    try:
        proto = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model), data_prop=True)
    except Exception as err:  # noqa: BLE001  (shapes only feed the MAC count)
        log.debug("shape inference failed (%s): MACs of convs with unknown sizes are per pixel", err)
        return {}
    out: dict[str, list[int | None]] = {}
    for info in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]:
        t = info.type.tensor_type
        if t.HasField("shape"):
            out[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return out


def _geometry(node: ir.Node, wshape: tuple[int, ...], inferred: dict[str, list[int | None]]) -> ConvGeometry:
    cout, cin, kh, kw = wshape
    strides = _ints(node, "strides", [1, 1])
    dil = _ints(node, "dilations", [1, 1])
    pads = _ints(node, "pads", [0, 0, 0, 0])
    ap = node.attributes.get("auto_pad")
    auto_pad = ap.as_string() if ap is not None else "NOTSET"
    if auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    xs = _shape_of(node.inputs[0], inferred) or []
    ys = _shape_of(node.outputs[0], inferred) or []
    xs, ys = (xs + [None] * 4)[:4], (ys + [None] * 4)[:4]
    batch = xs[0] or ys[0] or 1  # a dynamic batch counts as 1
    hin, win, hout, wout = xs[2], xs[3], ys[2], ys[3]
    if hin is not None and win is not None:
        hout = _out_size(hin, kh, strides[0], dil[0], pads[0], pads[2], auto_pad) if hout is None else hout
        wout = _out_size(win, kw, strides[1], dil[1], pads[1], pads[3], auto_pad) if wout is None else wout
    elif hout is not None and wout is not None:
        hin, win = hout * strides[0], wout * strides[1]  # estimate: only the MAC count uses it
    else:
        log.debug("conv %s: spatial size unknown, MACs counted per output pixel", node.name)
        hin = win = hout = wout = 1
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    return ConvGeometry(
        cout, cin, kh, kw, (strides[0], strides[1]), (dil[0], dil[1]), tuple(pads), auto_pad,  # type: ignore[arg-type]
        has_bias, int(batch), int(hin), int(win), int(hout), int(wout),
    )


def _rel_error(w: np.ndarray, approx: np.ndarray) -> float:
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(w - approx)) / norm if norm > 0 else 0.0


def _tail_error(s: np.ndarray, rank: int) -> float:
    total = float(np.sum(s**2))
    return math.sqrt(max(0.0, float(np.sum(s[rank:] ** 2))) / total) if total > 0 else 0.0


def _gram_basis(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors and singular values of a wide matrix ``m`` (largest first), from the
    eigen-decomposition of ``m mᵀ``: for ``[256, 2304]`` unfoldings this is ~10x faster than SVD,
    and at full rank any orthonormal basis reconstructs exactly."""
    lam, vec = np.linalg.eigh(m @ m.T)
    order = np.argsort(lam)[::-1]
    return vec[:, order], np.sqrt(np.maximum(lam[order], 0.0))


def _mttkrp(tensor: np.ndarray, cp_tensor: tuple, mode: int) -> np.ndarray:
    """``unfold(tensor, mode) @ khatri_rao(factors, skip=mode)`` without forming the Khatri-Rao
    product: one GEMM against the largest other mode, then the small modes one by one.

    tensorly's default forms the ``(Cout·Cin·k) × R`` Khatri-Rao matrix for each kernel mode,
    which made a 256x256x3x3 rank-128 CP take ~30 s; this is the same contraction in ~12 ms.
    """
    weights, factors = cp_tensor
    others = [i for i in range(tensor.ndim) if i != mode]
    big = max(others, key=lambda i: tensor.shape[i])
    t = np.tensordot(tensor, factors[big], axes=([big], [0]))  # remaining axes, then r
    axes = [i for i in range(tensor.ndim) if i != big]
    for i in others:
        if i == big:
            continue
        t = np.einsum("...ir,ir->...r", np.moveaxis(t, axes.index(i), -2), factors[i])
        axes.remove(i)
    return t * weights[None, :] if weights is not None else t


_TENALG: Any = None


def _tenalg_backend() -> Any:
    """tensorly's core tensor-algebra backend with :func:`_mttkrp` swapped in (tensorly's own
    extension point, used thread-locally: parafac's ALS itself is tensorly's)."""
    global _TENALG
    if _TENALG is None:
        from tensorly.tenalg.core_tenalg import CoreTenalgBackend

        class ConvTenalgBackend(CoreTenalgBackend, backend_name="edgecomp_conv"):
            pass

        ConvTenalgBackend.register_method("unfolding_dot_khatri_rao", _mttkrp)
        _TENALG = ConvTenalgBackend()
    return _TENALG


class ConvLayer(FactorizableLayer):
    """One Conv node with a constant weight, decomposed by ``method``.

    Holds only numbers (the weight as float64, its dtype, the geometry); :meth:`apply` finds the
    node by name in whatever model it is given.
    """

    op = "Conv"

    def __init__(
        self, name: str, weight: np.ndarray, dtype: ir.DataType, geometry: ConvGeometry, method: str,
        input_name: str | None = None,
    ) -> None:
        self.name = name
        self.weight_shape = tuple(int(d) for d in weight.shape)
        self.geometry = geometry
        self._w = np.asarray(weight, dtype=np.float64)
        self._dtype = dtype
        self.method = "svd" if weight.shape[2:] == (1, 1) else method
        self._cache: dict[int, _Decomposition] = {}
        self._spectrum: np.ndarray | None = None
        self._bases: Any = None  # per method: SVD factors or HOSVD bases, computed once
        # A 1x1 conv is a matrix over channels: x·Wᵀ per pixel. Its (data-aware) SVD is the MatMul one.
        self._matrix: GemmLayer | None = None
        if self.method == "svd":
            self.input_name, self.input_axis = input_name, 1
            self._matrix = GemmLayer(name, "Conv", self._w[:, :, 0, 0].T, self.weight_shape, input_name=input_name)

    def set_input_moment(self, moment: np.ndarray, rows: int | None = None) -> None:
        """Channel second moment of the input (1x1 convs only): whitens the SVD."""
        if self._matrix is not None:
            self._matrix.set_input_moment(moment, rows)
            self.method = "whitened-svd" if self._matrix.method == "whitened-svd" else "svd"
            self._cache.clear()
            self._spectrum = None

    # -- rank bookkeeping ------------------------------------------------------------------------
    @property
    def full_rank(self) -> int:
        g = self.geometry
        if self._matrix is not None:
            return min(g.cout, g.cin)
        if self.method == "spatial":
            return min(g.cin * g.kh, g.cout * g.kw)
        return max(g.cout, g.cin)

    def tucker_ranks(self, rank: int) -> tuple[int, int]:
        """``(r_out, r_in)`` that Tucker-2 keeps for the driver's ``rank`` (see the module doc)."""
        g = self.geometry
        d = max(g.cout, g.cin)
        rank = max(1, min(int(rank), d))
        r_out = min(g.cout, max(1, math.floor(rank * g.cout / d + 0.5)))
        r_in = min(g.cin, max(1, math.floor(rank * g.cin / d + 0.5)))
        k = g.kh * g.kw
        return min(r_out, r_in * k), min(r_in, r_out * k)

    def _matrix_svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SVD of the spatial unfolding: rows (c, i), columns (o, j) (1x1 convs use ``_matrix``)."""
        if self._bases is None:
            g = self.geometry
            m = self._w.transpose(1, 2, 0, 3).reshape(g.cin * g.kh, g.cout * g.kw)
            self._bases = np.linalg.svd(m, full_matrices=False)
        return self._bases

    def _hosvd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self._bases is None:
            g = self.geometry
            u_out, s_out = _gram_basis(self._w.reshape(g.cout, -1))
            u_in, s_in = _gram_basis(self._w.transpose(1, 0, 2, 3).reshape(g.cin, -1))
            self._bases = (u_out, s_out, u_in, s_in)
        return self._bases

    def spectrum(self) -> np.ndarray:
        if self._matrix is not None:
            return self._matrix.spectrum()
        if self._spectrum is None:
            if self.method == "spatial":
                s = self._matrix_svd()[1]
            else:
                g = self.geometry
                u_out, s_out, u_in, s_in = self._hosvd()
                s = s_out if g.cout >= g.cin else s_in
                # The unfolding has at most Cother·kh·kw nonzero singular values; pad to full_rank.
                s = np.concatenate([s, np.zeros(max(0, self.full_rank - len(s)))])
            self._spectrum = np.asarray(s[: self.full_rank], dtype=np.float64)
        return self._spectrum

    # -- cost and error --------------------------------------------------------------------------
    def cost(self, rank: int | None) -> Cost:
        g = self.geometry
        bias = g.cout if g.has_bias else 0
        n, pin, pout = g.batch, g.hin * g.win, g.hout * g.wout
        if rank is None:
            k = g.cin * g.kh * g.kw
            return Cost(g.cout * k + bias, n * g.cout * k * pout)
        if self._matrix is not None:
            r = self._clip(rank)
            return Cost(r * (g.cin + g.cout) + bias, n * r * (g.cin + g.cout) * pout)
        if self.method == "spatial":
            r = self._clip(rank)
            p1, p2 = g.cin * g.kh * r, r * g.cout * g.kw
            return Cost(p1 + p2 + bias, n * (p1 * g.hout * g.win + p2 * pout))
        if self.method == "tucker2":
            r_out, r_in = self.tucker_ranks(rank)
            core = r_out * r_in * g.kh * g.kw
            params = g.cin * r_in + core + r_out * g.cout
            return Cost(params + bias, n * (g.cin * r_in * pin + (core + r_out * g.cout) * pout))
        r = self._clip(rank)  # cp
        params = r * (g.cin + g.kh + g.kw + g.cout)
        macs = g.cin * r * pin + r * g.kh * g.hout * g.win + r * (g.kw + g.cout) * pout
        return Cost(params + bias, n * macs)

    def _clip(self, rank: int) -> int:
        return max(1, min(int(rank), self.full_rank))

    def error(self, rank: int) -> float:
        return self.decompose(rank).error

    # -- decompositions --------------------------------------------------------------------------
    def decompose(self, rank: int) -> _Decomposition:
        """The chain of conv weights (float64) and attributes at ``rank`` (cached per rank)."""
        rank = self._clip(rank)
        if rank not in self._cache:
            build = self._svd if self._matrix is not None else {"spatial": self._spatial, "tucker2": self._tucker2, "cp": self._cp}[self.method]
            self._cache[rank] = build(rank)
        return self._cache[rank]

    def _svd(self, r: int) -> _Decomposition:
        g = self.geometry
        a, b = self._matrix.factors(r)  # Wᵀ ≈ A·B, A: [Cin, r], B: [r, Cout]
        first = a.T.astype(np.float64)[:, :, None, None]  # [r, Cin, 1, 1]
        last = b.T.astype(np.float64)[:, :, None, None]  # [Cout, r, 1, 1]
        attrs = g.attrs("hw", (1, 1))  # the original 1x1's stride/pads/auto_pad
        return _Decomposition([(first, attrs), (last, g.attrs("", (1, 1)))], self._matrix.error(r))

    def _spatial(self, r: int) -> _Decomposition:
        g = self.geometry
        u, s, vt = self._matrix_svd()
        root = np.sqrt(s[:r])
        v1 = (u[:, :r] * root[None, :]).reshape(g.cin, g.kh, r).transpose(2, 0, 1)[:, :, :, None]  # [r, Cin, kh, 1]
        v2 = (root[:, None] * vt[:r]).reshape(r, g.cout, g.kw).transpose(1, 0, 2)[:, :, None, :]  # [Cout, r, 1, kw]
        stages = [(v1, g.attrs("h", (g.kh, 1))), (v2, g.attrs("w", (1, g.kw)))]
        return _Decomposition(stages, _tail_error(s, r))

    def _tucker2(self, rank: int) -> _Decomposition:
        from tensorly.decomposition import partial_tucker
        from tensorly.tenalg import multi_mode_dot

        g = self.geometry
        r_out, r_in = self.tucker_ranks(rank)
        u_out, _, u_in, _ = self._hosvd()
        factors = [u_out[:, :r_out].copy(), u_in[:, :r_in].copy()]
        core = multi_mode_dot(self._w, factors, modes=[0, 1], transpose=True)
        if r_out < g.cout or r_in < g.cin:  # at full size the HOSVD is exact already
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                (core, factors), _ = partial_tucker(
                    self._w, [r_out, r_in], modes=[0, 1], init=(core, factors),
                    n_iter_max=HOOI_ITERS, tol=1e-6, random_state=0,
                )
        approx = multi_mode_dot(core, factors, modes=[0, 1])
        stages = [
            (factors[1].T[:, :, None, None], g.attrs("", (1, 1))),  # [r_in, Cin, 1, 1]
            (np.asarray(core), g.attrs("hw", (g.kh, g.kw))),  # [r_out, r_in, kh, kw]
            (factors[0][:, :, None, None], g.attrs("", (1, 1))),  # [Cout, r_out, 1, 1]
        ]
        return _Decomposition(stages, _rel_error(self._w, approx))

    def _cp(self, r: int) -> _Decomposition:
        import tensorly as tl
        from tensorly.decomposition import parafac

        g = self.geometry
        with warnings.catch_warnings(), tl.tenalg.backend_context(_tenalg_backend(), local_threadsafe=True):
            warnings.simplefilter("ignore")  # "n_eigenvecs larger than the dim" for the kh/kw modes
            cp = parafac(self._w, r, n_iter_max=CP_ITERS, init="svd", tol=_CP_TOL, random_state=0)
        weights, (a, b, h, w) = cp
        approx = tl.cp_to_tensor(cp)
        # Balance the scale of each rank-1 term over the four factors (float32 range/precision).
        norms = [np.linalg.norm(f, axis=0) for f in (a, b, h, w)]
        scale = np.abs(np.asarray(weights)) * np.prod(norms, axis=0)
        root = scale ** 0.25
        a, b, h, w = (f / np.where(n > 0, n, 1.0)[None, :] * root[None, :] for f, n in zip((a, b, h, w), norms))
        a = a * np.sign(np.asarray(weights))[None, :]
        stages = [
            (b.T[:, :, None, None], g.attrs("", (1, 1))),  # [R, Cin, 1, 1]
            (h.T[:, None, :, None], {**g.attrs("h", (g.kh, 1)), "group": r}),  # [R, 1, kh, 1]
            (w.T[:, None, None, :], {**g.attrs("w", (1, g.kw)), "group": r}),  # [R, 1, 1, kw]
            (a[:, :, None, None], g.attrs("", (1, 1))),  # [Cout, R, 1, 1]
        ]
        return _Decomposition(stages, _rel_error(self._w, approx))

    # -- the rewrite -----------------------------------------------------------------------------
    def apply(self, model: ir.Model, rank: int) -> None:
        """Replace the Conv by its chain; the original node becomes the chain's last conv, so its
        name and output value (and every consumer) stay as they were."""
        graph = model.graph
        node = graph.node(self.name)
        if node.op_type != "Conv" or len(node.inputs) < 2 or node.inputs[1] is None:
            raise ValueError(f"node {self.name!r} is not the Conv this layer was found as")
        old_w = node.inputs[1]
        if old_w.const_value is None or tuple(old_w.const_value.shape) != self.weight_shape:
            raise ValueError(f"node {self.name!r}: weight is not the constant {list(self.weight_shape)} (factorized already?)")
        stages = self.decompose(rank).stages
        taken = taken_names(graph)
        x = node.inputs[0]
        batch_dim = x.shape[0] if x is not None and x.shape is not None and len(x.shape) == 4 else None
        for i, (weight, attrs) in enumerate(stages[:-1]):
            w_val = _initializer(graph, unique_name(f"{self.name}.lr_w{i}", taken), weight, self._dtype)
            h = ir.Value(name=unique_name(f"{self.name}.lr_h{i}", taken), type=ir.TensorType(self._dtype))
            if batch_dim is not None:
                h.shape = ir.Shape([batch_dim, weight.shape[0], None, None])
            conv = ir.node("Conv", [x, w_val], {a.name: a for a in _attributes(attrs)}, outputs=[h], name=unique_name(f"{self.name}.lr{i}", taken))
            graph.insert_before(node, conv)
            x = h
        weight, attrs = stages[-1]
        w_last = _initializer(graph, unique_name(f"{self.name}.lr_w{len(stages) - 1}", taken), weight, self._dtype)
        node.replace_input_with(0, x)
        node.replace_input_with(1, w_last)
        for key in ("kernel_shape", "strides", "pads", "dilations", "group", "auto_pad"):
            node.attributes.pop(key, None)
        for attr in _attributes(attrs):
            node.attributes[attr.name] = attr
        if not old_w.uses() and old_w.name in graph.initializers and not old_w.is_graph_output():
            graph.initializers.pop(old_w.name)


def _attributes(attrs: dict[str, Any]) -> list[ir.Attr]:
    out = []
    for key, value in attrs.items():
        if isinstance(value, str):
            out.append(ir.AttrString(key, value))
        elif isinstance(value, list):
            out.append(ir.AttrInt64s(key, [int(v) for v in value]))
        else:
            out.append(ir.AttrInt64(key, int(value)))
    return out


def _initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
    np_dtype = dtype.numpy()
    data = np.ascontiguousarray(array).astype(np_dtype)
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(data.shape), const_value=ir.tensor(data, name=name))
    graph.register_initializer(value)
    return value


def _constant_weight(value: ir.Value | None) -> np.ndarray | None:
    """The value's array if it is a constant 4-D float initializer used by this node alone."""
    if value is None or value.const_value is None or value.producer() is not None or value.is_graph_input():
        return None
    if len(value.uses()) != 1 or value.is_graph_output() or value.dtype not in _FLOAT_TYPES:
        return None
    array = value.const_value.numpy()
    return array if array.ndim == 4 else None


def find_conv_layers(model: ir.Model, method: str) -> list[ConvLayer]:
    """Every main-graph Conv this module can decompose, wrapped as :class:`ConvLayer`."""
    if method not in CONV_METHODS:
        raise InputError(f"unknown conv decomposition {method!r} (known: {', '.join(CONV_METHODS)})")
    found = []
    for node in model.graph:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        weight = _constant_weight(node.inputs[1])
        if weight is None or 0 in weight.shape:
            continue
        group_attr = node.attributes.get("group")
        group = group_attr.as_int() if group_attr is not None else 1
        if group > 1:
            kind = "depthwise" if weight.shape[1] == 1 else "grouped"
            log.debug("conv %s: %s conv (group %d) left alone", node.name, kind, group)
            continue
        found.append((node, weight))

    def known(value: ir.Value | None) -> bool:
        return value is not None and value.shape is not None and len(value.shape) == 4 and all(
            isinstance(d, int) for d in list(value.shape)[2:]
        )

    inferred = {} if all(known(n.inputs[0]) and known(n.outputs[0]) for n, _ in found) else _infer_shapes(model)
    return [
        ConvLayer(node.name, weight, node.inputs[1].dtype, _geometry(node, tuple(weight.shape), inferred), method,
                  input_name=node.inputs[0].name)
        for node, weight in found
    ]


@register_factorizer("conv")
def _conv_factorizer(model: ir.Model, config: LowRankConfig) -> list[FactorizableLayer]:
    return list(find_conv_layers(model, config.conv_method))
