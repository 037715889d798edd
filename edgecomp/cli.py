"""The ``edgecomp`` command (thin: parsing and printing; the work is in ``edgecomp.api``).

Exit codes: 0 success, 1 numerics past tolerance, 2 bad input / unsupported model / bad bundle,
3 internal error (a bug: rerun with ``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"edgecomp: error: {message} (see 'edgecomp --help')", file=sys.stderr)
        raise SystemExit(2)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON result on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")


def _shapes(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME=D1,D2,...",
        default=[],
        help="static shape of a (dynamic) input, e.g. input=1,3,224,224; repeat per input",
    )


def _model_options(b: argparse.ArgumentParser, for_tune: bool = False) -> None:
    """The options of ``build`` (model, target, passes, compression); ``tune`` takes the same ones
    that decide which graph is compiled, so that it tunes exactly what ``build`` compiles."""
    from edgecomp.passes import DEFAULT_PASSES, PASSES

    b.add_argument("model", nargs="?", help="ONNX model file")
    b.add_argument("--example", help="build a shipped example instead of a file (digits)")
    b.add_argument("-t", "--target", default="host", help="target name (see 'edgecomp targets'); default host")
    b.add_argument("--target-file", metavar="TOML", help="a user target: TVM target dict, arch, cross compiler, RPC key "
                   "([target] table; README 'Targets')")
    b.add_argument("--arch", help="GPU architecture for targets that take one (cuda: sm_XX, default sm_80)")
    if not for_tune:
        b.add_argument("-o", "--output", help="bundle directory or .tar (default: <model>-<target>)")
    _shapes(b)
    b.add_argument(
        "--passes",
        help=f"comma-separated passes ({', '.join(PASSES)}) or 'none'; default {','.join(DEFAULT_PASSES)}",
    )
    b.add_argument("--reference-inputs", metavar="NPZ", help="real inputs to check numerics on (default: random)")
    b.add_argument("--samples", type=int, default=8, help="reference samples to check each stage on (default 8)")
    b.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance vs ONNX Runtime (default 1e-4)")
    b.add_argument("--rtol", type=float, default=1e-5, help="tolerance relative to max|output| (default 1e-5)")
    b.add_argument("--min-cosine", type=float, default=0.9999, help="minimum cosine per sample (default 0.9999)")
    b.add_argument("--min-top1", type=float, default=1.0, help="minimum top-1 agreement for classifiers (default 1.0)")
    lr = b.add_argument_group("low-rank factorization")
    lr.add_argument(
        "--lowrank",
        metavar="POLICY",
        help="erank[:SCALE] | energy:F | l1:F | ratio:F | rank:R | ranks:NODE=R,... | "
        "budget:params=NX | budget:flops=NX | budget:cosine=C | budget:top1=A",
    )
    lr.add_argument("--lowrank-layers", default="gemm,conv", help="layer kinds: gemm,conv,tt,embedding (default gemm,conv)")
    lr.add_argument("--conv-method", default="tucker2", choices=["tucker2", "cp", "spatial"], help="Conv decomposition")
    lr.add_argument("--no-data-aware", action="store_true", help="plain SVD even when calibration data is given")
    lr.add_argument("--max-layer-error", type=float, default=1.0, help="leave a layer dense above this relative error")
    q = b.add_argument_group("int8 quantization")
    q.add_argument(
        "--int8",
        metavar="METHOD",
        help="post-training int8 (QDQ, per-channel weights): minmax | entropy | percentile[=P], "
        "optionally :budget:top1=A or :budget:cosine=C to leave the most sensitive layers in float",
    )
    q.add_argument("--int8-arith", action="store_true",
                   help="compile int8 layers as 8-bit×8-bit→int32 arithmetic instead of dequantize→fp32, on "
                   "VNNI/SDOT where the CPU has it (README 'Int8Dot'; ties the code to the weights)")
    q.add_argument("--int8-keep-float", metavar="NODE,...", default="", help="nodes never quantized")
    q.add_argument("--int8-ops", default="Conv,MatMul,Gemm", help="ops to quantize (default Conv,MatMul,Gemm; add Gather for embeddings)")
    q.add_argument("--int8-activations", choices=["int8", "uint8", "none"], default="int8",
                   help="activation type (default int8); none: weight-only int8 (float activations, no calibration)")
    q.add_argument("--int8-weights", metavar="ROUNDING", default="rtn",
                   help="weight rounding: rtn (round to nearest, default) | gptq (data-aware, minimises each layer's "
                   "output error on --calib); optional :bits=B and :@NODE=B (grid of 2..8 bits, weight-only)")
    pr = b.add_argument_group("pruning")
    pr.add_argument(
        "--prune",
        metavar="SPEC",
        help="METHOD:TARGET[,OPTION...]: magnitude:F (zero the fraction F of each layer's smallest weights) | "
        "magnitude:global:F (one threshold over all layers) | nm[:N:M] (keep N of every M along the input axis, "
        "default 2:4) | channel:F (remove the fraction F of Conv/Gemm output channels and the matching consumer "
        "inputs) | METHOD:budget:cosine=C|top1=A|params=NX (per-layer sparsity by measured sensitivity on "
        "--calib); options: skip=NODE (repeatable), min=N (smallest weight pruned), layers=gemm+matmul+conv, "
        "norm=l1|l2 (channel ranking), @NODE=F (one node's sparsity). E.g. magnitude:0.7,min=1024",
    )
    if not for_tune:
        b.add_argument(
            "--entropy",
            choices=["zstd", "ans"],
            help="entropy-code the bundle's weights file: zstd (level, byte shuffle and dictionary chosen by "
            "measurement) or ans (rANS, per-tensor histograms; needs constriction); also 'zstd' last in --passes",
        )
        fw = b.add_argument_group("firmware")
        fw.add_argument("--emit", metavar="WHAT", default=None,
                        help="extra outputs: firmware (static library of the model, C header, CMake package, Makefile "
                        "fragment, weights blob and the TVM runtime libraries in <bundle>/firmware; built and run with "
                        "the C example when the target's code runs here, natively or under qemu-user)")
        fw.add_argument("--firmware-name", metavar="NAME",
                        help="C name of the model in the firmware API (default: from the model file, e.g. digits_cnn)")
    b.add_argument("--calib", metavar="NPZ", help="calibration inputs for data-aware passes (default: example's calib split)")
    b.add_argument("--accuracy-cosine", type=float, default=0.98, help="lossy passes: min cosine vs the original (default 0.98)")
    b.add_argument("--accuracy-top1", type=float, default=0.0, help="lossy passes: min top-1 agreement vs the original (default 0)")
    if not for_tune:
        b.add_argument("--config", metavar="TOML", help="read build options from a TOML file ([build] table; flags override)")
        b.add_argument("-f", "--force", action="store_true", help="replace an existing output")
    _common(b)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgecomp", description="Compile ONNX models into verified edge-device bundles (TVM).")
    parser.add_argument("--version", action="version", version=f"edgecomp {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="compile a model into a verified bundle")
    _model_options(b)
    b.add_argument("--db", metavar="DIR", help="compile with the schedules of a tuning database (edgecomp tune): no tuning runs")

    tu = sub.add_parser("tune", help="MetaSchedule auto-tuning of the model's kernels into a database (build --db)")
    _model_options(tu, for_tune=True)
    tu.add_argument("--trials", type=int, default=64, help="trials the database should hold in all (default 64; "
                    "a rerun after an interruption continues from the records there)")
    tu.add_argument("--db", metavar="DIR", default="tuning-db", help="database folder (default tuning-db; one subfolder per target)")
    tu.add_argument("--trials-per-task", type=int, metavar="N", help="cap per kernel (default: the scheduler decides)")
    tu.add_argument("--tracker", metavar="HOST:PORT", help="time candidates on devices behind a TVM RPC tracker")
    tu.add_argument("--rpc-key", metavar="KEY", help="the devices' key at the tracker")

    i = sub.add_parser("inspect", help="inputs/outputs, op histogram, parameters, FLOPs per layer")
    i.add_argument("model", nargs="?", help="ONNX model file")
    i.add_argument("--example", help="inspect a shipped example instead of a file")
    _shapes(i)
    _common(i)

    r = sub.add_parser("run", help="run a bundle on this machine")
    r.add_argument("bundle", help="bundle directory or .tar")
    r.add_argument("--input", help=".npz with one array per input name (default: the bundle's reference inputs)")
    r.add_argument("--output", help="write the outputs to this .npz")
    _common(r)

    c = sub.add_parser("check", help="run a bundle on a device: accuracy vs ONNX Runtime, latency, regressions")
    c.add_argument("bundle", help="bundle directory or .tar")
    c.add_argument("-d", "--device", default="local",
                   help="local | emu-arm64[:CPU] | rpc://HOST:PORT | tracker://HOST:PORT/KEY (default local)")
    c.add_argument("--inputs", metavar="NPZ", help="inputs to check on, optionally with expected outputs (default: the bundle's reference)")
    c.add_argument("--baseline", metavar="FILE", help="fail (exit 1) on a regression vs this baseline")
    c.add_argument("--save-baseline", metavar="FILE", help="write this run's numbers as a baseline (when every check passes)")
    c.add_argument("--junit", metavar="XML", help="write JUnit XML, one testcase per check")
    c.add_argument("--repeats", type=int, default=30, help="timed repeats (default 30)")
    c.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    c.add_argument("--number", type=int, help="runs averaged per repeat (default: enough for ~5 ms)")
    c.add_argument("--atol", type=float, help="absolute tolerance vs ONNX Runtime (default: the bundle's)")
    c.add_argument("--rtol", type=float, help="tolerance relative to max|output| (default: the bundle's)")
    c.add_argument("--min-cosine", type=float, help="minimum cosine per sample (default: the bundle's)")
    c.add_argument("--min-top1", type=float, help="minimum top-1 agreement (default: the bundle's)")
    c.add_argument("--max-latency-ratio", type=float, default=1.5, help="latency regression: median vs baseline (default 1.5)")
    c.add_argument("--max-cosine-drop", type=float, default=1e-4, help="accuracy regression: min cosine drop vs baseline (default 1e-4)")
    c.add_argument("--max-top1-drop", type=float, default=0.0, help="accuracy regression: top-1 agreement drop vs baseline (default 0)")
    c.add_argument("--max-latency-ms", type=float, help="fail when the median latency is above this (real devices only)")
    c.add_argument("--connect-timeout", type=float, help="seconds to reach the device (default 20)")
    c.add_argument("--timeout", type=float, help="seconds the whole device session may take (default 600)")
    _common(c)

    ft = sub.add_parser("finetune", help="recover accuracy of a compressed model by distillation from the original "
                        "(no labels; needs torch: pip install -e '.[train]')")
    ft.add_argument("model", help="the compressed ONNX model to train (float: low rank, pruned, ...)")
    ft.add_argument("--teacher", required=True, metavar="ONNX", help="the original model (same inputs and outputs)")
    ft.add_argument("--data", required=True, metavar="NPZ", help="unlabelled inputs, one array per input name (a stack of samples)")
    ft.add_argument("-o", "--output", required=True, help="the trained ONNX model (never one of the inputs)")
    ft.add_argument("--epochs", type=int, default=5, help="passes over the data (default 5)")
    ft.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    ft.add_argument("--batch-size", type=int, default=32, help="samples per step (default 32)")
    ft.add_argument("--seed", type=int, default=0, help="shuffling and initialisation seed (default 0)")
    ft.add_argument("--loss", choices=["auto", "mse", "kl"], default="auto",
                    help="auto (default): kl with --temperature on logits, mse on other outputs (embeddings); "
                    "or mse / kl everywhere it applies")
    ft.add_argument("--temperature", type=float, default=4.0, help="softmax temperature of --loss kl (default 4)")
    ft.add_argument("--eval", metavar="NPZ", help="held-out inputs (optional 'label' array): metric after every epoch")
    ft.add_argument("--log", metavar="JSONL", help="append one JSON object per epoch to this file")
    ft.add_argument("--train", choices=["all", "changed"], default="all",
                    help="weights to train: all (default) or changed (only those that differ from the teacher's: "
                    "low-rank factors, pruned tensors)")
    ft.add_argument("--threads", type=int, help="torch and ONNX Runtime threads (default: torch's)")
    _common(ft)

    t = sub.add_parser("targets", help="list registered targets and their TVM target dicts")
    t.add_argument("--target-file", metavar="TOML", help="check a target file and list it too")
    _common(t)
    parser.build_parser = b  # type: ignore[attr-defined]  (config files set its defaults)
    return parser


def _version() -> str:
    from edgecomp import __version__

    return __version__


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _model_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``edgecomp.build``/``tune`` that the shared options give."""
    import math

    from edgecomp.importer import parse_input_shapes
    from edgecomp.numerics import Tolerance
    from edgecomp.passes.lowrank import LowRankConfig
    from edgecomp.passes.rank_selection import parse_policy

    lowrank = None
    if args.lowrank:
        lowrank = LowRankConfig(
            policy=parse_policy(args.lowrank),
            layers=tuple(k.strip() for k in args.lowrank_layers.split(",") if k.strip()),
            conv_method=args.conv_method,
            data_aware=not args.no_data_aware,
            max_layer_error=args.max_layer_error,
        )
    return dict(
        target=args.target,
        target_file=args.target_file,
        arch=args.arch,
        example=args.example,
        input_shapes=parse_input_shapes(args.input_shape),
        passes=args.passes,
        reference_inputs=args.reference_inputs,
        num_samples=args.samples,
        tolerance=Tolerance(atol=args.atol, rtol=args.rtol, min_cosine=args.min_cosine, min_top1=args.min_top1),
        lowrank=lowrank,
        int8=_int8_config(args),
        prune=args.prune,
        int8_arith=args.int8_arith,
        calib=args.calib,
        accuracy=Tolerance(atol=math.inf, rtol=0.0, min_cosine=args.accuracy_cosine, min_top1=args.accuracy_top1),
    )


