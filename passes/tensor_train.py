"""Tensor-train (TT-matrix) factorization of large fully-connected layers.

A ``MatMul(x, W)`` / ``Gemm(x, W, C)`` with a constant ``W`` of shape ``[K, N]`` becomes a chain of
small contractions with TT cores ``G_i [r_{i-1}, k_i, n_i, r_i]`` (Novikov et al., "Tensorizing
Neural Networks", 2015), where ``K = k_1⋯k_d`` and ``N = n_1⋯n_d``.

**Dimension factorization** (:func:`factorize_dims`): for ``d = 4, 3, 2`` (the first that works
wins: more cores compress more) ``K`` and ``N`` are each split into ``d`` ordered factors, all
``≥ MIN_FACTOR`` (3), chosen by (1) the smallest max/min factor ratio, (2) for even ``d`` the most
even split of the product between the first and second half of the cores (so the middle TT cut
is square: ``784 → 28·28 → (4, 7, 4, 7)``), (3) the lexicographically smallest tuple. A split whose
max/min ratio exceeds ``MAX_RATIO`` (4) is "too unbalanced"; a dimension with no admissible split
for any ``d`` (a prime, ``10 = 2·5``, ``68 = 4·17``) leaves the layer dense (not listed).
Examples: ``784×1024 → (4,7,4,7)×(4,8,4,8)``, ``256×256 → (4,4,4,4)²``, ``64×64 → (4,4,4)²``.

**TT-matrix format**: ``W`` is reshaped to ``[k_1..k_d, n_1..n_d]``, permuted to
``(k_1, n_1, …, k_d, n_d)``, merged to modes ``m_i = k_i·n_i`` and decomposed by TT-SVD
(``tensorly.decomposition.tensor_train``) with max rank ``R``; rank ``r_i = min(R, ∏_{j≤i} m_j,
∏_{j>i} m_j)``.

**Rank semantics**: the rank the driver passes is ``R``. ``full_rank`` is the largest rank bound
over the TT cuts, ``max_i min(∏_{j≤i} m_j, ∏_{j>i} m_j)`` (at that ``R`` the TT is exact);
``spectrum()`` is the singular values of the unfolding at that cut (the most square one; for
``d = 2`` the only one), so ``erank``/``energy`` rules pick a rank on the same scale as ``R`` and
the truncation they describe is the dominant one.

**Graph form** (only Reshape and MatMul; no Einsum, no Transpose): with cores stored
matmul-ready, ``x [.., K] → Reshape [-1, k_1, K/k_1]``; for ``i < d``:
``S ← MatMul(C_i, Reshape(S, [-1, r_{i-1}k_i, ∏_{j>i} k_j]))`` with ``C_i = G_i`` permuted to
``(n_i, r_i, r_{i-1}, k_i)`` as ``[n_i r_i, r_{i-1} k_i]`` (a broadcast left product: it contracts
an inner axis without a transpose); last ``S ← MatMul(Reshape(S, [-1, r_{d-1}k_d]), C_d)`` with
``C_d = G_d`` as ``[r_{d-1}k_d, n_d]``; then ``Reshape`` to ``[.., N]`` (+ bias).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.passes.base import find_node, taken_names, unique_name
from edgecomp.passes.lowrank import Cost, FactorizableLayer, LowRankConfig, register_factorizer

__all__ = ["TTLayer", "find_tt_layers", "factorize_dims", "balanced_factors", "MIN_FACTOR", "MAX_RATIO", "MAX_CORES"]

log = logging.getLogger(__name__)

MIN_FACTOR = 3  # smallest k_i / n_i: a 2-wide mode makes a core of almost nothing
MAX_RATIO = 4.0  # largest max/min factor ratio of an admissible split
MAX_CORES = 4


# -- dimension factorization ---------------------------------------------------------------------
def _ordered_factorizations(n: int, d: int, lo: int) -> list[tuple[int, ...]]:
    if d == 1:
        return [(n,)] if n >= lo else []
    out = []
    for f in range(lo, n // lo ** (d - 1) + 1):
        if n % f == 0:
            out.extend((f, *rest) for rest in _ordered_factorizations(n // f, d - 1, lo))
    return out


@functools.lru_cache(maxsize=256)
def balanced_factors(n: int, d: int, min_factor: int = MIN_FACTOR, max_ratio: float = MAX_RATIO) -> tuple[int, ...] | None:
    """The most balanced ordered split of ``n`` into ``d`` factors (see the module docstring)."""
    if n < min_factor**d:
        return None
    best_key, best = None, None
    for fs in _ordered_factorizations(n, d, min_factor):
        ratio = max(fs) / min(fs)
        half = math.prod(fs[: d // 2])
        middle = abs(math.log(half) - math.log(n / half)) if d % 2 == 0 else 0.0
        key = (round(ratio, 9), round(middle, 9), fs)
        if best_key is None or key < best_key:
            best_key, best = key, fs
    if best is None or max(best) / min(best) > max_ratio:
        return None
    return best


def factorize_dims(k: int, n: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(k_1..k_d), (n_1..n_d)`` for the largest ``d ≤ MAX_CORES`` that splits both, else None."""
    for d in range(MAX_CORES, 1, -1):
        ks, ns = balanced_factors(k, d), balanced_factors(n, d)
        if ks is not None and ns is not None:
            return ks, ns
    return None


