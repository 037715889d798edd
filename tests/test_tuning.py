"""MetaSchedule tuning with a reusable database (``edgecomp tune`` / ``build --db``).

Tiny models and a handful of trials (in-process measurement: no worker start-up), so the whole
file runs in well under a minute here; no timing assertions, only what the database holds and
what the compiled code computes.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecomp
from edgecomp.errors import DeviceError, InputError
from edgecomp.targets import get_target
from edgecomp.targets.lowering import compile_relax, to_relax
from edgecomp.targets.tuning import apply_database, database_dir, tune
from helpers import assert_bad_input, make_model, save


def mlp(seed: int = 0) -> onnx.ModelProto:
    """x (1x64) → MatMul 64x64 → Relu → MatMul 64x10: two contraction tasks."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) / 8, "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32) / 8, "W2")
    n = helper.make_node
    graph = helper.make_graph(
        [n("MatMul", ["x", "W1"], ["h"]), n("Relu", ["h"], ["r"]), n("MatMul", ["r", "W2"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [w1, w2],
    )
    return make_model(graph)


def _records(folder: Path) -> int:
    path = folder / "database_tuning_record.json"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The MLP tuned with 8 trials into a fresh database."""
    root = tmp_path_factory.mktemp("tune")
    model = save(mlp(), root / "mlp.onnx")
    rm = to_relax(onnx.load(model), {"x": (1, 64)}, {"x": "float32"})
    report = tune(rm, get_target("host"), root / "db", 8)
    return root, model, rm, report


def test_tuning_writes_a_database_keyed_by_target(tuned):
    root, _, _, report = tuned
    folder = root / "db" / "host"
    assert report.trials_before == 0 and report.trials_run >= 8 and report.tasks >= 2
    assert _records(folder) == report.trials_run
    meta = json.loads((folder / "target.json").read_text())
    assert meta["target"] == "host" and meta["tvm_target"] == get_target("host").target_dict()
    assert meta["tuning_target"]["num-cores"] >= 1


def test_default_schedules_are_the_first_records(tuned):
    """Before searching, each task's default schedule is measured and recorded (no sampled
    decisions in its trace), so MetaSchedule's best record per kernel is never slower than the
    default it replaces, on the same measurements."""
    root, _, _, report = tuned
    lines = (root / "db" / "host" / "database_tuning_record.json").read_text().splitlines()
    first = [json.loads(line) for line in lines[: report.tasks]]
    assert sorted(r[0] for r in first) == list(range(report.tasks))  # one per workload
    assert not any("Sample" in json.dumps(r[1][0]) for r in first)
    assert all(r[1][1] and min(r[1][1]) > 0 for r in first)  # measured


def test_the_database_schedules_every_kernel_and_numerics_hold(tuned):
    root, model, rm, _ = tuned
    import tvm

    host = get_target("host")
    applied = apply_database(rm.mod, host, root / "db")
    prims = [f for _, f in applied.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    scheduled = [f for f in prims if f.attrs is not None and f.attrs.get("tirx.is_scheduled")]
    assert len(scheduled) >= 2  # both matmuls come from the database
    from tvm import relax

    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    vm = relax.VirtualMachine(compile_relax(rm, host, db=root / "db"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(p) for p in rm.params]).numpy()
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() <= 1e-4


def test_a_build_in_a_new_process_reuses_the_database_without_tuning(tuned, tmp_path):
    root, model, _, report = tuned
    before = _records(root / "db" / "host")
    code = (
        "import edgecomp, json, sys\n"
        f"r = edgecomp.build({str(model)!r}, target='host', output={str(tmp_path / 'b')!r}, db={str(root / 'db')!r})\n"
        "print(json.dumps(r.manifest['tuning']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["records"] == before and info["target"] == "host"
    assert _records(root / "db" / "host") == before  # nothing tuned
    out = edgecomp.run_bundle(tmp_path / "b", {"x": np.ones((1, 64), np.float32)})["y"]
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": np.ones((1, 64), np.float32)})[0]
    assert np.abs(out - ref).max() <= 1e-4


def test_a_database_for_another_target_is_refused(tuned, tmp_path):
    root, _, rm, _ = tuned
    with pytest.raises(InputError, match=r"has no records for target arm64 \(it has records for: host\)"):
        compile_relax(rm, get_target("arm64"), db=root / "db")
    # the same name with another CPU (a database copied from another machine)
    other = tmp_path / "db"
    (other / "host").mkdir(parents=True)
    meta = json.loads((root / "db" / "host" / "target.json").read_text())
    meta["tvm_target"] = {**meta["tvm_target"], "mcpu": "cortex-a72"}
    (other / "host" / "target.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="was recorded for .*cortex-a72.*not for target host"):
        database_dir(other, get_target("host"), create=False)
    with pytest.raises(InputError, match="one target's folder"):
        database_dir(root / "db" / "host", get_target("host"), create=False)


def test_more_trials_continue_from_the_records_there(tuned):
    root, _, rm, first = tuned
    again = tune(rm, get_target("host"), root / "db", first.trials_run)  # already there: nothing to do
    assert again.trials_run == 0 and again.trials_before == first.trials_run


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a shell that backgrounds a job leaves SIGINT ignored


def test_an_interrupted_tuning_run_resumes(tmp_path):
    """Ctrl-C mid-run: exit 130, the records measured so far stay; the rerun starts from them."""
    model = save(mlp(seed=3), tmp_path / "mlp.onnx")
    db = tmp_path / "db"
    argv = [sys.executable, "-m", "edgecomp", "tune", str(model), "--target", "host", "--trials", "24", "--db", str(db)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    t0 = time.monotonic()
    while _records(db / "host") < 1 and time.monotonic() - t0 < 240 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    kept = _records(db / "host")
    assert proc.returncode == 130 and "interrupted" in err and 1 <= kept < 24, err[-2000:]
    rm = to_relax(onnx.load(model), {"x": (1, 64)}, {"x": "float32"})
    # an unnamed handler on MetaSchedule's logger (CI's pytest process had one) must not break tuning
    stray = logging.StreamHandler()
    logging.getLogger("tvm.s_tir.meta_schedule").addHandler(stray)
    try:
        report = tune(rm, get_target("host"), db, kept + 4)
    finally:
        logging.getLogger("tvm.s_tir.meta_schedule").removeHandler(stray)
    assert report.trials_before == kept and report.trials_run >= 4


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracker_is_one_line_within_bounded_time(cli, tmp_path):
    model = save(mlp(), tmp_path / "mlp.onnx")
    t0 = time.monotonic()
    rc, _, err = cli("tune", model, "--target", "host", "--trials", "4", "--db", tmp_path / "db",
                     "--tracker", f"127.0.0.1:{_closed_port()}", "--rpc-key", "rk3399")
    assert time.monotonic() - t0 < 30
    assert_bad_input(rc, err, mentions=["tracker 127.0.0.1", "unreachable"])
    assert not (tmp_path / "db").exists()


def test_target_that_cannot_be_timed_here_needs_a_tracker(tmp_path):
    rm = to_relax(mlp(), {"x": (1, 64)}, {"x": "float32"})
    with pytest.raises(InputError, match="cannot be timed on this machine"):
        tune(rm, get_target("arm64"), tmp_path / "db", 4)
    with pytest.raises(DeviceError, match="unreachable|cannot connect"):
        tune(rm, get_target("arm64"), tmp_path / "db", 4, tracker=("127.0.0.1", _closed_port()), rpc_key="k")


def test_cpu_candidates_are_timed_with_cold_caches():
    """In a model a kernel's weights start cold; records ranked on warm repeats lost there
    (MobileNetV2), so CPU candidates run once per repeat after a cache flush; GPUs keep warm repeats."""
    from edgecomp.targets import get_target
    from edgecomp.targets.tuning import evaluator_config

    cpu = evaluator_config(get_target("host"))
    assert cpu.enable_cpu_cache_flush and cpu.number == 1 and cpu.repeat > 1
    assert evaluator_config(get_target("arm64")).enable_cpu_cache_flush
    assert not evaluator_config(get_target("cuda")).enable_cpu_cache_flush


def test_int8_dot_records_replay_in_a_new_process(tmp_path):
    """--int8-arith on a VNNI CPU: the database holds the Int8Dot kernel's default schedule (its
    trace tensorizes with edgecomp's intrinsics), and a build in a fresh process, which has run no
    default schedule, replays it and computes what the build without the database computes."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from edgecomp.targets.cpu_schedules import int8_dot

    host = get_target("host")
    if int8_dot(host.tvm()) is None or int8_dot(host.tvm())[2] != "uint8":
        pytest.skip("this CPU has no AVX-512 VNNI")
    rng = np.random.default_rng(5)

    class Calib(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({"x": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(8))

        def get_next(self):
            return next(self.it, None)

    fp32 = save(mlp(seed=5), tmp_path / "mlp.onnx")
    qdq = tmp_path / "mlp-int8.onnx"
    quantize_static(str(fp32), str(qdq), Calib(), quant_format=QuantFormat.QDQ, per_channel=True)
    rm = to_relax(onnx.load(qdq), {"x": (1, 64)}, {"x": "float32"})
    db = tmp_path / "db"
    tune(rm, host, db, 4, int8_arith=True)
    records = (db / "host" / "database_tuning_record.json").read_text()
    assert "edgecomp.dot_16x4_vnni.local" in records
    x = rng.standard_normal((1, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import numpy as np, onnx, tvm, sys\n"
        "from tvm import relax\n"
        "from edgecomp.targets import get_target\n"
        "from edgecomp.targets.lowering import compile_relax, to_relax\n"
        f"rm = to_relax(onnx.load({str(qdq)!r}), {{'x': (1, 64)}}, {{'x': 'float32'}})\n"
        f"vm = relax.VirtualMachine(compile_relax(rm, get_target('host'), int8_arith=True, db={str(db)!r}), tvm.cpu())\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, vm['main'](tvm.runtime.tensor(x), *[tvm.runtime.tensor(p) for p in rm.params]).numpy())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(compile_relax(rm, host, int8_arith=True), tvm.cpu())
    want = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(p) for p in rm.params]).numpy()
    assert np.array_equal(np.load(tmp_path / "y.npy"), want)
