"""Pruning: zero the weights that matter least, or remove whole channels.

Three methods (``PruneConfig.method``):

- ``magnitude`` (unstructured): the smallest ``|w|`` of a layer's weight become 0. Per layer,
  exactly ``round(s · size)`` of them (ties broken by position, so the count is exact); with
  ``scope="global"`` one threshold over every prunable weight zeroes the fraction ``s`` of them
  all, so layers with many small weights lose more (raw ``|w|``, no per-layer normalization).
- ``nm`` (semi-structured N:M, default 2:4): in every group of M consecutive weights along the
  layer's reduction (input) axis the N largest ``|w|`` are kept. That axis is K of a MatMul/Gemm
  weight and the input channels of a Conv (groups run along Cin at each output channel and kernel
  tap, the layout sparse tensor cores read in NHWC). A layer whose axis is not a multiple of M is
  left dense.
- ``channel`` (structured): for a *chain* producer → channel-wise ops → consumer, the producer's
  output channels with the smallest L1 (or L2) filter norm are removed: the producer's weight rows
  and bias, every per-channel parameter on the way (BatchNormalization, per-channel constants of
  Add/Mul/...), a depthwise Conv's filters (its ``group`` shrinks with them) and the consumer's
  matching input channels (a Flatten in between turns each channel into its ``H·W`` block of
  Gemm rows). The tensors really shrink. A BatchNormalization right after the producer is part of
  the filter: the score is ``‖W_c‖ · |γ_c| / √(σ²_c + ε)``.

  Producers: Conv with ``group == 1``, Gemm (``transA == 0``), MatMul with a constant 2-D weight.
  Between them: BatchNormalization, unary activations (Relu, Clip, LeakyRelu, Sigmoid, HardSwish,
  ...), Add/Sub/Mul/Div/PRelu with a scalar or per-channel constant, Max/Average/Global pools,
  depthwise Conv (``group == channels``, channel multipliers included), Flatten and
  ``Reshape(x, [batch, -1 | C·H·W])`` of a ``[N, C, H, W]`` tensor (the explicit size is rewritten). Consumers: Conv with ``group == 1``,
  Gemm/MatMul with a constant weight. Anything else on the way (a residual Add, Concat, a value
  read by two nodes or that is a graph output, a grouped Conv, Transpose, ...) means the channel
  dimension is read elsewhere: that producer is left alone (``stats["channel_rejected"]`` counts
  why). A removed channel that reaches the consumer as exactly zero (zero filter and bias, BN
  mean and shift 0, activations with f(0) = 0) leaves every output unchanged; removing any other
  channel is an approximation.

Which layers and how much: ``sparsity`` per layer, ``overrides`` per node, ``skip`` and
``min_params`` leave layers alone, or a budget (``budget:cosine=C``, ``budget:top1=A``,
``budget:params=Nx``) picks per-layer sparsity by measured sensitivity: every layer is pruned
alone at a ladder of sparsities on calibration samples and the greedy allocation of the low-rank
pass (``rank_selection.greedy_allocate``, metric by ``lowrank.calibration_probe``) takes the
cheapest moves that keep the metric (or reach the parameter target).

Unstructured sparsity keeps the dense tensors (zeros still take storage and compute until a
sparse format or kernel uses them): ``params`` in the layer records stays, ``nonzero`` drops.
Channel pruning changes shapes: the value shapes along a chain are updated, the pipeline's last
``shape`` pass re-infers the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from typing import Any, Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401
import threadpoolctl

from edgecomp.errors import InputError
from edgecomp.numerics import Samples
from edgecomp.passes.base import StatsResult, count_params
from edgecomp.passes.lowrank import _spread, calibration_probe
from edgecomp.passes.rank_selection import RankPolicy, greedy_allocate

__all__ = ["PruneConfig", "Prune", "parse_prune", "METHODS", "LAYER_KINDS", "SPEC_HELP"]

log = logging.getLogger(__name__)

METHODS = ("magnitude", "nm", "channel")
#: layer kind (spec name) → ONNX op
LAYER_KINDS = {"gemm": "Gemm", "matmul": "MatMul", "conv": "Conv"}
#: sparsities a budget tries per layer (each costs one ORT run over the calibration samples)
MAGNITUDE_LADDER = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
CHANNEL_LADDER = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Identity", "Dropout", "Clip", "Abs", "Neg",
}
_BINARY = {"Add", "Sub", "Mul", "Div", "PRelu"}
_POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}

SPEC_HELP = (
    "METHOD:TARGET[,OPTION...] — magnitude:F | magnitude:global:F | nm[:N:M] | channel:F | "
    "METHOD:budget:cosine=C|top1=A|params=NX; options skip=NODE, min=N, layers=gemm+matmul+conv, "
    "norm=l1|l2, @NODE=F"
)


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Settings of the pruning pass (``parse_prune`` makes one from a spec string).

    Attributes:
        method: ``magnitude``, ``nm`` or ``channel``.
        sparsity: fraction of each layer's weights zeroed (magnitude) or of its output channels
            removed (channel), in [0, 1); with ``scope="global"`` the fraction of all prunable
            weights. Unused by ``nm`` and with a budget.
        scope: ``layer`` or ``global`` (magnitude only: one threshold over all layers).
        n, m: keep ``n`` of every ``m`` weights (``nm``).
        budget: ``None`` or ``("cosine", C)`` / ``("top1", A)`` / ``("params", N)``: per-layer
            sparsity chosen by measured sensitivity (needs calibration samples).
        overrides: ``(node, sparsity)`` pairs that replace ``sparsity`` for those nodes (channel:
            the producer's name); 0 leaves the node alone. Not with ``nm``. Overridden, skipped
            and small layers stay out of a global threshold's pool and of a budget's allocation
            (overrides are applied as given, not measured by it).
        skip: node names never pruned.
        min_params: layers whose weight (channel: whose chain's tensors) has fewer elements are
            left alone.
        layers: layer kinds pruned: ``gemm``, ``matmul``, ``conv`` (channel: the producer's kind).
        norm: ``l1`` or ``l2`` filter norm ranking channels.
        max_sensitivity: calibration samples each sensitivity run of a budget uses.
    """

    method: str = "magnitude"
    sparsity: float = 0.5
    scope: str = "layer"
    n: int = 2
    m: int = 4
    budget: tuple[str, float] | None = None
    overrides: tuple[tuple[str, float], ...] = ()
    skip: tuple[str, ...] = ()
    min_params: int = 0
    layers: tuple[str, ...] = ("gemm", "matmul", "conv")
    norm: str = "l1"
    max_sensitivity: int = 64

    def __post_init__(self) -> None:
        def bad(why: str) -> InputError:
            return InputError(f"--prune {str(self)!r}: {why}")

        if self.method not in METHODS:
            raise InputError(f"--prune: unknown method {self.method!r} (known: {', '.join(METHODS)})")
        if not 0 <= self.sparsity < 1:
            raise bad("sparsity is a fraction in [0, 1)")
        if self.scope not in ("layer", "global") or (self.scope == "global" and self.method != "magnitude"):
            raise bad("scope 'global' is for magnitude pruning only")
        if self.method == "nm" and not 0 < self.n < self.m:
            raise bad("N:M needs 0 < N < M")
        if self.budget is not None:
            kind, value = self.budget
            if kind in ("cosine", "top1") and not 0 < value <= 1:
                raise bad(f"the {kind} budget is a fraction in (0, 1]")
            if kind == "params" and not value > 1:
                raise bad("a params budget is a reduction factor > 1 (e.g. 2x)")
            if kind not in ("cosine", "top1", "params"):
                raise bad(f"unknown budget {kind!r} (cosine, top1, params)")
            if self.scope == "global":
                raise bad("a budget and a global threshold do not mix")
        for node, s in self.overrides:
            if self.method == "nm":
                raise bad("N:M has no per-node sparsity (use skip=NODE)")
            if not 0 <= s < 1:
                raise bad(f"sparsity of {node!r} is a fraction in [0, 1)")
        unknown = [k for k in self.layers if k not in LAYER_KINDS]
        if unknown or not self.layers:
            raise bad(f"unknown layer kind {unknown[0] if unknown else ''!r} (known: {', '.join(LAYER_KINDS)})")
        if self.norm not in ("l1", "l2"):
            raise bad("norm is l1 or l2")
        if self.min_params < 0 or self.max_sensitivity < 1:
            raise bad("min and max_sensitivity must be non-negative")

    def __str__(self) -> str:
        if self.budget is not None:
            kind, value = self.budget
            target = f"budget:{kind}={value:g}" + ("x" if kind == "params" else "")
            head = f"{self.method}:{target}" if self.method != "nm" else f"nm:{self.n}:{self.m}:{target}"
        elif self.method == "nm":
            head = f"nm:{self.n}:{self.m}"
        else:
            head = f"{self.method}:" + ("global:" if self.scope == "global" else "") + f"{self.sparsity:g}"
        opts = [f"skip={s}" for s in self.skip]
        if self.min_params:
            opts.append(f"min={self.min_params}")
        if tuple(self.layers) != ("gemm", "matmul", "conv"):
            opts.append("layers=" + "+".join(self.layers))
        if self.norm != "l1":
            opts.append(f"norm={self.norm}")
        opts += [f"@{n}={s:g}" for n, s in self.overrides]
        return ",".join([head, *opts])