# -- TT arithmetic --------------------------------------------------------------------------------
def _cut_bounds(modes: Sequence[int]) -> list[int]:
    """Largest TT rank at each of the d-1 cuts: min(∏ left modes, ∏ right modes)."""
    return [min(math.prod(modes[: i + 1]), math.prod(modes[i + 1 :])) for i in range(len(modes) - 1)]


def tt_ranks(modes: Sequence[int], rank: int) -> list[int]:
    """``[1, r_1, …, r_{d-1}, 1]`` for max rank ``rank`` (what TT-SVD produces)."""
    return [1, *(min(rank, b) for b in _cut_bounds(modes)), 1]


def _static_prod(shape: ir.Shape | None, drop_last: bool = True) -> int:
    """Product of the static dims (dynamic or unknown → 1)."""
    if shape is None:
        return 1
    dims = list(shape)[:-1] if drop_last else list(shape)
    return math.prod(d if isinstance(d, int) else 1 for d in dims)


# -- graph helpers --------------------------------------------------------------------------------
def _initializer(graph: ir.Graph, taken: set[str], base: str, array: np.ndarray) -> ir.Value:
    name = unique_name(base, taken)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _constant_weight(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer used by exactly one node, else None (shared/overridable weights
    are not ours to rewrite: tied embeddings, inputs with defaults)."""
    if value is None or value.const_value is None or not value.is_initializer() or value.is_graph_input():
        return None
    if value.is_graph_output() or len(value.uses()) != 1:
        return None
    return value.const_value.numpy()


def _replace_node(graph: ir.Graph, node: ir.Node, new_nodes: list[ir.Node], new_out: ir.Value,
                  old_weights: Sequence[ir.Value]) -> None:
    """Put ``new_nodes`` in place of ``node``; ``new_out`` takes the old output's name, type and
    shape; old weights no longer used are dropped."""
    old_out = node.outputs[0]
    graph.insert_before(node, new_nodes)
    new_out.type = old_out.type if old_out.type is not None else new_out.type
    new_out.shape = old_out.shape if old_out.shape is not None else new_out.shape
    old_out.replace_all_uses_with(new_out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    name = old_out.name
    old_out.name = None
    new_out.name = name
    for w in old_weights:
        if w is not None and w.is_initializer() and not w.uses() and not w.is_graph_output() and not w.is_graph_input():
            del graph.initializers[w.name]


# -- the layer ------------------------------------------------------------------------------------
class TTLayer(FactorizableLayer):
    """A MatMul/Gemm with a constant weight, as a TT-matrix of ``len(ks)`` cores."""

    method = "tt"

    def candidate_ranks(self) -> list[int]:
        """TT ranks that pay are tiny next to ``full_rank``: try small absolute ranks too."""
        small = {r for r in (2, 4, 8, 16) if r < self.full_rank}
        return sorted(set(super().candidate_ranks()) | small, reverse=True)

    def __init__(self, node: ir.Node, weight: np.ndarray, ks: tuple[int, ...], ns: tuple[int, ...],
                 bias: np.ndarray | None, rows: int, stored_shape: tuple[int, ...]) -> None:
        self.name = node.name
        self.op = node.op_type
        self.weight_shape = stored_shape
        self.input_name = node.inputs[0].name
        self.ks, self.ns = ks, ns
        self.modes = tuple(k * n for k, n in zip(ks, ns))
        self.rows = rows
        self.bias = bias  # beta·C as an array (constant C), or None
        self._dtype = weight.dtype
        self._w = weight.astype(np.float64)  # effective weight alpha·op(B), [K, N]
        d = len(ks)
        perm = [a for i in range(d) for a in (i, d + i)]
        self._tensor = self._w.reshape(*ks, *ns).transpose(perm).reshape(self.modes)
        self._moment: np.ndarray | None = None
        self._cores: dict[int, list[np.ndarray]] = {}
        self._errors: dict[int, float] = {}

    # -- rank selection inputs --------------------------------------------------------------
    @property
    def full_rank(self) -> int:
        return max(_cut_bounds(self.modes))

    @functools.cached_property
    def _spectrum(self) -> np.ndarray:
        bounds = _cut_bounds(self.modes)
        cut = bounds.index(max(bounds)) + 1
        unfolding = self._tensor.reshape(math.prod(self.modes[:cut]), -1)
        return np.linalg.svd(unfolding, compute_uv=False)

    def spectrum(self) -> np.ndarray:
        return self._spectrum

    def ranks(self, rank: int) -> list[int]:
        return tt_ranks(self.modes, rank)

    def cost(self, rank: int | None) -> Cost:
        k_total, n_total = math.prod(self.ks), math.prod(self.ns)
        extra = 0 if self.bias is None else int(self.bias.size)
        if rank is None:
            return Cost(k_total * n_total + extra, self.rows * k_total * n_total)
        r = self.ranks(rank)
        d = len(self.ks)
        params = sum(r[i] * self.ks[i] * self.ns[i] * r[i + 1] for i in range(d))
        macs = sum(
            self.rows * math.prod(self.ns[:i]) * math.prod(self.ks[i + 1 :]) * r[i] * self.ks[i] * self.ns[i] * r[i + 1]
            for i in range(d)
        )
        return Cost(params + extra, macs)

    def cores(self, rank: int) -> list[np.ndarray]:
        """TT cores ``G_i [r_{i-1}, k_i, n_i, r_i]`` (float64) at max rank ``rank``."""
        rank = min(int(rank), self.full_rank)
        if rank not in self._cores:
            from tensorly.decomposition import tensor_train

            factors = tensor_train(self._tensor, rank=rank)
            self._cores[rank] = [
                np.asarray(f, dtype=np.float64).reshape(f.shape[0], k, n, f.shape[-1])
                for f, k, n in zip(factors, self.ks, self.ns)
            ]
        return self._cores[rank]

    def reconstruct(self, rank: int) -> np.ndarray:
        """The dense ``[K, N]`` weight the TT at ``rank`` stands for."""
        cores = self.cores(rank)
        out = np.ones((1, 1, 1))  # [K-so-far, N-so-far, r]
        for g in cores:
            out = np.einsum("abr,rknq->akbnq", out, g).reshape(out.shape[0] * g.shape[1], out.shape[1] * g.shape[2], g.shape[3])
        return out[:, :, 0]

    def set_input_moment(self, moment: np.ndarray, rows: int | None = None) -> None:
        self._moment = np.asarray(moment, dtype=np.float64)
        self._errors.clear()

    def error(self, rank: int) -> float:
        """Weight-space ‖W − W_R‖_F / ‖W‖_F, or with an input moment ``M`` the output-space
        ``sqrt(tr(ΔᵀMΔ) / tr(WᵀMW))`` (the expected relative error of ``x·W`` on calibration data)."""
        rank = int(rank)
        if rank not in self._errors:
            delta = self._w - self.reconstruct(rank)
            if self._moment is not None and self._moment.shape == (self._w.shape[0],) * 2:
                num = np.einsum("kn,kl,ln->", delta, self._moment, delta)
                den = np.einsum("kn,kl,ln->", self._w, self._moment, self._w)
            else:
                num, den = float((delta**2).sum()), float((self._w**2).sum())
            self._errors[rank] = float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
        return self._errors[rank]

    # -- the rewrite --------------------------------------------------------------------------
    def apply(self, model: ir.Model, rank: int) -> None:
        graph = model.graph
        node = find_node(model, self.name)
        x = node.inputs[0]
        weight = node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        taken = taken_names(graph)
        base = self.name
        cores = self.cores(rank)
        d = len(cores)
        dt = self._dtype
        nodes: list[ir.Node] = []

        def value(tag: str) -> ir.Value:
            return ir.Value(name=unique_name(f"{base}_tt_{tag}", taken), type=ir.TensorType(ir.DataType.from_numpy(dt)))

        def emit(op: str, inputs: list[ir.Value], tag: str) -> ir.Value:
            out = value(tag)
            nodes.append(ir.node(op, inputs, outputs=[out], name=unique_name(f"{base}_tt_{tag}", taken)))
            return out

        def shape_const(tag: str, dims: Sequence[int]) -> ir.Value:
            return _initializer(graph, taken, f"{base}_tt_{tag}", np.asarray(dims, dtype=np.int64))

        ks = self.ks
        s = emit("Reshape", [x, shape_const("shape_in", [-1, ks[0], math.prod(ks[1:])])], "in")
        for i, g in enumerate(cores):
            r0, k, n, r1 = g.shape
            if i == 0:
                mat = g.transpose(2, 3, 0, 1).reshape(n * r1, r0 * k)
                core = _initializer(graph, taken, f"{base}_tt_core{i}", mat.astype(dt))
                s = emit("MatMul", [core, s], f"mm{i}")
            elif i < d - 1:
                s = emit("Reshape", [s, shape_const(f"shape{i}", [-1, r0 * k, math.prod(ks[i + 1 :])])], f"r{i}")
                mat = g.transpose(2, 3, 0, 1).reshape(n * r1, r0 * k)
                core = _initializer(graph, taken, f"{base}_tt_core{i}", mat.astype(dt))
                s = emit("MatMul", [core, s], f"mm{i}")
            else:
                s = emit("Reshape", [s, shape_const(f"shape{i}", [-1, r0 * k])], f"r{i}")
                core = _initializer(graph, taken, f"{base}_tt_core{i}", g.reshape(r0 * k, n).astype(dt))
                s = emit("MatMul", [s, core], f"mm{i}")
        s = emit("Reshape", [s, self._out_shape(graph, taken, x, nodes)], "out")
        if c is not None:
            if self.bias is not None:
                bias = _initializer(graph, taken, f"{base}_tt_bias", self.bias.astype(dt))
            else:  # a computed C: beta·C
                beta = float(node.attributes.get_float("beta", 1.0))
                bias = c if beta == 1.0 else emit("Mul", [c, _initializer(graph, taken, f"{base}_tt_beta", np.asarray(beta, dt))], "beta_c")
            s = emit("Add", [s, bias], "bias")
        _replace_node(graph, node, nodes, s, [weight, c])

    def _out_shape(self, graph: ir.Graph, taken: set[str], x: ir.Value, nodes: list[ir.Node]) -> ir.Value:
        """``x.shape[:-1] + [N]``: a constant when at most one leading dim is unknown, else
        computed with Shape/Slice/Concat."""
        n_total = math.prod(self.ns)
        base = self.name
        if self.op == "Gemm":
            return _initializer(graph, taken, f"{base}_tt_shape_out", np.asarray([-1, n_total], np.int64))
        if x.shape is not None:
            lead = list(x.shape)[:-1]
            unknown = [d for d in lead if not isinstance(d, int)]
            if len(unknown) <= 1:
                dims = [d if isinstance(d, int) else -1 for d in lead] + [n_total]
                return _initializer(graph, taken, f"{base}_tt_shape_out", np.asarray(dims, np.int64))
        shape = ir.Value(name=unique_name(f"{base}_tt_xshape", taken), type=ir.TensorType(ir.DataType.INT64))
        nodes.append(ir.node("Shape", [x], outputs=[shape], name=shape.name))
        lead = ir.Value(name=unique_name(f"{base}_tt_lead", taken), type=ir.TensorType(ir.DataType.INT64))
        nodes.append(ir.node("Slice", [shape,
                                       _initializer(graph, taken, f"{base}_tt_zero", np.asarray([0], np.int64)),
                                       _initializer(graph, taken, f"{base}_tt_minus1", np.asarray([-1], np.int64))],
                             outputs=[lead], name=lead.name))
        out = ir.Value(name=unique_name(f"{base}_tt_shape_out", taken), type=ir.TensorType(ir.DataType.INT64))
        nodes.append(ir.node("Concat", [lead, _initializer(graph, taken, f"{base}_tt_n", np.asarray([n_total], np.int64))],
                             {"axis": 0}, outputs=[out], name=out.name))
        return out


# -- the factorizer -------------------------------------------------------------------------------
@register_factorizer("tt")
def find_tt_layers(model: ir.Model, config: LowRankConfig | None = None) -> list[TTLayer]:
    """MatMul(x, W) / Gemm(x, W, C) (transA=0) in the main graph with a constant 2-D float ``W``
    of its own whose dims factor (see :func:`factorize_dims`)."""
    layers: list[TTLayer] = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        x, w_value = node.inputs[0], node.inputs[1]
        w = _constant_weight(w_value)
        if x is None or x.const_value is not None or w is None or w.ndim != 2 or w.dtype.kind != "f":
            continue
        bias = None
        if node.op_type == "Gemm":
            attrs = node.attributes
            if attrs.get_int("transA", 0) != 0:
                continue
            alpha = attrs.get_float("alpha", 1.0)
            beta = attrs.get_float("beta", 1.0)
            weight = (w.T if attrs.get_int("transB", 0) else w).astype(np.float64) * alpha
            c = node.inputs[2] if len(node.inputs) > 2 else None
            if c is not None and c.const_value is not None:
                if not c.is_initializer() or c.is_graph_input():
                    continue
                bias = (c.const_value.numpy().astype(np.float64) * beta).astype(w.dtype)
            rows = _static_prod(x.shape, drop_last=True)
        else:
            if x.shape is not None and len(x.shape) < 1:
                continue
            weight = w
            rows = _static_prod(x.shape, drop_last=True)
        split = factorize_dims(*weight.shape)
        if split is None:
            log.debug("tt: %s %s does not factor usefully", node.name, weight.shape)
            continue
        layers.append(TTLayer(node, weight.astype(w.dtype), split[0], split[1], bias, rows, tuple(w.shape)))
    return layers
