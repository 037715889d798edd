"""The public calls: ``build``, ``inspect_model``, ``run_bundle``.

``build`` is the main job: import → passes (each checked against ONNX Runtime) → Relax →
compiled code for the target → verified bundle. Loading, saving and progress live here; the
passes and targets it calls do no I/O.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgecomp import bundle as bundle_fmt
from edgecomp.errors import InputError, NumericsError, UnsupportedModelError
from edgecomp.examples import Example, get_example
from edgecomp.importer import TensorSpec, fix_input_shapes, graph_inputs, graph_outputs, load_onnx, sha256_file
from edgecomp.numerics import DEFAULT_ACCURACY, Comparison, Samples, Tolerance, compare, run_ort
from edgecomp.passes import PassContext, is_lossy, make_passes
from edgecomp.passes.lowrank import LowRankConfig
from edgecomp.passes.entropy_code import CODECS as ENTROPY_CODECS
from edgecomp.passes.entropy_code import decode as decode_weights
from edgecomp.passes.entropy_code import encode as encode_weights
from edgecomp.passes.prune import PruneConfig, parse_prune
from edgecomp.passes.quantize_int8 import QuantizeConfig, parse_int8
from edgecomp.passes.rank_selection import RankPolicy, parse_policy
from edgecomp.pipeline import run_pipeline
from edgecomp.progress import Progress
from edgecomp.reference import load_npz, load_samples_npz, random_samples, samples_from_arrays, stack_samples
from edgecomp.figures import bundle_html
from edgecomp.report import render_report
from edgecomp.summary import ModelSummary, summarize
from edgecomp.targets import Target, get_target, resolve_target
from edgecomp.targets.kernels import emit_kernels
from edgecomp.versions import package_versions
from edgecomp.targets.lowering import compile_relax, elf_arch, export_library, to_relax, wants_channels_last

__all__ = ["BuildResult", "build", "tune", "inspect_model", "run_bundle", "check", "tool_versions"]

log = logging.getLogger(__name__)

_TOOLS = ("edgecomp", "apache-tvm", "apache-tvm-ffi", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy")


def tool_versions(target: Target | None = None) -> dict[str, str]:
    versions = {"python": platform.python_version(), **package_versions(_TOOLS)}
    if target is not None and target.cross_compiler:
        try:
            out = subprocess.run([target.cross_compiler, "--version"], capture_output=True, text=True, timeout=30)
            versions[target.cross_compiler] = out.stdout.splitlines()[0] if out.stdout else "unknown"
        except (OSError, subprocess.SubprocessError):
            versions[target.cross_compiler] = "not found"
    return versions


@dataclasses.dataclass
class BuildResult:
    """What ``build`` made: the bundle's path, its manifest, and the checks it passed."""

    path: Path
    manifest: dict[str, Any]
    #: the final ONNX graph the code was compiled from (in memory only; not part of the bundle)
    graph: Any = dataclasses.field(default=None, repr=False)

    @property
    def verification(self) -> dict[str, Any]:
        return self.manifest["verification"]

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "bundle": str(self.path),
            "target": m["target"]["name"],
            "code_arch": m["target"]["arch"],
            "files": m["files"],
            "passes": [{"name": p["name"], "modified": p["modified"], "numerics_ok": p["numerics"]["ok"]} for p in m["passes"]],
            "verification": m["verification"],
        }


def _model_and_shapes(model, example: str | None, input_shapes) -> tuple[Path, Example | None, dict[str, tuple[int, ...]]]:
    """The model file, its example record (if any) and the input shapes to fix (the example's,
    overridden by the user's)."""
    model_path, ex = _resolve_model(model, example)
    shapes = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    if ex is not None:
        shapes = {**ex.input_shapes, **shapes}
    return model_path, ex, shapes


def _resolve_model(model: str | os.PathLike | None, example: str | None) -> tuple[Path, Example | None]:
    if example is not None:
        if model is not None:
            raise InputError("give either a model file or --example, not both")
        ex = get_example(example)
        return ex.model_path, ex
    if model is None:
        raise InputError("no model given (pass MODEL.onnx, or --example digits)")
    return Path(model), None


def _reference_samples(
    specs: list[TensorSpec], reference_inputs: str | os.PathLike | dict | None, example: Example | None, count: int
) -> tuple[Samples, str]:
    if isinstance(reference_inputs, dict):
        return samples_from_arrays(reference_inputs, specs, "reference inputs")[:count], "given arrays"
    if reference_inputs is not None:
        return load_samples_npz(reference_inputs, specs)[:count], str(reference_inputs)
    if example is not None:
        x, _ = _batched(example, "test", specs[0])
        return samples_from_arrays({specs[0].name: x[:count]}, specs, "example"), f"example {example.name}: test split"
    return random_samples(specs, count=count, seed=0), "random (seed 0)"


