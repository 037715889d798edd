"""The benchmark: size, accuracy and latency of every configuration against ONNX Runtime fp32.

For each model, in one process run and side by side:

- ``ort-fp32``  ONNX Runtime on the original model (the baseline);
- ``ort-int8``  ONNX Runtime's own ``quantize_static`` (QDQ, per-channel int8 weights, MinMax
  calibration on the model's calibration split, Conv/MatMul/Gemm quantized);
- ``edgecomp``  an edgecomp host bundle with the default (cleanup) passes, untuned TVM code;
- ``edgecomp-lowrank`` the same with the low-rank pass under the model's budget policy.

Size: the model file (ORT) or the bundle's code + weights. Accuracy: the model's metric on its
evaluation split against the fp32 reference (see ``edgecomp.bench.models``). Latency: one input,
warm-up, then repeated single-sample runs timed with ``perf_counter``; median and p10/p90, with
the thread count fixed for both runtimes. Bundles whose whole evaluation would take too long on
untuned code are scored with ORT on the exact graph they were compiled from (the build verified
the code against it); the row says which.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgecomp.bench import models as bench_models
from edgecomp.numerics import Tolerance, ort_session
from edgecomp.passes.lowrank import LowRankConfig
from edgecomp.passes.rank_selection import parse_policy
from edgecomp.versions import cpu_model

__all__ = ["CONFIGS", "LOWRANK_POLICIES", "measure_latency", "run_benchmark", "markdown_table"]

log = logging.getLogger(__name__)

CONFIGS = ("ort-fp32", "ort-int8", "edgecomp", "edgecomp-lowrank")

# The low-rank setting each model is benchmarked with: a global budget, allocated by sensitivity.
LOWRANK_POLICIES: dict[str, LowRankConfig] = {
    "digits-cnn": LowRankConfig(policy=parse_policy("budget:params=2x"), layers=("gemm", "conv")),
    # Cosine of 1000 logits stays high while the argmax flips: classifiers get a top-1 budget.
    "mobilenetv2": LowRankConfig(policy=parse_policy("budget:top1=0.95"), layers=("gemm", "conv"), max_sensitivity=40),
    "minilm": LowRankConfig(policy=parse_policy("budget:params=1.3x"), layers=("gemm", "embedding"), max_sensitivity=16),
}

BENCH_ACCURACY = Tolerance(atol=math.inf, rtol=0.0, min_cosine=-1.0, min_top1=0.0)

# Score a bundle by running it on every evaluation sample only if that takes less than this.
MAX_BUNDLE_EVAL_SECONDS = 90.0


def measure_latency(run: Callable[[], Any], reps: int, warmup: int = 5) -> dict[str, float]:
    """Median and spread (ms) of ``reps`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.array(times)
    return {
        "median_ms": float(np.median(t)),
        "p10_ms": float(np.percentile(t, 10)),
        "p90_ms": float(np.percentile(t, 90)),
        "reps": int(reps),
    }


def _stack(per_sample: list[list[np.ndarray]]) -> np.ndarray:
    return np.stack([o[0] for o in per_sample])


def _quantize_int8(assets: bench_models.ModelAssets, out: Path) -> None:
    """ONNX Runtime's static int8 quantization (QDQ, per-channel weights) on the calib split."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds = assets.feeds("calib")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(assets.onnx), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QInt8,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    pre.unlink()


def _ort_row(name: str, config: str, path: Path, assets, eval_feeds, eval_arrays, threads: int, reps: int, build_s: float):
    sess = ort_session(path, threads)
    outputs = _stack([sess.run(None, f) for f in eval_feeds])
    metrics = bench_models.evaluate(name, outputs, eval_arrays)
    feed = eval_feeds[0]
    latency = measure_latency(lambda: sess.run(None, feed), reps)
    return {
        "model": name,
        "config": config,
        "bytes": path.stat().st_size,
        "metrics": metrics,
        "evaluated_with": "onnxruntime",
        "latency": latency,
        "build_s": round(build_s, 2),
    }


def _edgecomp_row(name, config, assets, eval_feeds, eval_arrays, threads, reps, workdir: Path, lowrank):
    import edgecomp
    from edgecomp.numerics import run_ort

    t0 = time.perf_counter()
    result = edgecomp.build(
        assets.onnx,
        target="host",
        output=workdir / f"{name}-{config}",
        reference_inputs=assets.eval,
        calib=assets.calib,
        lowrank=lowrank,
        # The benchmark measures accuracy itself on the whole evaluation split: a lossy pass is
        # not stopped by the build's accuracy budget here (exactness of the code still is).
        accuracy=BENCH_ACCURACY,
        force=True,
    )
    build_s = time.perf_counter() - t0
    bundle = edgecomp.load_bundle(result.path)
    try:
        feed = eval_feeds[0]
        latency = measure_latency(lambda: bundle.run([feed]), reps)
        if latency["median_ms"] * len(eval_feeds) / 1e3 <= MAX_BUNDLE_EVAL_SECONDS:
            outputs = _stack(bundle.run(eval_feeds))
            evaluated_with = "the bundle (TVM code)"
        else:
            outputs = _stack(run_ort(result.graph, eval_feeds))
            evaluated_with = "onnxruntime on the compiled graph (bundle verified against it)"
    finally:
        bundle.close()
    files = result.manifest["files"]
    lossy = [p for p in result.manifest["passes"] if p["lossy"]]
    return {
        "model": name,
        "config": config,
        "bytes": files["model.so"]["bytes"] + files["weights.npz"]["bytes"],
        "metrics": bench_models.evaluate(name, outputs, eval_arrays),
        "evaluated_with": evaluated_with,
        "latency": latency,
        "build_s": round(build_s, 2),
        "verification": result.manifest["verification"]["numerics"]["ok"],
        "passes": [{"name": p["name"], "stats": p["stats"], "params": p["params"]} for p in lossy],
        "layers": lossy[0]["layers"] if lossy else [],
        "bundle": str(result.path),
    }


def run_benchmark(
    models: Sequence[str],
    configs: Sequence[str] = CONFIGS,
    threads: int = 1,
    reps: int = 50,
    eval_limit: int | None = None,
    workdir: Path | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every configuration on every model; returns the results document."""
    rows: list[dict[str, Any]] = []
    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="edgecomp-bench-")
        workdir = Path(own_tmp.name)
    t_start = time.perf_counter()
    try:
        for name in models:
            assets = bench_models.fetch(name)
            eval_arrays = assets.arrays("eval")
            eval_feeds = assets.feeds("eval")
            if eval_limit:
                eval_feeds = eval_feeds[:eval_limit]
                eval_arrays = {k: v[:eval_limit] for k, v in eval_arrays.items()}
            fp32_bytes = assets.onnx.stat().st_size
            for config in configs:
                progress(f"[{name}] {config} ...")
                t0 = time.perf_counter()
                try:
                    if config == "ort-fp32":
                        row = _ort_row(name, config, assets.onnx, assets, eval_feeds, eval_arrays, threads, reps, 0.0)
                    elif config == "ort-int8":
                        q = workdir / f"{name}-int8.onnx"
                        _quantize_int8(assets, q)
                        row = _ort_row(name, config, q, assets, eval_feeds, eval_arrays, threads, reps, time.perf_counter() - t0)
                    elif config == "edgecomp":
                        row = _edgecomp_row(name, config, assets, eval_feeds, eval_arrays, threads, reps, workdir, None)
                    elif config == "edgecomp-lowrank":
                        row = _edgecomp_row(name, config, assets, eval_feeds, eval_arrays, threads, reps, workdir, LOWRANK_POLICIES[name])
                    else:
                        raise ValueError(f"unknown config {config!r} (known: {', '.join(CONFIGS)})")
                    row["error"] = None
                except Exception as err:  # a failed measurement is data, not a crash of the run
                    log.exception("benchmark %s/%s failed", name, config)
                    row = {"model": name, "config": config, "error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
                row["bytes_ratio_vs_fp32_onnx"] = (row["bytes"] / fp32_bytes) if row.get("bytes") else None
                rows.append(row)
                progress(f"[{name}] {config}: {_summary(row)} ({time.perf_counter() - t0:.0f} s)")
            base = next((r for r in rows if r["model"] == name and r["config"] == "ort-fp32" and not r["error"]), None)
            for r in rows:
                if r["model"] == name and base and r.get("latency"):
                    r["latency_ratio_vs_ort_fp32"] = r["latency"]["median_ms"] / base["latency"]["median_ms"]
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "threads": threads,
        "reps": reps,
        "eval_limit": eval_limit,
        "seconds": round(time.perf_counter() - t_start, 1),
        "results": rows,
    }


def _machine() -> dict[str, Any]:
    from edgecomp.api import tool_versions

    return {"host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(), "tools": tool_versions()}


def headline(row: dict[str, Any]) -> tuple[str, float | None]:
    m = row.get("metrics") or {}
    for key in ("accuracy", "mean_cosine", "top1_agreement"):
        if key in m:
            return key, m[key]
    return "", None


def _summary(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"FAILED: {row['error']}"
    key, value = headline(row)
    return f"{row['bytes']:,} B, {key} {value:.4f}, {row['latency']['median_ms']:.3f} ms"


def markdown_table(doc: dict[str, Any]) -> str:
    lines = [
        f"Machine: {doc['machine']['cpu']} ({doc['machine']['cores']} cores), threads {doc['threads']}, "
        f"{doc['reps']} timed runs per config (median, p10–p90). Date {doc['date']}.",
        "",
        "| model | config | bundle bytes | ratio vs fp32 ONNX | accuracy metric | latency median (ms) | p10–p90 | latency vs ORT fp32 | build (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['config']} | failed: {r['error']} | | | | | | |")
            continue
        key, value = headline(r)
        extra = ""
        m = r["metrics"]
        if key == "mean_cosine":
            extra = f" (min {m['min_cosine']:.4f}, Spearman {m.get('pairwise_spearman', float('nan')):.4f})"
        elif key == "top1_agreement":
            extra = f" (KL {m['mean_kl']:.4f})"
        elif key == "accuracy":
            extra = f" (top-1 agreement {m['top1_agreement']:.3f})"
        lat = r["latency"]
        lines.append(
            f"| {r['model']} | {r['config']} | {r['bytes']:,} | {r['bytes_ratio_vs_fp32_onnx']:.3f} | "
            f"{key} {value:.4f}{extra} | {lat['median_ms']:.3f} | {lat['p10_ms']:.3f}–{lat['p90_ms']:.3f} | "
            f"{r.get('latency_ratio_vs_ort_fp32', float('nan')):.2f}× | {r['build_s']:.1f} |"
        )
    lowrank = [r for r in doc["results"] if not r.get("error") and r.get("passes")]
    if lowrank:
        lines += [
            "",
            "Low-rank pass (parameters and MACs of the factorizable layers, and of the whole model):",
            "",
            "| model | policy | layers factorized | layer params kept | layer MACs kept | model params | calibration metric | accuracy metric |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in lowrank:
            st, params = r["passes"][0]["stats"], r["passes"][0]["params"]
            key, value = headline(r)
            lines.append(
                f"| {r['model']} | `{st['policy']}` | {st['layers_factorized']}/{st['layers_found']} | "
                f"{st['layer_params_after']:,} / {st['layer_params_before']:,} "
                f"({st['layer_params_before'] / max(1, st['layer_params_after']):.2f}× fewer) | "
                f"{st['layer_macs_after']:,} / {st['layer_macs_before']:,} | "
                f"{params[1]:,} / {params[0]:,} ({params[0] / max(1, params[1]):.2f}× fewer) | "
                f"{st.get('calibration_metric', '–')} | {key} {value:.4f} |"
            )
    return "\n".join(lines) + "\n"


def write_results(doc: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    """JSON + Markdown + HTML report (figures inline), each written atomically."""
    from edgecomp.bench.report import bench_html

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "html": out_dir / f"{stem}.html"}
    texts = {
        "json": json.dumps(doc, indent=1, default=str) + "\n",
        "md": markdown_table(doc),
        "html": bench_html(doc),
    }
    for kind, path in paths.items():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(texts[kind])
        os.replace(tmp, path)
    # One PNG per model (accuracy vs size, latency) for pages that cannot show the HTML.
    from edgecomp.bench.report import model_figure
    from edgecomp.figures import pyplot

    for name in dict.fromkeys(r["model"] for r in doc["results"]):
        fig = model_figure([r for r in doc["results"] if r["model"] == name], name)
        if fig is not None:
            png = out_dir / f"{stem}-{name}.png"
            fig.savefig(png.with_name(png.name + ".tmp.png"), dpi=100, bbox_inches="tight")
            pyplot().close(fig)
            os.replace(png.with_name(png.name + ".tmp.png"), png)
            paths[f"png-{name}"] = png
    return paths
