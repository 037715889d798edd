"""Default CPU schedules: fast code for LLVM targets without a tuning session.

``tvm.compile`` applies no schedules on CPUs (``tvm.s_tir.dlight.cpu`` has only GEMV and
Reduction rules), so every kernel runs as a naive loop nest: 10–100x slower than ONNX Runtime.
These rules, in the style of ``tvm.s_tir.dlight`` (one ``ScheduleRule`` per kind of kernel,
applied by ``dlight.ApplyDefaultSchedule`` to every fused PrimFunc that no tuning record
scheduled), give each kernel a fixed, analytically chosen schedule:

- :class:`Contraction`: one multiply-accumulate reduction block (matmul, batch matmul, dense,
  conv2d incl. 1x1, grouped and depthwise) with an elementwise epilogue (bias, residual add,
  ReLU/Clip/GELU). Register tiling: the innermost output axis is vectorized (the target's
  vector width), a second output axis that the vectorized operand does not depend on (the rows
  of a matmul, the output channels of a conv) is unrolled, so each vector load feeds several
  FMAs, and the accumulators live in registers (``cache_write`` to ``local``) across the
  reduction loop; the epilogue runs on each finished tile; the outer tiles run in parallel. CPU
  builds import convs as NHWC (``targets.lowering.channels_last``), so the vectorized axis is
  the channels, wide and a multiple of the vector in most networks.
- :class:`Injective`: elementwise, broadcast, transpose, pad and copy kernels: parallel outer
  loops, vectorized innermost axis.
- :class:`RowReduction`: softmax, layer norm: rows in parallel, reductions as vector partial sums.
- dlight's own CPU ``GEMV`` and ``Reduction`` (the reductions RowReduction does not take).

The tile sizes are functions of the target's vector width (LLVM's for the target: 16 fp32 lanes
with AVX-512, 8 with AVX2, 4 with NEON) and its register count, not of measurements on one
machine. MetaSchedule records (``edgecomp tune``) take precedence: a function the database
scheduled is marked ``tirx.is_scheduled`` and left alone.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

__all__ = ["default_rules", "default_schedule", "apply_default_schedules", "schedule_report", "vector_lanes", "accumulators",
           "int8_dot", "register_intrinsics"]

log = logging.getLogger(__name__)


def _has_feature(target: Any, feature: str) -> bool:
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features(feature, target))
    except Exception:  # noqa: BLE001  (not an LLVM target LLVM knows)
        return False


def vector_lanes(target: Any, dtype_bits: int = 32) -> int:
    """How many ``dtype_bits`` elements one vector register of ``target`` holds (at least 1).

    x86 from the target's CPU features (``llvm_get_vector_width`` answers 512 for every x86
    CPU in TVM 0.27, AVX2-only Haswell included); other architectures from LLVM (NEON: 128).
    """
    from tvm.target import codegen

    if _has_feature(target, "avx512f"):
        bits = 512
    elif _has_feature(target, "avx"):
        bits = 256
    elif _has_feature(target, "sse2"):
        bits = 128
    else:
        try:
            bits = int(codegen.llvm_get_vector_width(target))
        except Exception:  # noqa: BLE001
            bits = 128
    return max(1, bits // dtype_bits)


def accumulators(target: Any) -> int:
    """Vector accumulators in one register tile: 24 of 32 registers (AVX-512 zmm, AArch64 v),
    12 of 16 (AVX2 ymm, SSE xmm, ARMv7 NEON q), leaving room for operand loads and broadcasts."""
    if _has_feature(target, "avx512f") or bool(target.attrs.get("feature.is_aarch64", False)):
        return 24
    return 12


def int8_dot(target: Any) -> tuple[str, int, str] | None:
    """The dot-product instruction that int8 matmuls are tensorized with on ``target``:
    ``(TVM tensor intrinsic, int32 lanes, dtype of the broadcast operand)``, or None.

    x86 AVX-512 VNNI ``vpdpbusd``: 16 int32 lanes, each += 4 products of uint8 × int8;
    AArch64 ``sdot`` (``+dotprod``: Cortex-A55, A76, ...): 4 lanes, int8 × int8. The int8
    rewrite (``targets.int8``) makes the broadcast operand, a matmul's activations, the dtype
    named here."""
    if _has_feature(target, "avx512vnni"):
        return "dot_16x4_vnni", 16, "uint8"
    if _has_feature(target, "dotprod") and bool(target.attrs.get("feature.is_aarch64", False)):
        return "dot_4x4_i8i8s32_sdot", 4, "int8"
    return None


_DOT_LLVM = {"dot_16x4_vnni": (16, "uint8", "llvm.x86.avx512.vpdpbusd.512"),
             "dot_8x4_vnni": (8, "uint8", "llvm.x86.avx512.vpdpbusd.256"),
             "dot_4x4_i8i8s32_sdot": (4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8")}
# A narrower form of the same instruction, for N a multiple of its lanes only (AVX-512 VL: the
# 256-bit vpdpbusd): MobileNetV2's 24-channel 1x1 convs, its 1000-class classifier.
_DOT_NARROW = {"dot_16x4_vnni": ("dot_8x4_vnni", "avx512vl")}


@functools.lru_cache(maxsize=None)
def _dot_intrinsics(name: str) -> tuple[str, str]:
    """Register (once) the tensor intrinsics of the int8 dot product ``name`` (see :func:`int8_dot`);
    returns their names: (dot product, pack of 4 rows of a [K, N] operand).

    TVM ships ``dot_16x4_vnni``/``dot_4x4_i8i8s32_sdot`` with a *global* accumulator; these
    accumulate into a ``local`` buffer, so that the register tile stays in registers. The pack
    puts a 4 x lanes block of the second operand ([K, N]) in the order the instruction reads it (lanes
    groups of 4 consecutive k), with one shuffle instead of a byte-by-byte scatter (measured: the
    scatter took a third of MiniLM's 384x1536 int8 kernel)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    lanes, a_dtype, llvm = _DOT_LLVM[name]

    @T.prim_func(s_tir=True)
    def dot_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def dot_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a4 = T.reinterpret(A.vload([0], f"{a_dtype}x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm), C.vload([0], f"int32x{lanes}"),
                T.reinterpret(T.broadcast(a4, lanes), dtype=f"{a_dtype}x{lanes * 4}"),
                B.vload([0, 0], f"int8x{lanes * 4}"), dtype=f"int32x{lanes}")

    @T.prim_func(s_tir=True)
    def pack_kn_desc(a: T.handle, p: T.handle) -> None:
        s0 = T.int64()
        A = T.match_buffer(a, (4, lanes), "int8", strides=[s0, 1], offset_factor=1)
        P = T.match_buffer(p, (lanes, 4), "int8", offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:4, 0:lanes])
            T.writes(P[0:lanes, 0:4])
            for j, k in T.grid(lanes, 4):
                with T.sblock("pack"):
                    vk, vj = T.axis.remap("SS", [k, j])
                    P[vj, vk] = A[vk, vj]

    @T.prim_func(s_tir=True)
    def pack_kn_impl(a: T.handle, p: T.handle) -> None:
        s0 = T.int64()
        A = T.match_buffer(a, (4, lanes), "int8", strides=[s0, 1], offset_factor=1)
        P = T.match_buffer(p, (lanes, 4), "int8", offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:4, 0:lanes])
            T.writes(P[0:lanes, 0:4])
            P[0, T.ramp(T.int32(0), 1, lanes * 4)] = T.Shuffle(
                [A.vload([0, 0], f"int8x{lanes}"), A.vload([1, 0], f"int8x{lanes}"),
                 A.vload([2, 0], f"int8x{lanes}"), A.vload([3, 0], f"int8x{lanes}")],
                [k * lanes + j for j in range(lanes) for k in range(4)])

    names = (f"edgecomp.{name}.local", f"edgecomp.{name}.pack")
    for n, desc, impl in zip(names, (dot_desc, pack_kn_desc), (dot_impl, pack_kn_impl)):
        TensorIntrin.register(n, desc, impl, override=True)
    return names