def _cmd_tune(args: argparse.Namespace, progress) -> int:
    from edgecomp.api import tune

    report = tune(
        args.model, db=args.db, trials=args.trials, trials_per_task=args.trials_per_task, tracker=args.tracker,
        rpc_key=args.rpc_key, progress=progress, **_model_kwargs(args),
    )
    if args.json:
        _print_json(report.to_json())
        return 0
    total = report.trials_before + report.trials_run
    print(f"tuning database: {report.db} ({report.target}): {total} records, {report.tasks} kernel(s)")
    if report.trials_run:
        print(f"  this run: {report.trials_run} trials in {report.seconds:.0f} s ({report.runner}); "
              f"before: {report.trials_before}")
    else:
        print(f"  nothing to do: it already held {report.trials_before} (asked for {report.trials_requested})")
    print(f"  build with it: edgecomp build ... --target {report.target} --db {Path(report.db).parent}")
    return 0


def _cmd_build(args: argparse.Namespace, progress) -> int:
    from edgecomp.api import build

    result = build(
        args.model,
        output=args.output,
        entropy=args.entropy,
        emit=args.emit,
        firmware_name=args.firmware_name,
        db=args.db,
        force=args.force,
        progress=progress,
        **_model_kwargs(args),
    )
    if args.json:
        _print_json(result.to_json())
        return 0
    m = result.manifest
    v = m["verification"]
    print(f"bundle: {result.path}  ({m['target']['name']}, {m['target']['arch']} code)")
    fw_files = {rel: info for rel, info in m["files"].items() if rel.startswith("firmware/")}
    for rel, info in m["files"].items():
        if rel not in fw_files:
            print(f"  {rel:<24} {info['bytes']:>10,} B")
    if fw_files:
        print(f"  {'firmware/':<24} {sum(i['bytes'] for i in fw_files.values()):>10,} B in {len(fw_files)} files "
              f"(firmware/include/{m['firmware']['name']}.h, CMake package, runtime)")
    kern = m["target"].get("kernels")
    if kern:
        how = kern["compile"]["what"] if kern["compiled"] else f"not compiled here: {kern['compile'].get('skipped')}"
        print(f"kernels: {kern['kernels']} {kern['language']} kernels in {kern['file']}; {how}")
    if m.get("tuning"):
        print(f"schedules: tuning database {m['tuning']['db']} ({m['tuning']['records']} records)")
    print(f"verified: {v['ran']}")
    for o in v["numerics"]["outputs"]:
        top1 = f", top-1 agreement {o['top1']:.3f}" if o.get("top1") is not None else ""
        print(f"  {o['name']}: max abs error {o['max_abs']:.2e}, min cosine {o['min_cosine']:.6f}{top1}")
    for p in m["passes"]:
        if p["lossy"]:
            (b0, b1), (n0, n1) = p["param_bytes"], p["params"]
            print(
                f"pass {p['name']}: params {n0:,} → {n1:,}, weight bytes {b0:,} → {b1:,} "
                f"({b0 / max(1, b1):.2f}x smaller)"
            )
            if "sparsity" in p["stats"] and "layer_weights" in p["stats"]:
                st = p["stats"]
                print(f"  {st['zeros_after']:,} of {st['layer_weights']:,} layer weights are zero (sparsity {st['sparsity']:.3f})")
    if any(p["lossy"] for p in m["passes"]):
        for o in v["vs_original"]["outputs"]:
            top1 = f", top-1 agreement {o['top1']:.3f}" if o.get("top1") is not None else ""
            print(f"  vs the original model: {o['name']}: min cosine {o['min_cosine']:.6f}{top1}")
    if "evaluation" in v:
        e = v["evaluation"]
        print(
            f"  {e['dataset']}: accuracy {e['compiled_accuracy']:.4f} compiled vs {e['ort_accuracy']:.4f} "
            f"ONNX Runtime ({e['samples']} samples)"
        )
    fwv = (m.get("firmware") or {}).get("verification")
    if fwv:
        if fwv.get("ran"):
            worst = max(o["max_abs"] for how in ("file", "linked") for o in fwv[how]["outputs"])
            n_file, n_linked = fwv["file"]["samples"], fwv["linked"]["samples"]
            print(f"firmware: {fwv['ran']}: weights from the file ({n_file} samples) and linked in ({n_linked}), "
                  f"max abs error {worst:.2e} vs ONNX Runtime")
        else:
            print(f"firmware: not run here: {fwv['skipped']}")
    return 0


