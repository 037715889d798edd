"""Factorized layers for PyTorch that export to the ONNX the low-rank graph passes write.

Why: compression-aware training (issue 9) trains a network in the shape it will be deployed in.
When a torch layer exports to exactly the op chain the graph pass writes for the same weight, a
model trained factorized and a model factorized after training compile to the same kernels, and
the pass's cost model, rank policies and error measures describe both.

So the numbers are the passes' own: each ``from_*`` classmethod wraps the torch weight in the
pass's layer object (``GemmLayer`` of ``passes/lowrank_gemm.py``, ``ConvLayer`` of
``passes/lowrank_conv.py``, ``TTLayer`` of ``passes/tensor_train.py``), asks it for the factors at
a rank, and copies them into modules. Nothing is re-derived here; this file only lays the factors
out as ``nn.Linear``/``nn.Conv2d``/matmuls in the order the pass writes its nodes:

==================  ==============================================  ============================
module              torch forward (and ONNX export)                 pass rewrite of the dense op
==================  ==============================================  ============================
``LowRankLinear``   Linear(in→r, no bias) → Linear(r→out)           MatMul(x, A) → Gemm/MatMul
                    = MatMul → Gemm
``SVDConv2d``       1x1 Conv (stride/pads) → 1x1 Conv (+bias)       the same two Convs
``SpatialConv2d``   kh×1 Conv (H stride/pads) → 1×kw Conv (+bias)   the same two Convs
``Tucker2Conv2d``   1x1 → kh×kw core (stride/pads) → 1x1 (+bias)    the same three Convs
``CPConv2d``        1x1 → depthwise kh×1 → depthwise 1×kw → 1x1     the same four Convs
``TTLinear``        Reshape → MatMul(C₀, ·) → (Reshape → MatMul)…   the same Reshape/MatMul
                    → Reshape → Add(bias)                           chain (+ Add for the bias)
==================  ==============================================  ============================

Conv stage attributes come from the pass's ``ConvGeometry.attrs`` (one source for how stride,
padding and dilation split over a chain); each conv class checks that the pass's stages have the
layout its constructor builds, so a change in the pass shows up as an error, not a silent
mismatch. Ranks mean what they mean in the pass (Tucker-2: one driver rank → ``(r_out, r_in)``
in proportion to the channel dims; TT: the max TT rank).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgecomp.errors import InputError
from edgecomp.passes.lowrank import FactorizableLayer
from edgecomp.passes.lowrank_conv import CONV_METHODS, ConvGeometry, ConvLayer
from edgecomp.passes.lowrank_gemm import GemmLayer
from edgecomp.passes.tensor_train import TTLayer, factorize_dims, find_tt_layers, tt_ranks

__all__ = [
    "Factorized", "LowRankLinear", "TTLinear",
    "FactorizedConv2d", "SVDConv2d", "SpatialConv2d", "Tucker2Conv2d", "CPConv2d",
    "linear_decomposition", "tt_decomposition", "conv_decomposition", "conv_geometry",
    "factorized_conv", "factorized_from",
]


def _numpy(t: Any) -> np.ndarray:
    return t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


def _param(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array), dtype=like.dtype, device=like.device)


def _copy_(dst: torch.Tensor, src: Any) -> None:
    with torch.no_grad():
        dst.copy_(torch.as_tensor(np.ascontiguousarray(src)) if isinstance(src, np.ndarray) else src)


class Factorized(nn.Module):
    """Marker base: a factorized layer (``factorize`` never descends into one)."""

    def dense_weight(self) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -- the pass's layer objects, built from a torch weight -----------------------------------------
def linear_decomposition(linear: nn.Linear, *, moment: Any = None, rows: int | None = None,
                         positions: int = 1, name: str = "linear") -> GemmLayer:
    """``GemmLayer`` of ``linear`` as the pass sees torch's export ``Gemm(x, W, b, transB=1)``:
    effective weight ``Wᵀ [in, out]``. ``moment`` (``XᵀX/rows`` of the input, ``[in, in]``) makes
    it data-aware (whitened SVD; ``rows`` sets the pass's shrinkage); ``positions`` is the rows
    per sample (tokens), for the MAC count."""
    w = linear.weight
    layer = GemmLayer(name, "Gemm", _numpy(w).T, tuple(w.shape), input_name=None, rows=positions,
                      bias_params=0 if linear.bias is None else linear.bias.numel())
    if moment is not None:
        m = _numpy(moment)
        if m.shape != (linear.in_features,) * 2:
            raise ValueError(f"{name}: input moment {m.shape} does not match in_features={linear.in_features}")
        layer.set_input_moment(m, rows)
    return layer


def tt_decomposition(linear: nn.Linear, *, positions: int = 1, name: str = "linear") -> TTLayer:
    """``TTLayer`` of ``linear``, found by the pass itself on a one-node graph of the ``Gemm``
    torch exports (``TTLayer`` is built from a graph node). ValueError when the dims do not
    factor (``tensor_train.factorize_dims``)."""
    w = linear.weight.detach().cpu().float().numpy()
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    if linear.bias is not None:
        inits.append(numpy_helper.from_array(linear.bias.detach().cpu().float().numpy(), "B"))
        inputs.append("B")
    node = helper.make_node("Gemm", inputs, ["y"], name=name, transB=1)
    graph = helper.make_graph(
        [node], "tt", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [positions, linear.in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [positions, linear.out_features])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    found = find_tt_layers(ir.serde.deserialize_model(proto))
    if not found:
        raise ValueError(f"{name}: {linear.in_features}x{linear.out_features} does not factor into TT modes")
    return found[0]


def _pads(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """ONNX ``(top, left, bottom, right)`` of a torch ``padding`` (ints or ``'same'``/``'valid'``;
    torch's ``'same'`` puts an odd extra pixel at the end)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return (total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2)
    ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return (ph, pw, ph, pw)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_geometry(in_channels: int, out_channels: int, kernel_size: Any, *, stride: Any = 1, padding: Any = 0,
                  dilation: Any = 1, bias: bool = True, input_hw: Sequence[int] | None = None,
                  output_hw: Sequence[int] | None = None) -> ConvGeometry:
    """The pass's ``ConvGeometry`` of a torch conv, per sample (batch 1). Without ``input_hw``
    the spatial sizes are 1, i.e. MACs per output pixel, as the pass counts unknown sizes."""
    k, s, d = _pair(kernel_size), _pair(stride), _pair(dilation)
    pads = _pads(padding, k, d)
    hin, win = (int(input_hw[0]), int(input_hw[1])) if input_hw is not None else (1, 1)
    if output_hw is not None:
        hout, wout = int(output_hw[0]), int(output_hw[1])
    elif input_hw is not None:
        hout = (hin + pads[0] + pads[2] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        wout = (win + pads[1] + pads[3] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    else:
        hout = wout = 1
    return ConvGeometry(out_channels, in_channels, k[0], k[1], s, d, pads, "NOTSET", bool(bias),
                        1, hin, win, hout, wout)


def _geometry_of(conv: nn.Conv2d, input_hw=None, output_hw=None) -> ConvGeometry:
    if conv.groups != 1:
        raise ValueError(f"grouped conv (groups={conv.groups}): the pass leaves these alone")
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r}: only zero padding splits over a chain")
    return conv_geometry(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                         input_hw=input_hw, output_hw=output_hw)


def conv_decomposition(conv: nn.Conv2d, method: str = "tucker2", *, moment: Any = None, rows: int | None = None,
                       input_hw: Sequence[int] | None = None, output_hw: Sequence[int] | None = None,
                       name: str = "conv") -> ConvLayer:
    """``ConvLayer`` of ``conv`` (a 1x1 conv is always ``svd``; ``moment``, the input's channel
    second moment ``[Cin, Cin]``, makes a 1x1 conv data-aware)."""
    if method not in CONV_METHODS:
        raise InputError(f"unknown conv decomposition {method!r} (known: {', '.join(CONV_METHODS)})")
    layer = ConvLayer(name, _numpy(conv.weight), ir.DataType.FLOAT, _geometry_of(conv, input_hw, output_hw), method)
    if moment is not None and layer.method == "svd":
        layer.set_input_moment(_numpy(moment), rows)
    return layer


# -- Linear ---------------------------------------------------------------------------------------
class LowRankLinear(Factorized):
    """``x·Wᵀ ≈ (x·Aᵀ)·Bᵀ``: ``first`` (in→rank, no bias), ``second`` (rank→out, the bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> torch.Tensor:
        """``[out, in]``, the ``nn.Linear`` weight this layer equals."""
        return self.second.weight @ self.first.weight

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        """``a: [rank, in]`` (``first.weight``), ``b: [out, rank]`` (``second.weight``), bias ``[out]``."""
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"factors do not chain: a {tuple(a.shape)}, b {tuple(b.shape)}")
        layer = cls(a.shape[1], b.shape[0], a.shape[0], bias=bias is not None).to(device=a.device, dtype=a.dtype)
        _copy_(layer.first.weight, a)
        _copy_(layer.second.weight, b)
        if bias is not None:
            _copy_(layer.second.bias, bias)
        return layer

    @classmethod
    def from_decomposition(cls, layer: GemmLayer, rank: int, bias: torch.Tensor | None, like: torch.Tensor) -> "LowRankLinear":
        a, b = layer.factors(rank)  # A [in, r], B [r, out], A·B ≈ Wᵀ
        return cls.from_factors(_param(a.T, like), _param(b.T, like), None if bias is None else bias.detach())

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, moment: Any = None, rows: int | None = None) -> "LowRankLinear":
        """SVD of ``linear`` at ``rank`` (whitened by the input moment ``XᵀX/n`` when given)."""
        return cls.from_decomposition(linear_decomposition(linear, moment=moment, rows=rows), rank, linear.bias, linear.weight)


class TTLinear(Factorized):
    """A Linear as a TT-matrix, computed as the pass's Reshape + MatMul chain.

    ``cores[i]`` are stored matmul-ready as the pass writes them: ``[n_i r_i, r_{i-1} k_i]`` for
    ``i < d-1`` (a broadcast left product) and ``[r_{d-1} k_d, n_d]`` for the last. A 2-D input
    exports exactly the pass's chain; an input with more leading dims adds one Reshape back to them.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 in_modes: Sequence[int] | None = None, out_modes: Sequence[int] | None = None) -> None:
        super().__init__()
        if in_modes is None or out_modes is None:
            split = factorize_dims(in_features, out_features)
            if split is None:
                raise ValueError(f"{in_features}x{out_features} does not factor into TT modes")
            in_modes, out_modes = split
        if math.prod(in_modes) != in_features or math.prod(out_modes) != out_features or len(in_modes) != len(out_modes):
            raise ValueError(f"modes {in_modes}x{out_modes} do not multiply to {in_features}x{out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.ks, self.ns = tuple(int(k) for k in in_modes), tuple(int(n) for n in out_modes)
        self.ranks = tt_ranks([k * n for k, n in zip(self.ks, self.ns)], rank)
        d = len(self.ks)
        shapes = [(self.ns[i] * self.ranks[i + 1], self.ranks[i] * self.ks[i]) for i in range(d - 1)]
        shapes.append((self.ranks[d - 1] * self.ks[d - 1], self.ns[d - 1]))
        # init: each core ~ unit gain, so the chain has a Linear's default output scale
        self.cores = nn.ParameterList(nn.Parameter(torch.randn(s) / math.sqrt(s[1] if i < d - 1 else s[0]))
                                      for i, s in enumerate(shapes))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        ks, r, d = self.ks, self.ranks, len(self.ks)
        s = x.reshape(-1, ks[0], math.prod(ks[1:]))
        for i, core in enumerate(self.cores):
            if i == 0:
                s = torch.matmul(core, s)
            elif i < d - 1:
                s = torch.matmul(core, s.reshape(-1, r[i] * ks[i], math.prod(ks[i + 1:])))
            else:
                s = torch.matmul(s.reshape(-1, r[i] * ks[i]), core)
        s = s.reshape(-1, self.out_features)
        if x.dim() != 2:
            s = s.reshape(*lead, self.out_features)
        return s if self.bias is None else s + self.bias

    def tt_cores(self) -> list[torch.Tensor]:
        """The cores as ``G_i [r_{i-1}, k_i, n_i, r_i]`` (inverse of the pass's matmul layout)."""
        d, r = len(self.ks), self.ranks
        out = []
        for i, c in enumerate(self.cores):
            if i < d - 1:
                out.append(c.reshape(self.ns[i], r[i + 1], r[i], self.ks[i]).permute(2, 3, 0, 1))
            else:
                out.append(c.reshape(r[i], self.ks[i], self.ns[i], 1))
        return out

    def dense_weight(self) -> torch.Tensor:
        """``[out, in]``: the TT contracted back to a matrix (``TTLayer.reconstruct``'s order)."""
        w = torch.ones(1, 1, 1, dtype=self.cores[0].dtype, device=self.cores[0].device)
        for g in self.tt_cores():
            w = torch.einsum("abr,rknq->akbnq", w, g).reshape(w.shape[0] * g.shape[1], w.shape[1] * g.shape[2], g.shape[3])
        return w[:, :, 0].T

    @classmethod
    def from_decomposition(cls, layer: TTLayer, rank: int, bias: torch.Tensor | None, like: torch.Tensor) -> "TTLinear":
        cores = layer.cores(rank)
        k, n = math.prod(layer.ks), math.prod(layer.ns)
        out = cls(k, n, min(int(rank), layer.full_rank), bias=bias is not None, in_modes=layer.ks, out_modes=layer.ns)
        out = out.to(device=like.device, dtype=like.dtype)
        d = len(cores)
        for i, (g, param) in enumerate(zip(cores, out.cores)):
            r0, kk, nn_, r1 = g.shape
            mat = g.transpose(2, 3, 0, 1).reshape(nn_ * r1, r0 * kk) if i < d - 1 else g.reshape(r0 * kk, nn_)
            if tuple(mat.shape) != tuple(param.shape):
                raise RuntimeError(f"TT core {i}: the pass gave {mat.shape}, expected {tuple(param.shape)}")
            _copy_(param, _param(mat, like))
        if bias is not None:
            _copy_(out.bias, bias.detach())
        return out

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "TTLinear":
        """TT-SVD of ``linear`` with max TT rank ``rank`` (dims split as the pass splits them)."""
        return cls.from_decomposition(tt_decomposition(linear), rank, linear.bias, linear.weight)


# -- Conv2d ---------------------------------------------------------------------------------------
def _stage(weight_shape: tuple[int, ...], attrs: dict[str, Any], bias: bool) -> nn.Module:
    """One conv of a chain from the pass's ONNX attributes. Asymmetric pads (torch's ``'same'``
    with an even kernel) become a ``ZeroPad2d`` in front: torch convs pad symmetrically."""
    cout, cin_g, kh, kw = weight_shape
    groups = int(attrs.get("group", 1))
    pt, pl, pb, pr = attrs["pads"]
    even = pt == pb and pl == pr
    conv = nn.Conv2d(cin_g * groups, cout, (kh, kw), stride=tuple(attrs["strides"]), padding=(pt, pl) if even else 0,
                     dilation=tuple(attrs["dilations"]), groups=groups, bias=bias)
    return conv if even else nn.Sequential(nn.ZeroPad2d((pl, pr, pt, pb)), conv)


class FactorizedConv2d(Factorized):
    """A Conv2d as a chain of convs (``stages``), the bias on the last. Subclasses say which chain
    (``_specs``: weight shapes and ONNX attributes per stage, from the pass's ``ConvGeometry``)
    and how the stages contract back into one kernel (``dense_weight``)."""

    method = ""

    def __init__(self, geometry: ConvGeometry, specs: list[tuple[tuple[int, ...], dict[str, Any]]]) -> None:
        super().__init__()
        self.geometry = geometry
        self.in_channels, self.out_channels = geometry.cin, geometry.cout
        self.specs = specs
        last = len(specs) - 1
        self.stages = nn.Sequential(*(_stage(shape, attrs, geometry.has_bias and i == last) for i, (shape, attrs) in enumerate(specs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [m if isinstance(m, nn.Conv2d) else m[1] for m in self.stages]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.convs[-1].bias

    @classmethod
    def _build(cls, geometry: ConvGeometry, stages: list[tuple[np.ndarray, dict[str, Any]]]) -> "FactorizedConv2d":
        raise NotImplementedError  # pragma: no cover

    @classmethod
    def from_decomposition(cls, layer: ConvLayer, rank: int, bias: torch.Tensor | None, like: torch.Tensor) -> "FactorizedConv2d":
        """The module for the pass's decomposition of ``layer`` at ``rank``."""
        if layer.method.removeprefix("whitened-") != cls.method:
            raise ValueError(f"{layer.name}: the pass decomposes this conv by {layer.method}, not {cls.method}")
        stages = layer.decompose(rank).stages
        out = cls._build(layer.geometry, stages)
        got = [(tuple(w.shape), attrs) for w, attrs in stages]
        if got != [(tuple(s), a) for s, a in out.specs]:
            raise RuntimeError(f"{layer.name}: the pass's {cls.method} chain {got} is not the layout {out.specs}")
        out = out.to(device=like.device, dtype=like.dtype)
        for conv, (w, _) in zip(out.convs, stages):
            _copy_(conv.weight, _param(w, like))
        if bias is not None:
            _copy_(out.bias, bias.detach())
        return out

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> "FactorizedConv2d":
        """The pass's ``cls.method`` decomposition of ``conv`` at ``rank``."""
        layer = conv_decomposition(conv, cls.method)
        return cls.from_decomposition(layer, rank, conv.bias, conv.weight)


class SVDConv2d(FactorizedConv2d):
    """A 1x1 conv as two 1x1 convs (the first keeps stride/padding, the second the bias)."""

    method = "svd"

    def __init__(self, in_channels: int, out_channels: int, rank: int, stride: Any = 1, padding: Any = 0,
                 bias: bool = True, geometry: ConvGeometry | None = None) -> None:
        g = geometry or conv_geometry(in_channels, out_channels, 1, stride=stride, padding=padding, bias=bias)
        self.rank = rank
        super().__init__(g, [((rank, g.cin, 1, 1), g.attrs("hw", (1, 1))), ((g.cout, rank, 1, 1), g.attrs("", (1, 1)))])

    @classmethod
    def _build(cls, geometry, stages):
        return cls(geometry.cin, geometry.cout, stages[0][0].shape[0], geometry=geometry)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, moment: Any = None, rows: int | None = None) -> "SVDConv2d":
        """(Whitened, with the input's channel moment) SVD of a 1x1 ``conv`` at ``rank``."""
        layer = conv_decomposition(conv, moment=moment, rows=rows)
        return cls.from_decomposition(layer, rank, conv.bias, conv.weight)

    def dense_weight(self) -> torch.Tensor:
        a, b = (c.weight[:, :, 0, 0] for c in self.convs)
        return (b @ a)[:, :, None, None]


class SpatialConv2d(FactorizedConv2d):
    """Jaderberg's spatial SVD: ``kh×1`` (Cin→rank) then ``1×kw`` (rank→Cout, bias)."""

    method = "spatial"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, rank: int, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, bias: bool = True, geometry: ConvGeometry | None = None) -> None:
        g = geometry or conv_geometry(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                      dilation=dilation, bias=bias)
        self.rank = rank
        super().__init__(g, [((rank, g.cin, g.kh, 1), g.attrs("h", (g.kh, 1))),
                             ((g.cout, rank, 1, g.kw), g.attrs("w", (1, g.kw)))])

    @classmethod
    def _build(cls, geometry, stages):
        return cls(geometry.cin, geometry.cout, (geometry.kh, geometry.kw), stages[0][0].shape[0], geometry=geometry)

    def dense_weight(self) -> torch.Tensor:
        v1, v2 = (c.weight for c in self.convs)  # [r, Cin, kh, 1], [Cout, r, 1, kw]
        return torch.einsum("rci,orj->ocij", v1[..., 0], v2[:, :, 0, :])


class Tucker2Conv2d(FactorizedConv2d):
    """Tucker-2: 1x1 ``Cin→r_in``, ``kh×kw`` core ``r_in→r_out`` (stride/padding), 1x1 ``r_out→Cout``."""

    method = "tucker2"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, ranks: tuple[int, int], stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, bias: bool = True, geometry: ConvGeometry | None = None) -> None:
        g = geometry or conv_geometry(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                      dilation=dilation, bias=bias)
        r_out, r_in = self.ranks = (int(ranks[0]), int(ranks[1]))
        super().__init__(g, [((r_in, g.cin, 1, 1), g.attrs("", (1, 1))),
                             ((r_out, r_in, g.kh, g.kw), g.attrs("hw", (g.kh, g.kw))),
                             ((g.cout, r_out, 1, 1), g.attrs("", (1, 1)))])

    @classmethod
    def _build(cls, geometry, stages):
        core = stages[1][0]
        return cls(geometry.cin, geometry.cout, (geometry.kh, geometry.kw), (core.shape[0], core.shape[1]), geometry=geometry)

    def dense_weight(self) -> torch.Tensor:
        first, core, last = (c.weight for c in self.convs)
        return torch.einsum("op,pqij,qc->ocij", last[:, :, 0, 0], core, first[:, :, 0, 0])


class CPConv2d(FactorizedConv2d):
    """Rank-R CP: 1x1 ``Cin→R``, depthwise ``kh×1``, depthwise ``1×kw``, 1x1 ``R→Cout`` (bias)."""

    method = "cp"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, rank: int, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, bias: bool = True, geometry: ConvGeometry | None = None) -> None:
        g = geometry or conv_geometry(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                      dilation=dilation, bias=bias)
        self.rank = r = rank
        super().__init__(g, [((r, g.cin, 1, 1), g.attrs("", (1, 1))),
                             ((r, 1, g.kh, 1), {**g.attrs("h", (g.kh, 1)), "group": r}),
                             ((r, 1, 1, g.kw), {**g.attrs("w", (1, g.kw)), "group": r}),
                             ((g.cout, r, 1, 1), g.attrs("", (1, 1)))])

    @classmethod
    def _build(cls, geometry, stages):
        return cls(geometry.cin, geometry.cout, (geometry.kh, geometry.kw), stages[0][0].shape[0], geometry=geometry)

    def dense_weight(self) -> torch.Tensor:
        b, h, w, a = (c.weight for c in self.convs)
        return torch.einsum("or,rc,ri,rj->ocij", a[:, :, 0, 0], b[:, :, 0, 0], h[:, 0, :, 0], w[:, 0, 0, :])


_CONV_CLASSES: dict[str, type[FactorizedConv2d]] = {
    c.method: c for c in (SVDConv2d, SpatialConv2d, Tucker2Conv2d, CPConv2d)
}


def factorized_conv(layer: ConvLayer, rank: int, bias: torch.Tensor | None, like: torch.Tensor) -> FactorizedConv2d:
    """The conv module for whichever method the pass's ``layer`` uses."""
    return _CONV_CLASSES[layer.method.removeprefix("whitened-")].from_decomposition(layer, rank, bias, like)


def factorized_from(layer: FactorizableLayer, rank: int, dense: nn.Module) -> Factorized:
    """The factorized module for the pass's ``layer`` at ``rank``, replacing ``dense``."""
    if isinstance(layer, GemmLayer):
        return LowRankLinear.from_decomposition(layer, rank, dense.bias, dense.weight)
    if isinstance(layer, TTLayer):
        return TTLinear.from_decomposition(layer, rank, dense.bias, dense.weight)
    if isinstance(layer, ConvLayer):
        return factorized_conv(layer, rank, dense.bias, dense.weight)
    raise TypeError(f"no torch layer for {type(layer).__name__}")