def parse_prune(text: str) -> PruneConfig:
    """Parse a ``--prune`` spec into a :class:`PruneConfig`.

    Grammar: ``METHOD:TARGET[,OPTION...]``

    - ``magnitude:F`` zero the fraction F of each layer's weights (smallest ``|w|``);
      ``magnitude:global:F`` one ``|w|`` threshold over all prunable weights zeroing F of them;
    - ``nm[:N:M]`` keep the N largest of every M weights along the reduction axis (default 2:4);
    - ``channel:F`` remove the fraction F of each chain producer's output channels;
    - ``METHOD:budget:cosine=C`` / ``budget:top1=A`` / ``budget:params=NX`` (``nm:N:M:budget:...``):
      per-layer sparsity from measured sensitivity on calibration data.

    Options: ``skip=NODE`` (repeatable), ``min=N`` (smallest weight pruned, in elements),
    ``layers=gemm+matmul+conv``, ``norm=l1|l2`` (channel ranking), ``@NODE=F`` (that node's own
    sparsity; 0 leaves it alone). Example: ``magnitude:0.7,min=1024,skip=/8/Gemm``.
    """
    spec = text.strip()
    bad = InputError(f"--prune {text!r}: expected {SPEC_HELP}")
    head, *options = [part.strip() for part in spec.split(",")]
    method, _, target = head.partition(":")
    method = method.strip().lower()
    if method not in METHODS:
        raise InputError(f"--prune {text!r}: unknown method {method!r} (magnitude, nm, channel)")
    kwargs: dict[str, Any] = {"method": method}
    try:
        fields = [f.strip() for f in target.split(":")] if target else []
        if method == "nm":
            if len(fields) >= 2 and fields[0] not in ("budget",):
                kwargs["n"], kwargs["m"] = int(fields[0]), int(fields[1])
                fields = fields[2:]
            if fields and fields[0] != "budget":
                raise bad
        elif not fields:
            raise InputError(f"--prune {text!r}: {method} needs a sparsity ({method}:0.5) or a budget")
        if fields and fields[0] == "global":
            if len(fields) != 2:
                raise bad
            kwargs["scope"], kwargs["sparsity"] = "global", float(fields[1])
        elif fields and fields[0] == "budget":
            if len(fields) != 2:
                raise bad
            kind, _, value = fields[1].partition("=")
            kind = kind.strip().lower()
            if kind not in ("cosine", "top1", "params"):
                raise bad
            kwargs["budget"] = (kind, float(value.strip().lower().rstrip("x") if kind == "params" else value))
        elif fields:
            if len(fields) != 1:
                raise bad
            kwargs["sparsity"] = float(fields[0])
        skip, overrides = [], []
        for opt in options:
            if opt.startswith("@"):
                node, _, value = opt[1:].rpartition("=")
                if not node:
                    raise bad
                overrides.append((node, float(value)))
                continue
            key, _, value = opt.partition("=")
            key = key.strip().lower()
            if not value:
                raise bad
            if key == "skip":
                skip.append(value)
            elif key == "min":
                kwargs["min_params"] = int(value)
            elif key == "layers":
                kwargs["layers"] = tuple(k.strip().lower() for k in value.split("+") if k.strip())
            elif key == "norm":
                kwargs["norm"] = value.strip().lower()
            else:
                raise InputError(f"--prune {text!r}: unknown option {key!r} (skip, min, layers, norm, @NODE)")
    except ValueError:
        raise bad from None
    return PruneConfig(**kwargs, skip=tuple(skip), overrides=tuple(overrides))