def _int8_config(args: argparse.Namespace):
    import dataclasses

    from edgecomp.passes.quantize_int8 import parse_int8, parse_int8_weights

    if not args.int8:
        return None
    keep = tuple(n.strip() for n in args.int8_keep_float.split(",") if n.strip())
    ops = tuple(o.strip() for o in args.int8_ops.split(",") if o.strip())
    return dataclasses.replace(parse_int8(args.int8), keep_float=keep, activations=args.int8_activations, op_types=ops,
                               **parse_int8_weights(args.int8_weights))


def _cmd_inspect(args: argparse.Namespace, progress) -> int:
    from edgecomp.api import inspect_model
    from edgecomp.importer import parse_input_shapes

    with progress.stage("reading model"):
        s = inspect_model(args.model, example=args.example, input_shapes=parse_input_shapes(args.input_shape))
    if args.json:
        _print_json(s.to_json())
        return 0
    print(f"opset {s.opset}, {s.nodes} nodes")
    for kind, specs in (("input", s.inputs), ("output", s.outputs)):
        for spec in specs:
            print(f"{kind:<7} {spec['name']:<20} {spec['dtype']:<8} {spec['shape']}")
    if s.assumed_dims:
        print(f"(FLOPs assume {', '.join(f'{k}={v}' for k, v in s.assumed_dims.items())}; set --input-shape)")
    print(f"parameters: {s.params:,} in {s.initializers} initializers, {s.param_bytes:,} bytes"
          + (f" (+{s.constant_params:,} in Constant nodes)" if s.constant_params else ""))
    print("ops: " + ", ".join(f"{op} {n}" for op, n in s.ops.items()))
    if s.layers:
        print(f"\n{'layer':<28} {'op':<8} {'weight':<18} {'output':<18} {'params':>10} {'MFLOPs':>10}")
        for layer in s.layers:
            fl = f"{layer.flops / 1e6:.3f}" if layer.flops is not None else "?"
            print(f"{layer.node[:28]:<28} {layer.op:<8} {str(layer.weight_shape):<18} {str(layer.output_shape):<18} {layer.params:>10,} {fl:>10}")
        print(f"{'total':<28} {'':<8} {'':<18} {'':<18} {sum(l.params for l in s.layers):>10,} {2 * s.total_macs / 1e6:>10.3f}")
    return 0