def _lowrank_config(lowrank: str | RankPolicy | LowRankConfig | None) -> LowRankConfig | None:
    if lowrank is None or isinstance(lowrank, LowRankConfig):
        return lowrank
    policy = parse_policy(lowrank) if isinstance(lowrank, str) else lowrank
    return LowRankConfig(policy=policy)


def _calibration_samples(
    specs: list[TensorSpec], calib: str | os.PathLike | dict | None, example: Example | None
) -> tuple[Samples | None, str]:
    """Calibration inputs for data-aware passes (never the samples the build is checked on)."""
    if isinstance(calib, dict):
        return samples_from_arrays(calib, specs, "calibration inputs"), "given arrays"
    if calib is not None:
        return load_samples_npz(calib, specs), str(calib)
    if example is not None:
        x, _ = _batched(example, "calib", specs[0])
        return samples_from_arrays({specs[0].name: x}, specs, "example calib"), f"example {example.name}: calib split"
    return None, "none"


def _batched(example: Example, split: str, spec: TensorSpec) -> tuple[np.ndarray, np.ndarray]:
    """A labelled split grouped into samples of the model's batch size: x [K, B, ...], y [K, B]."""
    x, y = example.split(split)
    batch = int(spec.shape[0])
    n = (len(x) // batch) * batch
    return x[:n].reshape(n // batch, batch, *x.shape[1:]), y[:n].reshape(n // batch, batch)


def _evaluate_example(example: Example, specs: list[TensorSpec], run_fn, original_model) -> dict[str, Any]:
    """Accuracy of the compiled code and of ORT on the original model, on the labelled test split."""
    x, y = _batched(example, "test", specs[0])
    y = y.reshape(-1)
    samples = samples_from_arrays({specs[0].name: x}, specs, "example test split")
    out_name = [o.name for o in graph_outputs(original_model)][:1]
    ort_pred = np.concatenate([np.argmax(o[0], axis=-1) for o in run_ort(original_model, samples, out_name)])
    got_pred = np.concatenate([np.argmax(o[0], axis=-1) for o in run_fn(samples)])
    return {
        "dataset": f"example {example.name}: test split",
        "samples": int(len(y)),
        "ort_accuracy": float(np.mean(ort_pred == y)),
        "compiled_accuracy": float(np.mean(got_pred == y)),
        "predictions_identical": bool(np.array_equal(ort_pred, got_pred)),
    }


@dataclasses.dataclass
class _Front:
    """The graph a build compiles and what it was checked with (shared by ``build`` and ``tune``)."""

    original: Any
    in_specs: list[TensorSpec]
    out_names: list[str]
    samples: Samples
    sample_source: str
    calib_samples: Any
    calib_source: str
    reference: Any
    final: Any
    records: list
    final_reference: Any
    entropy: str | None
    lossy: bool
    accuracy: Tolerance


def _front(model_path: Path, ex, shapes, reference_inputs, num_samples, calib, lowrank, int8, prune, passes, entropy,
           int8_arith, tolerance: Tolerance, accuracy: Tolerance | None, progress: Progress) -> _Front:
    """Import the model, take reference and calibration samples, run the passes (each checked)."""
    with progress.stage(f"importing {model_path.name}"):
        original = load_onnx(model_path)
        fixed = fix_input_shapes(original, shapes)
        in_specs = graph_inputs(fixed)
        out_names = [o.name for o in graph_outputs(original)]
        samples, sample_source = _reference_samples(in_specs, reference_inputs, ex, num_samples)
        calib_samples, calib_source = _calibration_samples(in_specs, calib, ex)
        reference = run_ort(original, samples, out_names)

    ctx = PassContext(
        lowrank=_lowrank_config(lowrank),
        int8=parse_int8(int8) if isinstance(int8, str) else int8,
        prune=parse_prune(prune) if isinstance(prune, str) else prune,
        calib=calib_samples,
    )
    passes, entropy = _split_entropy(passes, entropy)
    if int8_arith and ctx.int8 is None and "int8" not in (passes or []):
        raise InputError("--int8-arith compiles int8 layers: it needs --int8 (or 'int8' in --passes)")
    if entropy is not None and entropy not in ENTROPY_CODECS:
        raise InputError(f"unknown entropy coder {entropy!r} (known: {', '.join(ENTROPY_CODECS)})")
    pass_list = make_passes(passes, ctx)
    lossy = any(is_lossy(p) for _, p in pass_list)
    accuracy = accuracy or (DEFAULT_ACCURACY if lossy else tolerance)
    try:
        final, records, final_reference = run_pipeline(
            fixed, pass_list, samples, reference, out_names, tolerance, accuracy, progress
        )
    except NumericsError as err:
        if lossy and sample_source.startswith("random"):  # a lossy pass judged on noise, not on data
            raise NumericsError(f"{err} (checked on random inputs: give real ones with --reference-inputs NPZ)") from err
        raise

    return _Front(original, in_specs, out_names, samples, sample_source, calib_samples, calib_source, reference,
                  final, records, final_reference, entropy, lossy, accuracy)


def build(
    model: str | os.PathLike | None = None,
    target: str | Target = "host",
    output: str | os.PathLike | None = None,
    *,
    target_file: str | os.PathLike | None = None,
    arch: str | None = None,
    example: str | None = None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    passes: str | Sequence[str] | None = None,
    reference_inputs: str | os.PathLike | dict | None = None,
    num_samples: int = 8,
    tolerance: Tolerance = Tolerance(),
    lowrank: str | RankPolicy | LowRankConfig | None = None,
    calib: str | os.PathLike | dict | None = None,
    int8: str | QuantizeConfig | None = None,
    prune: str | PruneConfig | None = None,
    entropy: str | None = None,
    int8_arith: bool = False,
    emit: str | Sequence[str] | None = None,
    firmware_name: str | None = None,
    db: str | os.PathLike | None = None,
    accuracy: Tolerance | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Compile an ONNX model into a verified bundle for ``target``.

    Args:
        model: path of the ONNX file (or None with ``example``).
        target: a registered target name (``edgecomp targets``) or a ``Target`` record.
        target_file: a user target described in TOML (``edgecomp.targets.target_file``), instead
            of ``target``.
        arch: the GPU architecture for targets that take one (``cuda``: ``"sm_86"``).
        output: bundle directory (or ``.tar``); default ``<model>-<target>`` in the current folder.
        example: build a shipped example model instead of a file (``"digits"``).
        input_shapes: static shapes for dynamic inputs, ``{"input": (1, 3, 224, 224)}``.
        passes: pass names (``"fold,dce"``, ``"none"``); default: the cleanup pipeline.
        reference_inputs: ``.npz`` (or dict) of real inputs to check numerics on; default random.
        num_samples: how many reference samples to check every stage on.
        tolerance: what counts as matching ONNX Runtime exactly: for exact passes (vs the stage
            before) and for the compiled code (vs ORT on the final graph).
        lowrank: low-rank factorization: a policy string (``"erank:1.0"``, ``"energy:0.95"``,
            ``"budget:params=2x"``), a ``RankPolicy``, or a full ``LowRankConfig``.
        calib: calibration inputs (``.npz`` or dict, same format as ``reference_inputs``) for
            data-aware passes; default: the example's calibration split, else none.
        int8: post-training int8 quantization (QDQ): a calibration method with an optional
            budget (``"minmax"``, ``"entropy:budget:top1=0.97"``) or a ``QuantizeConfig`` (its
            ``weights="gptq"`` rounds the weights data-aware on ``calib``; ``weight_bits`` /
            ``layer_bits`` narrow the grid, ``parse_int8_weights("gptq:@NODE=6")`` gives them).
        prune: pruning, a spec ``METHOD:TARGET[,OPTION...]`` or a ``PruneConfig``:
            ``"magnitude:0.5"`` (zero half of each layer's weights, smallest ``|w|``),
            ``"magnitude:global:0.7"`` (one threshold over all layers), ``"nm:2:4"`` (2 of every 4
            along the reduction axis), ``"channel:0.25"`` (remove a quarter of the channels of
            every prunable Conv/Gemm chain, shrinking the tensors), ``"channel:budget:cosine=0.99"``
            / ``budget:top1=A`` / ``budget:params=2x`` (per-layer sparsity from measured
            sensitivity on ``calib``); options ``skip=NODE``, ``min=N``, ``layers=gemm+conv``,
            ``norm=l2``, ``@NODE=F`` (``edgecomp.passes.prune.parse_prune``).
        int8_arith: compile int8 (QDQ) contractions as int8×int8 → int32 arithmetic
            (``edgecomp.targets.int8``) instead of dequantize → fp32. Their weight sums are
            folded into the code, so the bundle's code is tied to its weights (recorded).
        entropy: code the bundle's weights file losslessly: ``"zstd"`` or ``"ans"`` (rANS,
            needs ``constriction``); also given as the last name of ``passes``.
        emit: extra outputs: ``"firmware"`` adds ``firmware/`` (static library of the model,
            C header, CMake package, Makefile fragment, weights blob, TVM runtime libraries;
            ``edgecomp.targets.firmware``), built and verified with the C example where the
            target's code can run here (natively or under qemu-user).
        firmware_name: the C name of the model in the firmware API (default: from the model
            file name, ``digits_cnn`` → ``digits_cnn_create(...)``).
        db: a tuning database written by :func:`tune` (``edgecomp tune``): the kernels get its
            schedules (no tuning runs); a database for another target is refused.
        accuracy: how far lossy passes may take the outputs from the original model
            (default: cosine ≥ 0.98 per sample).
        force: replace an existing output.
    Raises:
        EdgecompError: bad input (exit 2) or numerics past tolerance (``NumericsError``, exit 1).
    """
    progress = progress or Progress(enabled=False)
    tgt = resolve_target(target, target_file=target_file, arch=arch)
    model_path, ex, shapes = _model_and_shapes(model, example, input_shapes)
    if num_samples < 1:
        raise InputError("--samples must be at least 1")
    out = Path(output) if output is not None else Path(f"{model_path.stem}-{tgt.name}")
    bundle_fmt.check_output_path(out, force, protect=[model_path])
    emits = _emits(emit)
    fw_name = _firmware_name(firmware_name, model_path) if "firmware" in emits else None
    tuning = _tuning_record(db, tgt)
    if fw_name is not None and tgt.device != "cpu":
        raise InputError(f"--emit firmware needs a CPU target; {tgt.name} runs {tgt.device} kernels")
    if fw_name is not None:
        from edgecomp.targets.firmware import runtime_site, toolchain

        toolchain(tgt)  # missing compilers or runtime libraries: say so before any work
        runtime_site(tgt.arch)

    fr = _front(
        model_path, ex, shapes, reference_inputs, num_samples, calib, lowrank, int8, prune, passes, entropy,
        int8_arith, tolerance, accuracy, progress,
    )
    original, in_specs, out_names, final, records = fr.original, fr.in_specs, fr.out_names, fr.final, fr.records
    samples, sample_source, calib_samples, calib_source = fr.samples, fr.sample_source, fr.calib_samples, fr.calib_source
    reference, final_reference, entropy, lossy, accuracy = fr.reference, fr.final_reference, fr.entropy, fr.lossy, fr.accuracy

    code_tolerance, code_tolerance_note = _code_tolerance(final, tolerance)

    with bundle_fmt.staged_output(out, force=force, protect=[model_path]) as stage:
        with progress.stage("importing into TVM Relax"):
            relax_model = to_relax(final, {s.name: s.shape for s in in_specs}, {s.name: s.dtype for s in in_specs},
                                   channels_last_convs=wants_channels_last(tgt), int8_arith=int8_arith)
        with progress.stage(f"compiling for {tgt.name} ({tgt.target_dict()})"):
            executable = compile_relax(relax_model, tgt, int8_arith=int8_arith, db=db)
        with progress.stage(f"linking {bundle_fmt.CODE}" + (f" with {tgt.cross_compiler}" if tgt.cross_compiler else "")):
            export_library(executable, stage / bundle_fmt.CODE, tgt)
            code_arch = elf_arch(stage / bundle_fmt.CODE)
            if code_arch != tgt.arch:
                raise UnsupportedModelError(f"linked {bundle_fmt.CODE} is {code_arch} code, expected {tgt.arch}")
        kernels = None
        if tgt.device_kind.kernel_file is not None:  # GPU: the kernel source, for reading, compiled here
            with progress.stage(f"writing {tgt.device_kind.kernel_file} and compiling it here"):
                kernels = emit_kernels(executable, tgt, stage)

        weights = {f"p{i:04d}": np.asarray(v, order="C") for i, v in enumerate(relax_model.params)}
        coding = None
        if entropy is None:
            weights_file = bundle_fmt.WEIGHTS
            bundle_fmt.save_npz(stage / weights_file, weights)
        else:
            weights_file = bundle_fmt.WEIGHTS_CODED
            with progress.stage(f"entropy coding the weights ({entropy})"):
                blob, coding = encode_weights(weights, entropy)
                (stage / weights_file).write_bytes(blob)
                # The file is only as good as its decoder: decoding checks every tensor's bytes
                # against its digest, so a coder that does not round-trip fails here, not on a device.
                decode_weights(blob, where=f"{weights_file} ({entropy})")
        bundle_fmt.save_npz(stage / bundle_fmt.REF_INPUTS, stack_samples([s.name for s in in_specs], [[f[s.name] for s in in_specs] for f in samples]))
        bundle_fmt.save_npz(stage / bundle_fmt.REF_OUTPUTS, stack_samples(out_names, reference))

        manifest: dict[str, Any] = {
            "format": bundle_fmt.FORMAT,
            "format_version": bundle_fmt.FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": model_path.stem, "path": str(model_path), "sha256": sha256_file(model_path), "example": example},
            "target": {
                "name": tgt.name,
                "family": tgt.family,
                "arch": tgt.arch,
                "tvm_target": tgt.target_dict(),
                "cross_compiler": tgt.cross_compiler,
                "device_key": tgt.device_key,
                "device": tgt.device,
                "target_file": tgt.source,
                "kernels": kernels,
            },
            "inputs": [s.to_json() for s in in_specs],
            "outputs": [
                TensorSpec(n, tuple(int(d) for d in reference[0][i].shape), reference[0][i].dtype.name).to_json()
                for i, n in enumerate(out_names)
            ],
            "params": [
                {"key": k, "name": n, "shape": list(v.shape), "dtype": v.dtype.name,
                 **({"layout": relax_model.layouts[n]} if n in relax_model.layouts else {})}
                for (k, v), n in zip(weights.items(), relax_model.param_names)
            ],
            "runtime": {
                "entry": "main",
                "code": bundle_fmt.CODE,
                "weights": weights_file,
                "calling_convention": "main(*inputs, *params) with params in manifest order",
                "executor": "relax.VirtualMachine",
                # int8 arithmetic folds weight sums into the code: weights cannot be swapped alone
                "int8_arith": bool(int8_arith),
            },
            "reference": {"inputs": bundle_fmt.REF_INPUTS, "outputs": bundle_fmt.REF_OUTPUTS, "source": sample_source, "samples": len(samples)},
            "calibration": {"source": calib_source, "samples": len(calib_samples or [])},
            "tolerance": tolerance.to_json(),
            "code_tolerance": {**code_tolerance.to_json(), "why": code_tolerance_note},
            "accuracy": accuracy.to_json(),
            "tools": tool_versions(tgt),
            "passes": [r.to_json() for r in records],
            "entropy_coding": coding,
            "tuning": tuning,
        }

        with progress.stage("verifying compiled code against ONNX Runtime"):
            verification, check = _verify(
                tgt, stage, manifest, relax_model, in_specs, samples, reference, final_reference,
                out_names, code_tolerance, accuracy, ex, original, lossy, progress,
            )
        if not check.ok:
            raise NumericsError(f"compiled code does not match ONNX Runtime: {'; '.join(check.failures)}")
        manifest["verification"] = verification
        if fw_name is not None:
            manifest["firmware"] = _emit_firmware(
                relax_model, tgt, stage, fw_name, model_path.stem, in_specs, manifest["outputs"], int8_arith,
                entropy is not None, samples, final_reference, out_names, code_tolerance, progress, db,
            )

        pre = dict(manifest)
        pre["files"] = {
            rel: {"bytes": (stage / rel).stat().st_size} for rel in bundle_fmt.bundle_files(stage)
        }
        (stage / bundle_fmt.REPORT).write_text(render_report(pre))
        (stage / bundle_fmt.REPORT_HTML).write_text(bundle_html(pre))
        manifest = bundle_fmt.finalize_manifest(stage, manifest)
    progress.note(f"bundle written to {out}")
    return BuildResult(out, manifest, graph=final)


# How close compiled QDQ code must be to ORT running the same graph. Both compute in fp32 between
# QuantizeLinear/DequantizeLinear pairs, but in a different summation order: a 1-ulp difference
# that lands on a rounding boundary flips one int8 value, and the flip propagates through every
# later quantization. Measured on MobileNetV2 int8 (8 photos): the first flipped value appears in
# block 7 and the logits end at cosine 0.982, top-1 7/8; small graphs match exactly. So the
# compiled code of a quantized graph is held to a cosine bound, not to bit-level closeness.
INT8_CODE_TOLERANCE = Tolerance(atol=float("inf"), rtol=0.0, min_cosine=0.95, min_top1=0.0)


def _code_tolerance(final, tolerance: Tolerance) -> tuple[Tolerance, str]:
    """The tolerance compiled code is held to against ORT on the final graph (see above)."""
    if not any(n.op_type == "QuantizeLinear" for n in final.graph.node):
        return tolerance, "exact: the given tolerance"
    return (
        INT8_CODE_TOLERANCE,
        "quantized (QDQ) graph: fp32 summation order decides int8 rounding ties, which propagate; "
        "held to cosine >= 0.95 against ORT running the same graph",
    )


def _tuning_record(db: str | os.PathLike | None, tgt: Target) -> dict[str, Any] | None:
    """The database a build compiles with, checked against the target before any work."""
    if db is None:
        return None
    from edgecomp.targets.tuning import database_dir, record_count

    folder = database_dir(db, tgt, create=False)
    return {"db": str(folder), "target": tgt.name, "records": record_count(folder)}


def tune(
    model: str | os.PathLike | None = None,
    target: str | Target = "host",
    db: str | os.PathLike = "tuning-db",
    trials: int = 64,
    *,
    trials_per_task: int | None = None,
    tracker: str | None = None,
    rpc_key: str | None = None,
    target_file: str | os.PathLike | None = None,
    arch: str | None = None,
    example: str | None = None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    passes: str | Sequence[str] | None = None,
    reference_inputs: str | os.PathLike | dict | None = None,
    num_samples: int = 8,
    tolerance: Tolerance = Tolerance(),
    lowrank: str | RankPolicy | LowRankConfig | None = None,
    calib: str | os.PathLike | dict | None = None,
    int8: str | QuantizeConfig | None = None,
    prune: str | PruneConfig | None = None,
    int8_arith: bool = False,
    accuracy: Tolerance | None = None,
    progress: Progress | None = None,
):
    """MetaSchedule-tune the kernels of the model a ``build`` with the same options compiles.

    The records go to ``db/<target>/`` (:mod:`edgecomp.targets.tuning`); ``build(..., db=db)``
    then compiles with them. ``trials`` is the total the database should hold: a rerun after an
    interruption continues from the records already there. ``tracker="HOST:PORT"`` with
    ``rpc_key`` times candidates on devices registered with a TVM RPC tracker.
    Returns a :class:`edgecomp.targets.tuning.TuneReport`.
    """
    from edgecomp.targets.tuning import check_can_tune
    from edgecomp.targets.tuning import tune as ms_tune

    progress = progress or Progress(enabled=False)
    tgt = resolve_target(target, target_file=target_file, arch=arch)
    where = None
    if tracker is not None:
        host, _, port = str(tracker).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"--tracker {tracker!r}: expected HOST:PORT")
        where = (host.strip("[]"), int(port))
    check_can_tune(tgt, trials, where, rpc_key)  # bad requests and unreachable trackers fail before any work
    model_path, ex, shapes = _model_and_shapes(model, example, input_shapes)
    fr = _front(model_path, ex, shapes, reference_inputs, num_samples, calib, lowrank, int8, prune, passes, None,
                int8_arith, tolerance, accuracy, progress)
    with progress.stage("importing into TVM Relax"):
        relax_model = to_relax(fr.final, {s.name: s.shape for s in fr.in_specs}, {s.name: s.dtype for s in fr.in_specs},
                               channels_last_convs=wants_channels_last(tgt), int8_arith=int8_arith)
    report = ms_tune(relax_model, tgt, db, trials, int8_arith=int8_arith, trials_per_task=trials_per_task,
                     tracker=where, rpc_key=rpc_key, progress=progress)
    progress.note(f"database {report.db}: {report.trials_before + report.trials_run} records")
    return report


EMITS = ("firmware",)


def _emits(emit: str | Sequence[str] | None) -> set[str]:
    items = [e.strip() for e in (emit.split(",") if isinstance(emit, str) else (emit or [])) if e.strip()]
    bad = [e for e in items if e not in EMITS]
    if bad:
        raise InputError(f"unknown --emit {bad[0]!r} (known: {', '.join(EMITS)})")
    return set(items)


def _firmware_name(name: str | None, model_path: Path) -> str:
    from edgecomp.targets.firmware import c_name

    if name is None:
        return c_name(model_path.stem)
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise InputError(f"--firmware-name {name!r} must be a lower-case C identifier (letters, digits, _)")
    return name


def _emit_firmware(relax_model, tgt: Target, stage: Path, name: str, model_name: str, in_specs: list[TensorSpec],
                   outputs: list[dict[str, Any]], int8_arith: bool, compress: bool, samples: Samples,
                   final_reference, out_names: list[str], tolerance: Tolerance, progress: Progress,
                   db: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write ``firmware/`` and run the C example against it where the target's code runs here."""
    from edgecomp.targets import firmware as fw

    ins = [(s.name, tuple(s.shape), s.dtype) for s in in_specs]
    outs = [(o["name"], tuple(o["shape"]), o["dtype"]) for o in outputs]
    dest = stage / fw.FIRMWARE_DIR
    with progress.stage(f"firmware: static library, C header, CMake package ({name})"):
        result = fw.emit_firmware(
            relax_model, tgt, dest, name=name, model_name=model_name, inputs=ins, outputs=outs,
            int8_arith=int8_arith, compress=compress, versions=tool_versions(tgt), db=db,
        )
    info: dict[str, Any] = result.to_json()
    prefix, why = fw.runner_command(tgt.arch)
    if prefix is not None and compress and not fw.find_library(tgt, "zstd"):
        prefix, why = None, (f"the weights are zstd-coded and {fw.toolchain(tgt).cc} finds no libzstd to link the example "
                             f"with (Debian: apt-get install libzstd-dev{':arm64' if tgt.arch == 'aarch64' else ''})")
    if prefix is None:
        info["verification"] = {"ran": None, "skipped": why}
        progress.note(f"firmware not run here: {why}")
        return info
    # Natively every reference sample runs with both weight sources. Under emulation untuned code
    # is slow (MobileNetV2: ~3 s a sample under qemu here), so the weights file runs on two samples
    # and the linked weights, the same code with the same blob, on one.
    emulated = bool(prefix)
    counts = {"file": min(len(samples), 2) if emulated else len(samples), "linked": 1 if emulated else len(samples)}
    checks = {}
    with progress.stage("firmware: building and running the C example (weights from the file, and linked in)"):
        with tempfile.TemporaryDirectory(prefix="edgecomp-fwcheck-") as work:
            for how, n in counts.items():
                run = fw.firmware_runner(dest, name, tgt, ins, outs, Path(work), linked=how == "linked")
                checks[how] = compare(out_names, final_reference[:n], run(samples[:n]), tolerance)
    bad = [f"{how} weights: {'; '.join(c.failures)}" for how, c in checks.items() if not c.ok]
    if bad:
        raise NumericsError(f"firmware C example does not match ONNX Runtime: {' | '.join(bad)}")
    how = "natively" if not prefix else f"under {Path(prefix[0]).name}"
    info["verification"] = {
        "ran": f"edgecomp/examples/firmware/main.c built against firmware/ and run {how} ({tgt.arch})",
        **{how_w: c.to_json() for how_w, c in checks.items()},
    }
    progress.note(f"firmware C example vs ONNX Runtime: {checks['file'].summary()}")
    return info


def _split_entropy(passes, entropy: str | None) -> tuple[Any, str | None]:
    """Take an entropy coder named in ``passes`` (it codes the bundle, not the graph) out of it."""
    if passes is None:
        return None, entropy
    names = [n.strip() for n in passes.split(",")] if isinstance(passes, str) else list(passes)
    coders = [n for n in names if n in ENTROPY_CODECS]
    if len(coders) > 1 or (coders and entropy is not None and coders[0] != entropy):
        raise InputError(f"give one entropy coder, not {', '.join(coders + ([entropy] if entropy else []))}")
    if coders and names[-1] != coders[0]:
        raise InputError(f"--passes: {coders[0]} codes the bundle's final weights, so it comes last")
    rest = [n for n in names if n not in ENTROPY_CODECS]
    return (rest or ["none"]), (coders[0] if coders else entropy)


def _verify(
    tgt: Target, stage: Path, manifest: dict[str, Any], relax_model, in_specs: list[TensorSpec],
    samples: Samples, reference, final_reference, out_names: list[str], tolerance: Tolerance,
    accuracy: Tolerance, ex: Example | None, original, lossy: bool, progress: Progress,
) -> tuple[dict[str, Any], Comparison]:
    """Run the compiled code on the reference samples and compare it with ORT.

    The compiler must reproduce the graph it was given (``tolerance`` vs ORT on the final graph);
    how far that graph is from the original is the passes' business (``accuracy``, recorded).
    Host code is the staged bundle itself; cross-compiled code cannot run here, so the same Relax
    module is compiled for the host instead (the device check runs the real thing).
    """
    if tgt.runs_on_this_machine:
        run_fn = bundle_fmt.Bundle(stage, manifest).run
        ran = f"the bundle's {bundle_fmt.CODE} on this machine ({platform.machine()})"
    else:
        host_code = compile_relax(relax_model, get_target("host"), int8_arith=manifest["runtime"]["int8_arith"])
        run_fn = _vm_runner(host_code, relax_model.params, in_specs)
        ran = (
            f"the same Relax module compiled for this host ({platform.machine()}); "
            f"{tgt.code_description} not executed here"
        )
    got = run_fn(samples)
    check = compare(out_names, final_reference, got, tolerance)
    vs_original = compare(out_names, reference, got, accuracy)
    verification: dict[str, Any] = {"ran": ran, "numerics": check.to_json(), "vs_original": vs_original.to_json()}
    if ex is not None:
        verification["evaluation"] = _evaluate_example(ex, in_specs, run_fn, original)
    progress.note(f"compiled vs ONNX Runtime: {check.summary()}")
    if lossy:
        progress.note(f"compiled vs the original model: {vs_original.summary()}")
    return verification, check


def _vm_runner(executable, params: list[np.ndarray], in_specs: list[TensorSpec]):
    """A ``run(samples)`` function over an in-memory executable for this host."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    tparams = [tvm.runtime.tensor(p) for p in params]

    def run(samples: Samples) -> list[list[np.ndarray]]:
        results = []
        for feed in samples:
            args = [tvm.runtime.tensor(np.asarray(feed[s.name], order="C")) for s in in_specs]
            results.append(bundle_fmt._flatten(vm["main"](*args, *tparams)))
        return results

    return run


def inspect_model(
    model: str | os.PathLike | None = None,
    *,
    example: str | None = None,
    input_shapes: dict[str, Sequence[int]] | None = None,
) -> ModelSummary:
    """Summarize an ONNX model: I/O, op histogram, parameters, per-layer MACs/FLOPs."""
    model_path, ex, shapes = _model_and_shapes(model, example, input_shapes)
    return summarize(load_onnx(model_path), shapes)


def run_bundle(path: str | os.PathLike, inputs: str | os.PathLike | dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Run a bundle on this machine (checksums verified first).

    ``inputs``: ``.npz`` path or dict, one array per input name, each of the input's shape or a
    stack of samples along a new leading axis (outputs are stacked the same way). Default: the
    bundle's reference inputs.
    """
    b = bundle_fmt.load_bundle(path)
    try:
        specs = b.inputs
        if inputs is None:
            arrays, _ = b.reference()
            samples = samples_from_arrays(arrays, specs, "reference inputs")
            stacked = True
        else:
            if isinstance(inputs, dict):
                arrays, source = inputs, "inputs"
            else:
                arrays, source = load_npz(inputs), str(inputs)
            stacked = any(np.asarray(arrays.get(s.name)).ndim == len(s.shape) + 1 for s in specs)
            samples = samples_from_arrays(arrays, specs, source)
        results = b.run(samples)
        names = [o.name for o in b.outputs]
        out = stack_samples(names, results)
        return out if stacked else {k: v[0] for k, v in out.items()}
    finally:
        b.close()


def check(
    bundle: str | os.PathLike,
    device: Any = "local",
    *,
    inputs: str | os.PathLike | dict[str, np.ndarray] | None = None,
    baseline: str | os.PathLike | None = None,
    save_baseline: str | os.PathLike | None = None,
    repeats: int = 30,
    warmup: int = 3,
    number: int | None = None,
    tolerance: Tolerance | None = None,
    thresholds: Any = None,
    max_latency_ms: float | None = None,
    connect_timeout: float | None = None,
    timeout: float | None = None,
    progress: Progress | None = None,
):
    """Run a bundle on a device and check accuracy, latency and memory, optionally vs a baseline.

    Args:
        bundle: bundle directory or ``.tar``.
        device: ``"local"``, ``"rpc://HOST:PORT"``, ``"tracker://HOST:PORT/KEY"``, ``"emu-arm64"``,
            or a ``edgecomp.targets.devices.Device`` (a started one is reused and left running).
        inputs: ``.npz`` (or dict) of inputs to check on, optionally with the expected outputs;
            default: the bundle's reference inputs and ORT outputs of the original model.
        baseline: a file written by an earlier ``save_baseline``: regressions fail the check.
        save_baseline: write this run's numbers there (only when every check passed).
        repeats, warmup, number: timing: ``repeats`` timed repeats, each the mean of ``number``
            runs (default: enough runs for about 5 ms), after ``warmup`` untimed runs.
        tolerance: accuracy vs ORT on the original model (default: the bundle's manifest).
        thresholds: ``edgecomp.checks.Thresholds`` for regressions (latency ratio, accuracy drop).
        max_latency_ms: fail when the median is slower (real devices only).
        connect_timeout, timeout: bounds (s) on reaching the device and on the whole session.
    Returns:
        ``edgecomp.checks.CheckReport``: ``.exit_code`` (0 pass, 1 failed), ``.table()``,
        ``.to_json()``, ``.junit_xml()``.
    Raises:
        EdgecompError: device unreachable or failed (``DeviceError``), bad bundle, input or
            baseline (exit code 2).
    """
    from edgecomp.checks import Thresholds, run_check

    return run_check(
        bundle, device, inputs=inputs, baseline=baseline, save_baseline=save_baseline, repeats=repeats,
        warmup=warmup, number=number, tolerance=tolerance, thresholds=thresholds or Thresholds(),
        max_latency_ms=max_latency_ms, connect_timeout=connect_timeout, timeout=timeout, progress=progress,
    )