# -- graph helpers -------------------------------------------------------------------------------
def _own_constant(value: ir.Value | None) -> np.ndarray | None:
    """The array of a float initializer that only one node reads (so changing it changes only that
    node), else None."""
    if value is None or value.const_value is None or value.producer() is not None:
        return None
    if value.is_graph_input() or value.is_graph_output() or len(value.uses()) != 1:
        return None
    if value.const_value.dtype not in _FLOATS:
        return None
    return value.const_value.numpy()


def _set_constant(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


def _numel(value: ir.Value) -> int | None:
    """Elements of a value from its shape info; dynamic dims count 1 (a batch of one)."""
    if value.shape is None:
        return None
    n = 1
    for d in value.shape:
        n *= d if isinstance(d, int) and d > 0 else 1
    return n


def _macs(node: ir.Node, weight_shape: tuple[int, ...]) -> int | None:
    """MACs of a Conv/Gemm/MatMul per inference: output elements × reduction length."""
    out = _numel(node.outputs[0])
    if out is None:
        return None
    if node.op_type == "Conv":
        return out * math.prod(weight_shape[1:])
    k = weight_shape[1] if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else weight_shape[0]
    return out * k


def _model_macs(model: ir.Model) -> int | None:
    """MACs of every Conv/Gemm/MatMul with a constant weight (None if a shape is unknown)."""
    total = 0
    for node in model.graph:
        if _kind(node) is None or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        weight = node.inputs[1].const_value
        if weight is None:
            continue
        macs = _macs(node, tuple(weight.shape))
        if macs is None:
            return None
        total += macs
    return total


def _kind(node: ir.Node) -> str | None:
    for kind, op in LAYER_KINDS.items():
        if node.op_type == op and node.domain in ("", "ai.onnx"):
            return kind
    return None


# -- unstructured: one weight tensor per layer ---------------------------------------------------
@dataclasses.dataclass
class _Weight:
    """One node's constant weight that magnitude / N:M pruning may zero."""

    node: str
    op: str
    kind: str
    value: str  # the initializer's name
    array: np.ndarray
    axis: int  # the reduction (input) axis, along which N:M groups run

    @property
    def size(self) -> int:
        return int(self.array.size)

    def zeros(self) -> int:
        return int(self.array.size - np.count_nonzero(self.array))


def _find_weights(model: ir.Model, kinds: tuple[str, ...]) -> list[_Weight]:
    found = []
    for node in model.graph:
        kind = _kind(node)
        if kind not in kinds or len(node.inputs) < 2 or node.inputs[0] is None:
            continue
        array = _own_constant(node.inputs[1])
        if array is None or node.inputs[0].const_value is not None:
            continue
        if kind == "conv":
            if array.ndim < 3:
                continue
            axis = 1
        else:
            if array.ndim != 2 or (kind == "gemm" and node.attributes.get_int("transA", 0)):
                continue
            axis = 1 if kind == "gemm" and node.attributes.get_int("transB", 0) else 0
        found.append(_Weight(node.name, node.op_type, kind, node.inputs[1].name, array, axis))
    return found


def _smallest(array: np.ndarray, count: int) -> np.ndarray:
    """``array`` with its ``count`` smallest ``|w|`` set to 0 (ties: the earlier position first)."""
    out = array.copy().reshape(-1)
    if count > 0:
        order = np.argsort(np.abs(out), kind="stable")
        out[order[:count]] = 0
    return out.reshape(array.shape)


def _n_of_m(array: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` largest ``|w|`` of every ``m`` consecutive weights along ``axis``."""
    moved = np.moveaxis(array, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m).copy()
    order = np.argsort(-np.abs(groups), axis=-1, kind="stable")
    np.put_along_axis(groups, order[..., n:], 0, axis=-1)
    return np.moveaxis(groups.reshape(moved.shape), -1, axis)


# -- structured: channel chains ------------------------------------------------------------------
@dataclasses.dataclass
class _Chain:
    """A producer whose output channels can be removed, and every tensor that shrinks with them.

    Holds names and numbers only; :meth:`apply` finds them again in whatever copy it is given.
    Each entry of ``slices``/``values`` is ``(name, axis, block)``: channel ``c`` is the ``block``
    consecutive positions ``c·block ...`` along ``axis`` (1 for a plain channel axis, ``H·W``
    after a Flatten, the multiplier of a depthwise Conv).
    """

    node: str
    op: str
    kind: str
    weight_shape: tuple[int, ...]
    channels: int
    consumer: str = ""
    through: list[str] = dataclasses.field(default_factory=list)
    scores: np.ndarray | None = None
    slices: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
    values: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
    groups: list[str] = dataclasses.field(default_factory=list)  # depthwise Convs: group = channels kept
    reshapes: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (shape constant, block)
    params: int = 0  # elements of every sliced tensor
    macs: int | None = 0  # of producer, depthwise convs and consumer (all scale with the channels)

    def keep(self, sparsity: float) -> np.ndarray:
        """Indices of the channels kept at ``sparsity`` (the lowest scores go; at least one stays)."""
        remove = min(self.channels - 1, max(0, round(sparsity * self.channels)))
        order = np.argsort(self.scores, kind="stable")
        return np.sort(order[remove:])

    def cost(self, kept: int) -> tuple[int, int | None]:
        """(params, MACs) of the chain's tensors with ``kept`` channels: all are linear in it."""
        macs = None if self.macs is None else self.macs * kept // self.channels
        return self.params * kept // self.channels, macs

    def apply(self, model: ir.Model, keep: np.ndarray) -> None:
        graph = model.graph
        k = len(keep)
        for name, axis, block in self.slices:
            value = graph.initializers[name]
            array = value.const_value.numpy()
            _set_constant(value, np.take(array, _expand(keep, block), axis=axis))
        by_name = {v.name: v for node in graph for v in node.outputs}
        for name, axis, block in self.values:
            value = by_name[name]
            if value.shape is not None and len(value.shape) > axis:
                dims = list(value.shape)
                dims[axis] = k * block
                value.shape = ir.Shape(dims)
        for name in self.groups:
            graph.node(name).attributes["group"] = ir.AttrInt64("group", k)
        for name, block in self.reshapes:
            value = graph.initializers[name]
            shape = value.const_value.numpy().copy()
            shape[-1] = k * block
            _set_constant(value, shape)


def _expand(keep: np.ndarray, block: int) -> np.ndarray:
    return (keep[:, None] * block + np.arange(block)[None, :]).reshape(-1)


def _only_use(value: ir.Value) -> tuple[ir.Node, int] | str:
    if value.is_graph_output():
        return "output of the model"
    uses = value.uses()
    if len(uses) != 1:
        return f"read by {len(uses)} nodes"
    return uses[0].node, uses[0].idx


def _static(dims) -> bool:
    return all(isinstance(d, int) and d > 0 for d in dims)


def _find_chain(node: ir.Node, norm: str) -> _Chain | str:
    """The chain starting at ``node``, or why there is none."""
    kind = _kind(node)
    if kind is None or len(node.inputs) < 2 or node.inputs[0] is None:
        return "not a layer"
    weight = _own_constant(node.inputs[1])
    if weight is None:
        return "weight not a constant of its own"
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    out = node.outputs[0]
    if out.shape is None:
        return "output shape unknown"
    rank = len(out.shape)
    chain = _Chain(node.name, node.op_type, kind, tuple(weight.shape), 0)
    if kind == "conv":
        if weight.ndim < 3 or node.attributes.get_int("group", 1) != 1:
            return "grouped conv"
        chain.channels, axis = weight.shape[0], 1
        chain.slices.append((node.inputs[1].name, 0, 1))
        filters = weight.reshape(weight.shape[0], -1)
        bias_axis = 0
    else:
        if weight.ndim != 2 or node.attributes.get_int("transA", 0):
            return "not a 2-D weight"
        trans = kind == "gemm" and node.attributes.get_int("transB", 0)
        chain.channels, axis = (weight.shape[0] if trans else weight.shape[1]), rank - 1
        chain.slices.append((node.inputs[1].name, 0 if trans else 1, 1))
        filters = weight if trans else weight.T
        bias_axis = -1
    if bias_value is not None:
        bias = _own_constant(bias_value)
        if bias is None:
            return "bias not a constant of its own"
        if bias.size != 1:
            if bias.shape[bias_axis] != chain.channels or bias.size != chain.channels:
                return "bias not per channel"
            chain.slices.append((bias_value.name, bias.ndim - 1 if bias_axis == -1 else 0, 1))
    order = 1 if norm == "l1" else 2
    scores = np.linalg.norm(filters.astype(np.float64), ord=order, axis=1)
    macs = _macs(node, tuple(weight.shape))

    value, block, size = out, 1, chain.channels
    first = True  # still right after the producer (a BatchNormalization there scales the filter)
    while True:
        use = _only_use(value)
        if isinstance(use, str):
            return use
        nxt, idx = use
        op = nxt.op_type
        if nxt.domain not in ("", "ai.onnx"):
            return f"{op} in between"
        chain.values.append((value.name, axis, block))
        shape = list(value.shape) if value.shape is not None else None
        if shape is None:
            return f"shape of {value.name!r} unknown"
        if op == "Conv" and idx == 0:
            w = _own_constant(nxt.inputs[1] if len(nxt.inputs) > 1 else None)
            if w is None or w.ndim < 3:
                return "consumer conv weight not a constant of its own"
            group = nxt.attributes.get_int("group", 1)
            if axis != 1:
                return "conv after a reshape"
            if group == 1:  # the consumer
                chain.slices.append((nxt.inputs[1].name, 1, block))
                chain.consumer = nxt.name
                consumer_macs = _macs(nxt, tuple(w.shape))
                break
            if block != 1 or group != size or w.shape[1] != 1 or w.shape[0] % group:
                return "grouped conv in between"
            mult = w.shape[0] // group  # depthwise: channel c has filters c·mult ... c·mult+mult-1
            chain.slices.append((nxt.inputs[1].name, 0, mult))
            if len(nxt.inputs) > 2 and nxt.inputs[2] is not None:
                if _own_constant(nxt.inputs[2]) is None:
                    return "depthwise bias not a constant of its own"
                chain.slices.append((nxt.inputs[2].name, 0, mult))
            chain.groups.append(nxt.name)
            dw_macs = _macs(nxt, tuple(w.shape))
            macs = None if macs is None or dw_macs is None else macs + dw_macs
            block, size, first = mult, size * mult, False
        elif op in ("Gemm", "MatMul") and idx == 0:
            w = _own_constant(nxt.inputs[1] if len(nxt.inputs) > 1 else None)
            if w is None or w.ndim != 2 or (op == "Gemm" and nxt.attributes.get_int("transA", 0)):
                return f"consumer {op} weight not a constant 2-D weight of its own"
            if axis != rank - 1:
                return f"{op} reads another axis"
            trans = op == "Gemm" and nxt.attributes.get_int("transB", 0)
            chain.slices.append((nxt.inputs[1].name, 1 if trans else 0, block))
            chain.consumer = nxt.name
            consumer_macs = _macs(nxt, tuple(w.shape))
            break
        elif op == "BatchNormalization" and idx == 0:
            if axis != 1 or any(len(o.uses()) or o.is_graph_output() for o in nxt.outputs[1:]):
                return "BatchNormalization not in inference form"
            params = [_own_constant(v) for v in nxt.inputs[1:5]]
            if len(params) != 4 or any(p is None or p.size != size for p in params):
                return "BatchNormalization parameters not constants of their own"
            for v in nxt.inputs[1:5]:
                chain.slices.append((v.name, 0, block))
            if first:
                eps = nxt.attributes.get_float("epsilon", 1e-5)
                scale = np.abs(params[0].astype(np.float64)) / np.sqrt(params[3].astype(np.float64) + eps)
                scores = scores * scale
        elif op in _UNARY and idx == 0:
            extra = [v for v in nxt.inputs[1:] if v is not None]
            if any(v.const_value is None or v.const_value.size != 1 for v in extra):
                return f"{op} with non-constant parameters"
            if any(len(o.uses()) or o.is_graph_output() for o in nxt.outputs[1:]):
                return f"{op} mask output used"
            first = first and op in ("Identity", "Dropout")
        elif op in _BINARY:
            other = nxt.inputs[1 - idx]
            if other is None or other.const_value is None:
                return f"{op} with another tensor (residual?)"
            cshape = list(other.const_value.shape)
            if len(cshape) > rank:
                return f"{op} constant broadcasts up"
            caxis = axis - (rank - len(cshape))
            if caxis >= 0 and cshape[caxis] != 1:
                if cshape[caxis] != size or _own_constant(other) is None:
                    return f"{op} constant not per channel or shared"
                chain.slices.append((other.name, caxis, block))
            first = first and op in ("Add", "Sub")
        elif op in _POOLS and idx == 0:
            if axis != 1 or any(len(o.uses()) or o.is_graph_output() for o in nxt.outputs[1:]):
                return f"{op} with indices"
            first = False
        elif op in ("Flatten", "Reshape") and idx == 0:
            if axis != 1 or not _static(shape[2:]):
                return f"{op} of unknown spatial size"
            if op == "Flatten":
                if nxt.attributes.get_int("axis", 1) != 1:
                    return "Flatten at another axis"
            else:
                target = nxt.inputs[1].const_value if len(nxt.inputs) > 1 else None
                if target is None or target.size != 2 or len(shape) < 2:
                    return "Reshape not to [batch, features]"
                t = target.numpy()
                if int(t[0]) not in (0, shape[0]) or int(t[1]) not in (-1, size * math.prod(shape[2:])):
                    return "Reshape not to [batch, features]"
                if int(t[1]) != -1:
                    if len(nxt.inputs[1].uses()) != 1 or nxt.inputs[1].producer() is not None:
                        return "Reshape shape shared"
                    chain.reshapes.append((nxt.inputs[1].name, block * math.prod(shape[2:])))
            block *= math.prod(shape[2:])
            size *= math.prod(shape[2:])
            axis, rank, first = 1, 2, False
        else:
            return f"{op} in between"
        chain.through.append(op)
        value = nxt.outputs[0]
        if value.shape is None:
            return f"shape of {value.name!r} unknown"
        rank = len(value.shape)
    chain.scores = scores
    chain.macs = None if macs is None or consumer_macs is None else macs + consumer_macs
    # (shapes were read from the graph; the tensors to slice are counted once each)
    graph = node.graph
    chain.params = sum(int(graph.initializers[name].const_value.size) for name, _, _ in chain.slices)
    return chain


# -- the pass ------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Unit:
    """A thing pruned at one sparsity: a weight (magnitude, N:M) or a chain (channel)."""

    name: str
    size: int  # elements it could lose: the weight, or every tensor of the chain
    weight: _Weight | None = None
    chain: _Chain | None = None


class Prune(ir.passes.InPlacePass):
    """Prune weights by magnitude, N:M pattern or whole channels (lossy: held to the accuracy
    budget vs the original model)."""

    lossy = True

    def __init__(self, config: PruneConfig, calib: Samples | None = None) -> None:
        super().__init__()
        if config.budget is not None and not calib:
            raise InputError(f"--prune {config}: a budget needs calibration data (--calib)")
        self.config = config
        self.calib = list(calib or [])

    def call(self, model: ir.Model) -> StatsResult:
        # One BLAS thread, as in the low-rank pass: sorts and norms only, on a busy 2-core machine.
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
            return self._call(model)

    def _call(self, model: ir.Model) -> StatsResult:
        ir.passes.common.NameFixPass()(model)
        ir.passes.common.ShapeInferencePass()(model)  # chains and FLOPs need every value's shape
        cfg = self.config
        before = (count_params(model)[0], _model_macs(model))
        rejected: Counter[str] = Counter()
        if cfg.method == "channel":
            units = []
            for node in model.graph:
                if _kind(node) not in cfg.layers:
                    continue
                chain = _find_chain(node, cfg.norm)
                if isinstance(chain, str):
                    rejected[chain] += 1
                    log.info("prune: %s (%s) left alone: %s", node.name, node.op_type, chain)
                else:
                    units.append(_Unit(chain.node, chain.params, chain=chain))
        else:
            units = [_Unit(w.node, w.size, weight=w) for w in _find_weights(model, cfg.layers)]

        overrides = dict(cfg.overrides)
        reason: dict[str, str] = {}
        for u in units:
            if u.name in cfg.skip:
                reason[u.name] = "kept (skip)"
            elif u.size < cfg.min_params:
                reason[u.name] = f"kept (below {cfg.min_params} params)"
            elif overrides.get(u.name) == 0:
                reason[u.name] = "kept (sparsity 0)"
            elif cfg.method == "nm" and u.weight is not None and u.weight.array.shape[u.weight.axis] % cfg.m:
                reason[u.name] = f"kept (reduction axis {u.weight.array.shape[u.weight.axis]} not a multiple of {cfg.m})"
        active = [u for u in units if u.name not in reason]

        level: dict[str, float] = {}  # unit → sparsity (nm: 1.0 = pruned)
        counts: dict[str, int] = {}  # global magnitude: unit → weights zeroed
        extra: dict[str, Any] = {}
        free = [u for u in active if u.name not in overrides]
        for u in active:
            if u.name in overrides:
                level[u.name] = overrides[u.name]
        if cfg.budget is not None:
            chosen, extra = self._allocate(model, free)
            level.update(chosen)
            for u in free:
                if u.name not in chosen:
                    reason[u.name] = "kept (budget)"
        elif cfg.scope == "global":
            counts, extra = _global_counts([u.weight for u in free], cfg.sparsity)
        else:
            for u in free:
                level[u.name] = 1.0 if cfg.method == "nm" else cfg.sparsity

        records = []
        modified = False
        for u in units:
            if u.name in reason:
                sparsity, count = None, None
            elif u.name in counts:
                sparsity, count = counts[u.name] / u.size, counts[u.name]
            else:
                sparsity, count = level[u.name], None
            record = self._apply(model, u, sparsity, count)
            record["decision"] = reason.get(u.name, "pruned")
            if record["decision"] == "pruned" and record["sparsity"] == 0:
                record["decision"] = "kept (nothing to remove)"
            modified |= record["decision"] == "pruned"
            records.append(record)
        for u, record in zip(units, records):  # a Conv between two chains loses rows and columns
            if u.chain is not None:
                record["pruned_shape"] = list(model.graph.initializers[u.chain.slices[0][0]].const_value.shape)
        after = (count_params(model)[0], _model_macs(model))
        stats = self._stats(records, rejected, extra, before, after)
        return StatsResult(model, modified, stats=stats, layers=records)

    # -- one unit --------------------------------------------------------------------------------
    def _prune_array(self, w: _Weight, sparsity: float | None, count: int | None) -> np.ndarray:
        if self.config.method == "nm":
            return _n_of_m(w.array, w.axis, self.config.n, self.config.m)
        if count is None:
            count = round(float(sparsity) * w.size)
        return _smallest(w.array, count)

    def _apply(self, model: ir.Model, u: _Unit, sparsity: float | None, count: int | None) -> dict[str, Any]:
        if u.weight is not None:
            w = u.weight
            zeros0 = w.zeros()
            record: dict[str, Any] = {"name": w.node, "op": w.op, "weight_shape": list(w.array.shape)}
            if sparsity is None:
                after = zeros0
            else:
                new = self._prune_array(w, sparsity, count)
                _set_constant(model.graph.initializers[w.value], new)
                after = int(new.size - np.count_nonzero(new))
            record.update(
                target=None if sparsity is None else (self.config.n / self.config.m if self.config.method == "nm" else round(float(sparsity), 6)),
                sparsity=round(after / w.size, 6),
                zeros=[zeros0, after],
                params=[w.size, w.size],
                nonzero=[w.size - zeros0, w.size - after],
            )
            if self.config.method == "nm" and sparsity is not None:
                record["pattern"] = f"{self.config.n}:{self.config.m}"
            return record
        c = u.chain
        assert c is not None
        kept = c.channels if sparsity is None else len(c.keep(sparsity))
        if kept < c.channels:
            c.apply(model, c.keep(sparsity))
        params, macs = c.cost(kept)
        return {
            "name": c.node,
            "op": c.op,
            "weight_shape": list(c.weight_shape),
            "pruned_shape": None,  # filled in once every chain is pruned
            "consumer": c.consumer,
            "through": "→".join(c.through),
            "channels": [c.channels, kept],
            "target": None if sparsity is None else round(float(sparsity), 6),
            "sparsity": round(1 - kept / c.channels, 6),
            "params": [c.params, params],
            "flops": [None if c.macs is None else 2 * c.macs, None if macs is None else 2 * macs],
        }

    # -- budget ----------------------------------------------------------------------------------
    def _ladder(self) -> tuple[float, ...]:
        if self.config.method == "nm":
            return (1.0,)
        return CHANNEL_LADDER if self.config.method == "channel" else MAGNITUDE_LADDER

    def _cost(self, u: _Unit, sparsity: float) -> float:
        """Parameters left (nonzero for unstructured) at ``sparsity`` (0: as it is)."""
        if sparsity <= 0:
            return float(u.size if u.chain is not None else u.weight.size - u.weight.zeros())
        if u.chain is not None:
            return float(u.chain.cost(len(u.chain.keep(sparsity)))[0])
        w = u.weight
        if self.config.method == "nm":
            return float(np.count_nonzero(_n_of_m(w.array, w.axis, self.config.n, self.config.m)))
        return float(w.size - max(w.zeros(), round(sparsity * w.size)))

    def _edit(self, u: _Unit, sparsity: float) -> Callable[[ir.Model], None]:
        def edit(model: ir.Model) -> None:
            if u.chain is not None:
                u.chain.apply(model, u.chain.keep(sparsity))
            else:
                _set_constant(model.graph.initializers[u.weight.value], self._prune_array(u.weight, sparsity, None))

        return edit

    def _allocate(self, model: ir.Model, units: list[_Unit]) -> tuple[dict[str, float], dict[str, Any]]:
        """Per-unit sparsity meeting the budget: greedy by measured sensitivity (rank_selection).

        Each unit is pruned alone at every ladder sparsity and the drop of the mean cosine vs the
        unpruned model is its loss: the moves are ordered by that (smooth) loss per parameter
        removed even for a top-1 budget, whose metric moves in steps of one calibration sample
        and would leave most moves tied at zero cost. Whether a prefix of the moves meets a
        cosine/top-1 budget is measured with the budget's own metric, all units pruned together.
        A params budget is checked on the pruned model itself (chains that share a Conv overlap,
        so their savings do not simply add): the shortest prefix of the moves that reaches it
        (all of them when it is out of reach).
        """
        kind, value = self.config.budget
        calib = _spread(self.calib, self.config.max_sensitivity)
        cosine = calibration_probe(model, calib, "cosine")
        judge = cosine if kind != "top1" else calibration_probe(model, calib, "top1")
        ladder = self._ladder()
        by_name = {u.name: u for u in units}

        def edits(levels: dict[str, int]) -> Callable[[ir.Model], None]:
            fns = [self._edit(by_name[name], ladder[i - 1]) for name, i in levels.items()]
            return lambda trial: [fn(trial) for fn in fns]

        ladders: dict[str, list[tuple[int, float, float]]] = {}
        evaluations = 0
        for u in units:
            steps = [(0, self._cost(u, 0.0), 0.0)]
            for i, s in enumerate(ladder, 1):
                cost = self._cost(u, s)
                if cost >= steps[-1][1]:
                    continue  # removes nothing more (a small chain, or rounding)
                steps.append((i, cost, 1.0 - cosine(edits({u.name: i}))))
                evaluations += 1
            ladders[u.name] = steps

        def metric(levels: dict[str, int]) -> float:
            return judge(edits(levels))

        stats: dict[str, Any] = {"budget": f"{kind}={value:g}" + ("x" if kind == "params" else "")}
        if kind == "params":
            # Every move in greedy order (an unreachable target), then the shortest prefix whose
            # pruned model really has few enough parameters (monotone along the order).
            total = self._params(model)
            goal = total / value
            _, order = greedy_allocate(ladders, total, RankPolicy("budget", math.inf, budget="params"))

            def prefix(k: int) -> dict[str, int]:
                return {m.layer: m.rank for m in order[:k]}

            def reached(k: int) -> int:
                trial = ir.serde.deserialize_model(ir.serde.serialize_model(model))
                edits(prefix(k))(trial)
                return self._params(trial)

            lo, hi = 0, len(order)
            while lo < hi:
                mid = (lo + hi) // 2
                if reached(mid) <= goal:
                    hi = mid
                else:
                    lo = mid + 1
            levels, moves = prefix(lo), order[:lo]
            stats.update(params_target=round(goal), params_reached=reached(lo))
        else:
            levels, moves = greedy_allocate(ladders, 0.0, RankPolicy("budget", value, budget=kind), metric)
        stats.update(
            sensitivity_evaluations=evaluations,
            greedy_moves=len(moves),
            calibration_metric=round(metric(levels), 6) if levels else 1.0,
            calibration_samples=len(calib),
        )
        return {name: ladder[i - 1] for name, i in levels.items()}, stats

    def _params(self, model: ir.Model) -> int:
        """What a params budget counts: initializer elements (unstructured: nonzero ones)."""
        if self.config.method == "channel":
            return count_params(model)[0]
        return sum(
            int(np.count_nonzero(v.const_value.numpy()))
            for v in model.graph.initializers.values()
            if v.const_value is not None
        )

    # -- stats -----------------------------------------------------------------------------------
    def _stats(
        self, records: list[dict[str, Any]], rejected: Counter, extra: dict[str, Any],
        before: tuple[int, int | None], after: tuple[int, int | None],
    ) -> dict[str, Any]:
        """Pass-wide numbers. ``params``/``flops``: the whole model's initializers and
        Conv/Gemm/MatMul FLOPs (2·MACs, a dynamic batch counting one), before → after; the
        per-layer records count each chain alone (a Conv that is one chain's consumer and the
        next one's producer appears in both)."""
        done = [r for r in records if r["decision"] == "pruned"]
        stats: dict[str, Any] = {
            "spec": str(self.config),
            "method": self.config.method,
            "layers_found": len(records),
            "layers_pruned": len(done),
            "params_before": before[0],
            "params_after": after[0],
        }
        if self.config.method == "channel":
            stats["channels_removed"] = sum(r["channels"][0] - r["channels"][1] for r in records)
            if before[1] is not None and after[1] is not None:
                stats["flops_before"], stats["flops_after"] = 2 * before[1], 2 * after[1]
            if rejected:
                stats["channel_rejected"] = dict(rejected.most_common())
        else:
            total = sum(r["params"][0] for r in records)
            stats["layer_weights"] = total
            stats["zeros_before"] = sum(r["zeros"][0] for r in records)
            stats["zeros_after"] = sum(r["zeros"][1] for r in records)
            stats["sparsity"] = round(stats["zeros_after"] / total, 6) if total else 0.0
        stats.update(extra)
        return stats


def _global_counts(weights: list[_Weight], sparsity: float) -> tuple[dict[str, int], dict[str, Any]]:
    """One ``|w|`` threshold over all ``weights``: how many of each layer's weights fall at or
    below it when the fraction ``sparsity`` of them all is zeroed (ties: earlier layer first)."""
    if not weights:
        return {}, {"threshold": None}
    pool = np.concatenate([np.abs(w.array.astype(np.float64)).ravel() for w in weights])
    owner = np.concatenate([np.full(w.size, i) for i, w in enumerate(weights)])
    k = round(sparsity * pool.size)
    order = np.argsort(pool, kind="stable")[:k]
    per = np.bincount(owner[order], minlength=len(weights))
    threshold = float(pool[order[-1]]) if k else 0.0
    return {w.node: int(per[i]) for i, w in enumerate(weights)}, {"threshold": threshold, "global_weights": int(pool.size)}