def _cmd_run(args: argparse.Namespace, progress) -> int:
    import numpy as np

    from edgecomp.api import run_bundle

    with progress.stage(f"running {args.bundle}"):
        outputs = run_bundle(args.bundle, args.input)
    if args.output:
        tmp = f"{args.output}.tmp-{os.getpid()}.npz"
        try:
            np.savez(tmp, **outputs)
            os.replace(tmp, args.output)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if args.json:
        _print_json({k: {"shape": list(v.shape), "dtype": v.dtype.name, "values": v.tolist()} for k, v in outputs.items()})
        return 0
    for k, v in outputs.items():
        summary = np.array2string(v.reshape(-1)[:10], precision=4, separator=", ")
        print(f"{k}: shape {list(v.shape)} {v.dtype}, first values {summary}")
    if args.output:
        print(f"outputs written to {args.output}")
    return 0


def _cmd_check(args: argparse.Namespace, progress) -> int:
    import signal
    import threading

    def _terminated(signum, frame):  # CI cancels with SIGTERM: stop the device like on Ctrl-C
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        return _check(args, progress)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _check(args: argparse.Namespace, progress) -> int:
    from edgecomp.api import check
    from edgecomp.checks import Thresholds, bundle_tolerance, write_junit
    from edgecomp.errors import EdgecompError
    from edgecomp.numerics import Tolerance

    tolerance = None
    if any(v is not None for v in (args.atol, args.rtol, args.min_cosine, args.min_top1)):
        from edgecomp.bundle import load_bundle

        b = load_bundle(args.bundle)
        try:
            base = bundle_tolerance(b.manifest)
        finally:
            b.close()
        tolerance = Tolerance(
            atol=base.atol if args.atol is None else args.atol,
            rtol=base.rtol if args.rtol is None else args.rtol,
            min_cosine=base.min_cosine if args.min_cosine is None else args.min_cosine,
            min_top1=base.min_top1 if args.min_top1 is None else args.min_top1,
        )
    try:
        report = check(
            args.bundle, args.device, inputs=args.inputs, baseline=args.baseline, save_baseline=args.save_baseline,
            repeats=args.repeats, warmup=args.warmup, number=args.number, tolerance=tolerance,
            thresholds=Thresholds(args.max_latency_ratio, args.max_cosine_drop, args.max_top1_drop),
            max_latency_ms=args.max_latency_ms, connect_timeout=args.connect_timeout, timeout=args.timeout,
            progress=progress,
        )
    except EdgecompError as err:
        if args.junit:  # CI still gets a test report: one errored testcase
            write_junit(None, args.junit, error=str(err), device=args.device, bundle=args.bundle)
        raise
    if args.junit:
        write_junit(report, args.junit)
    if args.json:
        _print_json(report.to_json())
    else:
        print(report.table())
        if args.junit:
            print(f"JUnit XML written to {args.junit}")
    return report.exit_code