def register_intrinsics() -> None:
    """Register edgecomp's tensor intrinsics (those :class:`Int8Dot` tensorizes with). A tuning
    record's trace names them: a process that replays a database (``build --db``) needs them
    registered even when no default schedule ran in it."""
    for name in _DOT_LLVM:
        _dot_intrinsics(name)


def _bits(dtype: Any) -> int:
    from tvm.runtime import DataType

    return DataType(str(dtype)).bits


@functools.lru_cache(maxsize=None)
def _rules():
    """The rule classes; built lazily (once) so that importing edgecomp does not import TVM."""
    from tvm import get_global_func, s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
    from tvm.tirx import IndexMap
    from tvm.tirx.analysis import undefined_vars

    _has_if_then_else = get_global_func("s_tir.schedule.HasIfThenElse")

    def extent(sch, loop) -> int | None:
        value = sch.get(loop).extent
        return int(value) if isinstance(value, tirx.IntImm) else None

    def largest_divisor(n: int, limit: int) -> int:
        for d in range(min(n, limit), 0, -1):
            if n % d == 0:
                return d
        return 1

    def divisors(n: int, limit: int) -> list[int]:
        return [d for d in range(1, min(n, limit) + 1) if n % d == 0]

    def tile_shape(n_vec: int, n_reg: int, n_row: int, lanes: int, budget: int,
                   weight_row: int = 1) -> tuple[int, int, int, int]:
        """(vector length, vectors, reg_i, row_i) of the register tile.

        Each vector is at most one register (LLVM splits a longer, odd-sized one into scalar
        inserts) and every factor divides its axis (no tails). Among the tiles of at most
        ``budget`` accumulators, the one with the most FMAs per load: a reduction step loads
        ``vectors * row_i`` vectors and broadcasts ``reg_i`` scalars for ``reg_i * row_i *
        vectors`` FMAs; ties go to the larger tile (fewer, longer tasks). Without a reg axis
        (depthwise convs) every load feeds one FMA whatever the shape; there LLVM keeps a kernel
        row of weight vectors (``weight_row`` per channel vector) live beside the accumulators, so
        both must fit the registers with 4 to spare (MobileNetV2's 144- and 192-channel 3x3
        depthwise tiles of 24 accumulators spilled 78 and 115 zmm to the stack: 0.100 -> 0.088 and
        0.037 -> 0.025 ms with the smaller tiles, its fp32 depthwise kernels 7% less in total)."""
        width = largest_divisor(n_vec, lanes)
        registers = budget * 4 // 3  # accumulators() takes 24 of 32 (12 of 16) vector registers
        best = None
        for v in divisors(n_vec // width, 6):
            for r in divisors(n_reg, budget // v):
                for w in divisors(n_row, budget // (v * r)):
                    fmas = r * w * v
                    if n_reg > 1:
                        key = (fmas / (v * w + r), fmas)
                    else:  # every load feeds one FMA (depthwise): the largest tile that fits, then the
                        # most vectors (a pixel's channels contiguous: MobileNetV2's 112x112 ones 1.3x)
                        key = (fmas + weight_row * v <= registers - 4, fmas, v)
                    if best is None or key > best[0]:
                        best = (key, (width, v, r, w))
        return best[1]

    def nbytes(regions) -> int:
        total = 0
        for r in regions:
            n = 1
            for d in r.source.shape:
                n *= int(d) if isinstance(d, tirx.IntImm) else 1
            total += n * _bits(r.source.dtype) // 8
        return total

    def body_vars(expr) -> set:
        return set(undefined_vars(expr))

    def has_if_then_else(block) -> bool:
        return bool(_has_if_then_else(block))

    def pads_last_axis(block) -> bool:
        """Whether a pad block pads its buffer's innermost axis (the one vectorized)."""
        written = block.writes[0].source
        return not any(int(r.source.shape[-1]) == int(written.shape[-1]) for r in block.reads
                       if len(r.source.shape) == len(written.shape) and isinstance(r.source.shape[-1], tirx.IntImm)
                       and isinstance(written.shape[-1], tirx.IntImm))

    def inline_producers(sch, block) -> None:
        """Inline copies, elementwise producers and pads that leave the innermost axis alone
        (NHWC: their bounds test is one branch per vector, measured faster than a pad buffer).
        A pad of the innermost axis (NCHW) would put a branch on every lane: it stays a block of
        its own, computed per tile."""
        changed = True
        while changed:
            changed = False
            for producer in sch.get_producers(block):
                if has_if_then_else(sch.get(producer)) and pads_last_axis(sch.get(producer)):
                    continue
                try:
                    sch.compute_inline(producer)
                    changed = True
                except Exception:  # noqa: BLE001  (not inlinable: leave it a kernel of its own)
                    continue

    def inline_side_inputs(sch, infos, main) -> None:
        """Inline the blocks before ``main`` that do not feed it (an elementwise side input of the
        epilogue, e.g. a dequantized residual) into their consumers, so the epilogue can run
        per tile."""
        feeds = {sch.get(p).name_hint for p in sch.get_producers(main)}
        for info in infos:
            block = sch.get(info.block_rv)
            if block.same_as(sch.get(main)):
                break
            if block.name_hint not in feeds:
                sch.compute_inline(info.block_rv)

    def sum_of_products(func):
        """``(schedule, block infos, the reduction block, its statement)`` of a PrimFunc with exactly
        one reduction, ``C = C + ...`` into one buffer, every other block injective; None otherwise."""
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = [b for b in infos if b.is_reduction()]
        if len(reductions) != 1 or any(not b.is_injective() for b in infos if b is not reductions[0]):
            return None
        main = reductions[0].block_rv
        stmt = sch.get(main)
        if len(stmt.writes) != 1 or not isinstance(stmt.body, tirx.BufferStore) or not isinstance(stmt.body.value, tirx.Add):
            return None
        return sch, infos, main, stmt

    def schedule_injective(sch, block, lanes: int) -> None:
        """All loops fused, split into a vector of up to 4 registers (vectorized when it divides
        the extent), the rest parallel when there is enough work to share. A pad (a bounds test
        per element) keeps its rows whole instead: the outer axes fused and parallel, the row a
        plain loop that LLVM vectorizes (MobileNetV2's int8 96x114x114 pad: 6.0 ms as fused
        64-element vectors, each lane's indices and bounds test computed apart; 0.07 ms so)."""
        loops = sch.get_loops(block)
        if not loops:
            return
        if has_if_then_else(sch.get(block)) and len(loops) > 1:
            outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            n = extent(sch, outer)
            if n is not None and n * (extent(sch, loops[-1]) or 1) > 4096:
                sch.parallel(outer)
            return
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        n = extent(sch, fused)
        if n is None:
            return
        inner = largest_divisor(n, 4 * lanes)
        if inner < lanes // 2 or inner == 1:
            inner = min(n, 4 * lanes)
        outer, vec = sch.split(fused, factors=[None, inner])
        if n % inner == 0:
            sch.vectorize(vec)
        if n > 4096:
            sch.parallel(outer)

    def _leaf_blocks(sch):
        infos = normalize_prim_func(sch)
        return [b.block_rv for b in infos] if infos else []

    class Injective(CPUScheduleRule):
        """Elementwise / broadcast / layout kernels (and the pads ``Contraction`` leaves)."""

        def apply(self, func, target, _tunable):
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None or not infos or any(not b.is_injective() for b in infos):
                return None
            lanes = vector_lanes(target)
            blocks = [b.block_rv for b in infos]
            for b in blocks[:-1]:
                try:
                    sch.compute_inline(b)
                except Exception:  # noqa: BLE001
                    pass
            for b in _leaf_blocks(sch):
                schedule_injective(sch, b, lanes)
            return sch

    class Contraction(CPUScheduleRule):
        """One multiply-accumulate block (matmul, conv2d) plus elementwise prologue/epilogue."""

        def apply(self, func, target, _tunable):
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            found = sum_of_products(func)
            if found is None or len(found[3].reads) < 2:
                return None
            sch, _, main, stmt = found
            # Integer accumulations (--int8-arith) come here when Int8Dot does not take them (no
            # dot-product instruction, or shapes it does not tile): widening multiply-adds in
            # int32 lanes. MiniLM's 384x1536 int8 kernel on an AVX-512 target without VNNI:
            # 2.4 ms, against 98 ms unscheduled (and 1.1 ms in fp32; 0.44 ms with Int8Dot).
            lanes = vector_lanes(target, _bits(stmt.writes[0].source.dtype))

            inline_producers(sch, main)
            inline_side_inputs(sch, normalize_prim_func(sch), main)
            deinterleaved = self._deinterleave_strided(sch, main)
            epilogue = self._gather_epilogue(sch, main)
            if epilogue is False:
                return None

            stmt = sch.get(main)
            iters = list(stmt.iter_vars)
            loops = sch.get_loops(main)
            if len(loops) != len(iters):
                return None
            spatial = [(iv, lp) for iv, lp in zip(iters, loops) if iv.iter_type == tirx.IterVar.DataPar]
            reduce = [(iv, lp) for iv, lp in zip(iters, loops) if iv.iter_type == tirx.IterVar.CommReduce]
            if not spatial or not reduce or any(extent(sch, lp) is None for _, lp in spatial + reduce):
                return None
            out_index = stmt.writes[0].region
            last = out_index[-1].min
            vec = next(((iv, lp) for iv, lp in spatial if iv.var.same_as(last)), None)
            if vec is None or out_index[-1].extent != 1:
                return None
            # the operand the vector axis walks through (the conv input / matmul B)
            vec_operand = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)
                           and any(vec[0].var in body_vars(rg.min) for rg in r.region)]
            used_by_vec_operand = set()
            for r in vec_operand:
                for rg in r.region:
                    used_by_vec_operand |= body_vars(rg.min)

            # The register tile: [reg_i, row_i, vec_i] accumulators, vec_i vectorized along the
            # innermost output axis; reg: an output axis the vector operand does not depend on (each
            # vector load feeds reg_i FMAs: a matmul's rows, an NCHW conv's output channels, an
            # NHWC conv's columns); row: the next output axis out when the vector operand does
            # depend on it (an NCHW conv's rows, a depthwise NHWC conv's columns). (Fusing an NHWC
            # conv's rows and columns into one reg axis measured up to 3x slower: the tiles then
            # sweep the whole image per channel block instead of sharing input rows.)
            pos = [lp for _, lp in spatial].index(vec[1])
            before = [(iv, lp) for iv, lp in spatial[:pos] if extent(sch, lp) > 1]
            reg = next(((iv, lp) for iv, lp in reversed(before) if iv.var not in used_by_vec_operand), None)
            row = before[-1] if before and before[-1] is not reg and before[-1][0].var in used_by_vec_operand else None
            width, vectors, ri, wi = tile_shape(
                extent(sch, vec[1]), extent(sch, reg[1]) if reg else 1, extent(sch, row[1]) if row else 1,
                lanes, accumulators(target), weight_row=extent(sch, reduce[-1][1]))
            # Tiles in parallel, ordered so that the larger operand streams through the cache once:
            # when the vector operand (weights, a matmul's B) is the larger, the vector-axis tiles
            # are outermost, so consecutive tiles share its panel (K x one tile of N) while the
            # smaller operand's slices cycle (MobileNetV2's 7x7 layers: 1.6 MB of weights, 63 KB
            # of input); otherwise the other way round (its 112x112 layers: a 800 KB input, 6 KB
            # of weights: each input row is used for every channel block while in cache; depthwise
            # convs, with no reg axis, too).
            split = {}
            for name, axis, factor in (("reg", reg, ri), ("row", row, wi)):
                if axis is not None:
                    split[name] = sch.split(axis[1], factors=[None, factor])
            v_o, v_m, v_i = sch.split(vec[1], factors=[None, vectors, width])
            tiled = {id(a[1]) for a in (reg, row, vec) if a is not None}
            others = [lp for _, lp in spatial if id(lp) not in tiled]
            others += [split["row"][0]] if "row" in split else []
            others += [split["reg"][0]] if "reg" in split else []
            other_operands = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)
                              and not any(r.source.same_as(v.source) for v in vec_operand)]
            if reg is not None and nbytes(vec_operand) >= nbytes(other_operands):
                outer_order = [v_o] + others
            else:
                outer_order = others[:-1] + [v_o] + others[-1:] if "reg" in split else others + [v_o]
            inner_order = [split[k][1] for k in ("reg", "row") if k in split] + [v_m, v_i]
            v_i = inner_order[-1]
            red_loops = [lp for _, lp in reduce]
            sch.reorder(*outer_order, *red_loops, *inner_order)

            acc = sch.cache_write(main, 0, "local")
            # int32 accumulators (int8 depthwise convs) write back per register: their requantize
            # epilogue as one 96-lane vector kept its per-channel constants in scalars and rebuilt
            # each vector lane by lane (MobileNetV2's int8 depthwise kernels: 12% faster; fp32
            # tiles measured 1.6% slower split, so they stay one vector)
            integer = str(sch.get(main).writes[0].source.dtype).startswith(("int", "uint"))
            sch.reverse_compute_at(acc, outer_order[-1], preserve_unit_loops=True)
            if epilogue is not None:
                try:
                    sch.reverse_compute_inline(epilogue)
                except Exception:  # noqa: BLE001  (a broadcast epilogue: run it per tile instead)
                    sch.reverse_compute_at(epilogue, outer_order[-1], preserve_unit_loops=True)
                    self._vectorize_tail(sch, epilogue, lanes, one_register=integer)
            self._vectorize_tail(sch, acc, lanes, one_register=integer)

            for lp in red_loops[1:]:
                n = extent(sch, lp)
                if n is not None and n <= 7:  # conv kernel windows
                    sch.unroll(lp)
            for lp in inner_order[:-1]:
                sch.unroll(lp)
            sch.vectorize(v_i)
            if outer_order[0] is v_o and len(outer_order) > 1 and extent(sch, v_o) >= 8:
                # weights streamed once: each task owns a panel and runs all its tiles (measured
                # 4% faster on MobileNetV2 than interleaving the same tiles across the threads)
                par = v_o
                if len(outer_order) > 2:
                    sch.fuse(*outer_order[1:])
            else:
                par = sch.fuse(*outer_order) if len(outer_order) > 1 else outer_order[0]
            # the producers left (pads) are computed per tile, just before it reads them, while
            # they are in cache: a few rows of one channel, not a second pass over the tensor
            for producer in sch.get_producers(main):
                try:
                    sch.compute_at(producer, par, preserve_unit_loops=True)
                except Exception:  # noqa: BLE001  (a producer the tile cannot bound: a kernel of its own)
                    schedule_injective(sch, producer, lanes)
                    continue
                self._vectorize_tail(sch, producer, lanes, one_register=sch.get(producer).name_hint in deinterleaved)
            sch.parallel(par)
            init = sch.decompose_reduction(main, red_loops[0])
            self._vectorize_tail(sch, init, lanes)
            return sch

        @staticmethod
        def _vectorize_tail(sch, block, lanes: int, one_register: bool = False) -> None:
            """Vectorize the innermost loop; ``one_register``: in vectors of at most one register,
            a divisor of the extent. Used for the deinterleaved pads of strided convs (their
            57-element rows as one gathered vector ran 1.6-2x slower on MobileNetV2's stride-2
            layers) and for int32 accumulator write-back (its requantize epilogue, see
            ``Contraction``); the fp32 loops measured as fast or faster as one vector."""
            loops = sch.get_loops(block)
            if not loops:
                return
            n = extent(sch, loops[-1])
            if n is None or n <= 1:
                return
            width = largest_divisor(n, lanes) if one_register else n
            if width < n:
                outer, inner = sch.split(loops[-1], factors=[None, width])
                sch.unroll(outer)
                sch.vectorize(inner)
            else:
                sch.vectorize(loops[-1])

        @staticmethod
        def _deinterleave_strided(sch, main) -> set[str]:
            """A stride-s conv reads its (padded) input at ``s*x + rx``: store that pad buffer's
            last axis as ``[w % s, w // s]``, so the read becomes ``[rx % s, x + rx // s]``,
            contiguous along the vectorized ``x`` (otherwise LLVM assembles each vector lane by
            lane). Only pads computed inside this function can change layout."""
            from tvm.sym.pattern import detect_linear_equation
            from tvm.tirx import IndexMap

            stmt = sch.get(main)
            out_last = stmt.writes[0].region[-1].min
            done: set[str] = set()
            if not isinstance(out_last, tirx.Var):
                return done
            for producer in sch.get_producers(main):
                written = sch.get(producer).writes[0].source
                region = next((r for r in stmt.reads if r.source.same_as(written)), None)
                if region is None:
                    continue
                coef = detect_linear_equation(region.region[-1].min, [out_last])
                stride = int(coef[0]) if len(coef) == 2 and isinstance(coef[0], tirx.IntImm) else 1
                width = region.source.shape[-1] if hasattr(region.source, "shape") else None
                ndim = len(region.region)
                if stride <= 1 or not isinstance(width, tirx.IntImm) or int(width) % stride:
                    continue
                index_map = IndexMap.from_func(
                    lambda *i: [*i[:-1], i[-1] % stride, i[-1] // stride], ndim=ndim)
                sch.transform_layout(producer, ("write", 0), index_map)
                iters = len(sch.get(producer).iter_vars)  # write it in that order too
                sch.transform_block_layout(producer, IndexMap.from_func(
                    lambda *i: [*i[:-1], i[-1] % stride, i[-1] // stride], ndim=iters))
                done.add(sch.get(producer).name_hint)
            return done

        @staticmethod
        def _gather_epilogue(sch, main):
            """Inline the elementwise blocks after ``main`` (a chain, or a DAG such as GELU's
            x * (1 + erf(x))) into the last one; returns it, None if there is none, False if
            they do not reduce to one block."""
            after, seen = [], False
            for info in normalize_prim_func(sch) or []:
                if seen:
                    after.append(info.block_rv)
                seen = seen or sch.get(info.block_rv).same_as(sch.get(main))
            if not after:
                return None
            for block in after[:-1]:
                try:
                    sch.compute_inline(block)
                except Exception:  # noqa: BLE001
                    return False
            return after[-1]

    class Int8Dot(CPUScheduleRule):
        """An int8 matmul (``--int8-arith``: ``C[.., i, j] += int32(A[.., i, k]) * int32(B[.., k, j])``)
        on the target's dot-product instruction (:func:`int8_dot`: x86 VNNI, AArch64 SDOT),
        with its elementwise epilogue (zero-point terms, scales, bias, activation, requantize).

        Each instruction adds 4 products into each int32 lane, so the second operand is read as
        ``[N/lanes, K/4, lanes, 4]``: each parallel task packs its panel of B into that order
        (one shuffle per 4 x lanes block, computed once per panel) and then runs every row tile
        against it. The register tile is ``rows x vectors`` int32 accumulators as in
        :class:`Contraction`; the epilogue runs on each finished tile. N not a multiple of the
        lanes takes the instruction's narrower form where there is one (VNNI: 8 lanes with
        AVX-512 VL). Kernels whose shapes do not fit (N not a multiple of the lanes, K not of 4,
        A not the instruction's dtype, B not [.., K, N]) are left to the next rule."""

        def apply(self, func, target, _tunable):
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            dot = int8_dot(target)
            if dot is None:
                return None
            intrin, lanes, a_dtype = dot
            found = sum_of_products(func)
            if found is None or str(found[3].writes[0].source.dtype) != "int32":
                return None
            sch, infos, main, stmt = found
            iters = list(stmt.iter_vars)  # (normalized: no unit iterators, so one row has no i)
            if len(iters) < 2 or any(iv.iter_type != tirx.IterVar.DataPar for iv in iters[:-1]) \
                    or iters[-1].iter_type != tirx.IterVar.CommReduce:
                return None
            j_var, k_var = iters[-2].var, iters[-1].var
            out = stmt.writes[0].source
            reads = [r for r in stmt.reads if not r.source.same_as(out)]

            def uses(region, var) -> bool:
                return any(var in body_vars(rg.min) for rg in region.region)

            a = [r for r in reads if uses(r, k_var) and not uses(r, j_var)]
            b = [r for r in reads if uses(r, j_var) and uses(r, k_var)]
            if len(a) != 1 or len(b) != 1 or len(reads) != 2:
                return None
            a, b = a[0], b[0]
            # the rows: the spatial axis before j that A walks and B does not (none: one row)
            has_i = len(iters) >= 3 and uses(a, iters[-3].var) and not uses(b, iters[-3].var)
            if str(a.source.dtype) != a_dtype or str(b.source.dtype) != "int8":
                return None
            if not a.region[-1].min.same_as(k_var) or not stmt.writes[0].region[-1].min.same_as(j_var):
                return None  # A's rows must be contiguous along k (the 4 bytes each instruction broadcasts)
            j_pos = next(p for p, rg in enumerate(b.region) if j_var in body_vars(rg.min))
            k_pos = next(p for p, rg in enumerate(b.region) if k_var in body_vars(rg.min))
            if not b.region[j_pos].min.same_as(j_var) or not b.region[k_pos].min.same_as(k_var) \
                    or (k_pos, j_pos) != (len(b.region) - 2, len(b.region) - 1):
                return None  # B must be [.., K, N] (edgecomp stores Gemm weights so: gemm_weights_kn)
            dims = [int(iv.dom.extent) if isinstance(iv.dom.extent, tirx.IntImm) else None for iv in iters]
            if None not in dims and dims[-2] % lanes and intrin in _DOT_NARROW \
                    and _has_feature(target, _DOT_NARROW[intrin][1]):
                intrin = _DOT_NARROW[intrin][0]
                lanes = _DOT_LLVM[intrin][0]
            if None in dims or dims[-2] % lanes or dims[-1] % 4:
                return None
            m, n = (dims[-3] if has_i else 1), dims[-2]
            dot_intrin, pack = _dot_intrinsics(intrin)

            inline_side_inputs(sch, infos, main)
            epilogue = Contraction._gather_epilogue(sch, main)
            if epilogue is False:
                return None

            loops = sch.get_loops(main)
            if len(loops) != len(iters):
                return None
            _, vectors, rows, _ = tile_shape(n, m, 1, lanes, accumulators(target))
            *batch, j_loop, k_loop = loops
            j_o, j_t, j_l = sch.split(j_loop, factors=[None, vectors, lanes])
            k_o, k_4 = sch.split(k_loop, factors=[None, 4])
            if has_i:
                i_o, i_i = sch.split(batch.pop(), factors=[None, rows])
                sch.reorder(*batch, j_o, i_o, k_o, i_i, j_t, j_l, k_4)
            else:
                i_o = i_i = None
                sch.reorder(*batch, j_o, k_o, j_t, j_l, k_4)
            tile = i_o if has_i else j_o  # the loop whose body computes one register tile

            b_index = next(p for p, r in enumerate(stmt.reads) if r.source.same_as(b.source))
            packed = sch.cache_read(main, b_index, "global")

            def pack_order(*axes):
                rest = [x for p, x in enumerate(axes) if p not in (j_pos, k_pos)]
                return [*rest, axes[j_pos] // lanes, axes[k_pos] // 4, axes[j_pos] % lanes, axes[k_pos] % 4]

            sch.transform_layout(packed, ("write", 0), IndexMap.from_func(pack_order, ndim=len(b.region)))
            sch.compute_at(packed, j_o, preserve_unit_loops=True)
            p_k, p_j = sch.get_loops(packed)[-2:]  # B's last two axes
            pk_o, pk_4 = sch.split(p_k, factors=[None, 4])
            pj_o, pj_l = sch.split(p_j, factors=[None, lanes])
            sch.reorder(pk_o, pj_o, pj_l, pk_4)

            acc = sch.cache_write(main, 0, "local")
            sch.reverse_compute_at(acc, tile, preserve_unit_loops=True)
            if epilogue is not None:
                try:
                    sch.reverse_compute_inline(epilogue)
                except Exception:  # noqa: BLE001  (a broadcast epilogue: run it per tile instead)
                    sch.reverse_compute_at(epilogue, tile, preserve_unit_loops=True)
                    Contraction._vectorize_tail(sch, epilogue, lanes, one_register=True)
            # per register, as Contraction's int32 write-back (MobileNetV2's 112x112 1x1 convs:
            # 32->16 channels 0.14 -> 0.08 ms with vectorized rounding, see lowering.prepare_module)
            Contraction._vectorize_tail(sch, acc, lanes, one_register=True)
            sch.parallel(sch.fuse(*batch, j_o) if batch else j_o)  # (before tensorize: it needs plain blocks)
            init = sch.decompose_reduction(main, k_o)
            Contraction._vectorize_tail(sch, init, lanes)
            sch.tensorize(j_l, dot_intrin)
            sch.tensorize(pj_l, pack)
            if i_i is not None:
                sch.unroll(i_i)
            sch.unroll(j_t)
            return sch

    class RowReduction(CPUScheduleRule):
        """Row-wise reductions with their elementwise neighbours (softmax, layer norm): every
        block spans the same leading row axes plus, at most, one trailing column axis (reduced or
        not). The rows run in parallel, each computed whole (its blocks one after another, a row in
        cache); each reduction is split by the vector width and ``rfactor``-ed into vector partial
        sums, the elementwise blocks vectorized. dlight's CPU ``Reduction`` leaves each row sum a
        serial chain of dependent adds (MiniLM's softmax: 0.43 ms against 0.35 unscheduled)."""

        def apply(self, func, target, _tunable):
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos or not any(b.is_reduction() for b in infos) or infos[-1].is_reduction():
                return None
            names = [sch.get(b.block_rv).name_hint for b in infos]
            shapes = []
            for b in infos:
                dom = [(iv.iter_type, iv.dom.extent) for iv in sch.get(b.block_rv).iter_vars]
                if any(not isinstance(e, tirx.IntImm) for _, e in dom):
                    return None
                shapes.append([(t, int(e)) for t, e in dom])
            last = shapes[-1]
            if len(last) < 2 or any(t != tirx.IterVar.DataPar for t, _ in last):
                return None
            rows, cols = [e for _, e in last[:-1]], last[-1][1]
            for shape, info in zip(shapes, infos):
                extents = [e for _, e in shape]
                if extents == rows:  # a per-row scalar (a mean)
                    continue
                if extents != rows + [cols] or any(t != tirx.IterVar.DataPar for t, _ in shape[:-1]):
                    return None
                if info.is_reduction() != (shape[-1][0] == tirx.IterVar.CommReduce):
                    return None
            lanes = vector_lanes(target, _bits(sch.get(infos[-1].block_rv).writes[0].source.dtype))
            if cols % lanes:
                return None
            rfactored = []
            for name, shape in zip(names, shapes):
                if shape[-1][0] != tirx.IterVar.CommReduce:
                    continue
                block = sch.get_sblock(name)
                _, inner = sch.split(sch.get_loops(block)[-1], factors=[None, lanes])
                rfactored.append((name, sch.rfactor(inner, factor_axis=len(rows))))
            out = sch.get_sblock(names[-1])
            loops = sch.get_loops(out)
            row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            partial_sums = dict(rfactored)
            for name in reversed(names[:-1]):  # consumers first; a partial-sum block before its sum
                sch.compute_at(sch.get_sblock(name), row, preserve_unit_loops=True)
                if name in partial_sums:
                    sch.compute_at(partial_sums[name], row, preserve_unit_loops=True)
            sch.parallel(row)
            vectors = []
            for name, shape in zip(names, shapes):
                if shape[-1][0] == tirx.IterVar.DataPar and [e for _, e in shape] != rows:
                    block = sch.get_sblock(name)
                    vectors.append(sch.split(sch.get_loops(block)[-1], factors=[None, lanes])[1])
            for loop in vectors:
                sch.vectorize(loop)
            for _, rf in rfactored:  # vector partial sums: vectorize, then split off their init
                a, b = sch.get_loops(rf)[-2:]  # the partial-sum axis and the reduced one, in either order
                try:
                    sch.vectorize(b)
                    r_o = a
                except Exception:  # noqa: BLE001  (b is the reduced one: swap them)
                    sch.reorder(b, a)
                    sch.vectorize(a)
                    r_o = b
                init = sch.decompose_reduction(rf, r_o)
                sch.vectorize(sch.get_loops(init)[-1])
            return sch

    return Contraction, Injective, RowReduction, Int8Dot


def _guarded(rule):
    """``rule`` whose failures leave the function to the next rule (or unscheduled), logged:
    a kernel this rule cannot schedule must not fail a build."""
    inner = rule.apply

    def apply(func, target, tunable):
        try:
            return inner(func, target, tunable)
        except Exception as err:  # noqa: BLE001
            name = func.attrs.get("global_symbol", "?") if getattr(func, "attrs", None) else "?"
            msg = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
            log.info("default schedule %s did not apply to %s: %s", type(rule).__name__, name, msg)
            return None

    rule.apply = apply
    return rule


def default_rules() -> list:
    """The CPU rules, most specific first (edgecomp's, then dlight's)."""
    from tvm.s_tir import dlight

    contraction, injective, row_reduction, int8_dot_rule = _rules()
    return [_guarded(r) for r in (int8_dot_rule(), contraction(), row_reduction(), dlight.cpu.GEMV(), dlight.cpu.Reduction(),
                                  injective())]


def schedule_report(mod: Any, target: Any) -> dict[str, str]:
    """Which rule schedules each fused kernel of ``mod`` (a Relax module before legalization):
    ``{kernel name: rule class name or "none"}``. For tests and for reading, not for building."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    with target:
        fused = tvm.transform.Sequential(cpu.legalize_passes(target))(mod)
    rules = default_rules()
    out = {}
    for gv, func in fused.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            rule, _ = default_schedule(func, target, rules)
            out[gv.name_hint] = type(rule).__name__ if rule is not None else "none"
    return out


def default_schedule(func: Any, target: Any, rules: list | None = None) -> tuple[Any, Any]:
    """``(rule, schedule)`` of the first of ``rules`` (default: :func:`default_rules`) that
    schedules the PrimFunc ``func``; ``(None, None)`` if none does."""
    for rule in rules if rules is not None else default_rules():
        sch = rule.apply(func, target, False)
        if sch is not None:
            return rule, sch[0] if isinstance(sch, list) else sch
    return None, None


def apply_default_schedules():
    """The module pass: ``dlight.ApplyDefaultSchedule`` with :func:`default_rules`."""
    from tvm.s_tir import dlight

    return dlight.ApplyDefaultSchedule(*default_rules())


def __getattr__(name: str):  # Contraction / Injective / RowReduction for readers and tests, built on first use
    if name in ("Contraction", "Injective", "RowReduction", "Int8Dot"):
        contraction, injective, row_reduction, int8_dot_rule = _rules()
        return {"Contraction": contraction, "Injective": injective, "RowReduction": row_reduction, "Int8Dot": int8_dot_rule}[name]
    raise AttributeError(name)