def _cmd_targets(args: argparse.Namespace, progress) -> int:
    from edgecomp.targets import list_targets, resolve_target

    targets = list_targets() + ([resolve_target(target_file=args.target_file)] if args.target_file else [])
    rows = [
        {
            "name": t.name,
            "arch": t.arch,
            "device": t.device,
            "family": t.family,
            "tvm_target": t.target_dict(),
            "cross_compiler": t.cross_compiler,
            "runs_here": t.runs_on_this_machine,
            "description": t.description,
            "target_file": t.source,
        }
        for t in targets
    ]
    if args.json:
        _print_json(rows)
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}} {r['arch']:<7} {r['device']:<6} {json.dumps(r['tvm_target'])}")
        extra = f"; linked with {r['cross_compiler']}" if r["cross_compiler"] else ""
        source = f" (from {r['target_file']})" if r["target_file"] else ""
        print(f"{'':<{width}} {r['description']}{extra}{source}")
    return 0


def _cmd_finetune(args: argparse.Namespace, progress) -> int:
    from edgecomp.errors import InputError
    from edgecomp.train.common import require_torch

    for path, what in ((args.model, "model"), (args.teacher, "teacher model"), (args.data, "data"), (args.eval, "eval data")):
        if path is not None and not os.path.isfile(path):
            raise InputError(f"{what} file not found: {path}")
    require_torch()
    from edgecomp.train.distill import check_output, finetune

    check_output(args.output, [args.model, args.teacher, args.data, args.eval])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with progress.stage(f"distilling {Path(args.model).name} from {Path(args.teacher).name} ({args.epochs} epochs)"):
        result = finetune(
            args.model, args.teacher, args.data, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
            seed=args.seed, eval_data=args.eval, log=args.log, output=args.output, loss=args.loss,
            temperature=args.temperature, threads=args.threads, train=args.train, quiet=args.quiet,
        )
    if args.json:
        _print_json(result.to_json())
        return 0
    s = result.settings
    print(f"trained: {result.output}  ({s['samples']} samples, {len(result.epochs)} epochs, {result.seconds:.1f} s)")
    print(f"  distillation loss ({', '.join(f'{k} {n}' for n, k in result.losses.items())}) on the data: {result.train_loss_before:.6g} → {result.train_loss_after:.6g}")
    for key in result.after:
        print(f"  eval {key}: {result.before[key]:.4f} → {result.after[key]:.4f} (ONNX Runtime, {s['eval_samples']} samples)")
    if result.pruned_weights:
        print(f"  {result.pruned_weights} pruned weight(s) kept their zeros")
    return 0


_COMMANDS = {"build": _cmd_build, "tune": _cmd_tune, "inspect": _cmd_inspect, "run": _cmd_run, "check": _cmd_check,
             "targets": _cmd_targets, "finetune": _cmd_finetune}


def _apply_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv; with ``build --config FILE``, the file's [build] table gives the defaults."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        import tomllib

        from edgecomp.errors import InputError

        try:
            with open(args.config, "rb") as f:
                table = tomllib.load(f).get("build", {})
        except FileNotFoundError:
            raise InputError(f"config file not found: {args.config}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"config file {args.config} is not valid TOML: {err}") from None
        known = vars(args)
        defaults = {}
        for key, value in table.items():
            dest = key.replace("-", "_")
            if dest not in known or dest in ("command", "config"):
                raise InputError(f"config file {args.config}: unknown build option {key!r}")
            if dest == "input_shape" and isinstance(value, dict):
                value = [f"{k}={','.join(str(d) for d in v)}" for k, v in value.items()]
            defaults[dest] = value
        parser.build_parser.set_defaults(**defaults)  # type: ignore[attr-defined]
        args = parser.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from edgecomp.errors import EdgecompError

    try:
        args = _apply_config(_parser(), argv)
    except EdgecompError as err:  # a bad config file, before anything runs
        print(f"edgecomp: error: {err}", file=sys.stderr)
        return err.exit_code
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="edgecomp: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    from edgecomp.progress import Progress

    progress = Progress(enabled=not args.quiet)
    try:
        return _COMMANDS[args.command](args, progress)
    except EdgecompError as err:
        print(f"edgecomp: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("edgecomp: interrupted; nothing was left behind", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edgecomp inspect ... | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (stop the interpreter's flush at exit)
        return 0
    except Exception as err:  # a bug: one line unless --debug
        if args.debug:
            raise
        first = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"edgecomp: internal error: {type(err).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 3
