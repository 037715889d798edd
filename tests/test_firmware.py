"""Firmware outputs (``edgecomp build --emit firmware``): the C example, built with the generated
CMake package and Makefile fragment, against ONNX Runtime; byte-identical rebuilds; bad weights.

The arm64 tests cross-build with Debian's aarch64 g++ and run under qemu-aarch64 (``-L
/usr/aarch64-linux-gnu``); they need the aarch64 TVM runtime libraries that
``tools/setup_emu_arm64.sh`` fetches, and are skipped with a reason without them (failed instead
when ``EDGECOMP_REQUIRE_EMU=1``, as in CI).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecomp
from edgecomp.errors import InputError
from edgecomp.targets import get_target
from edgecomp.targets.firmware import c_name, runner_command, runtime_site, weights_blob
from helpers import assert_bad_input, digits_example, make_model, save

REQUIRE_EMU = os.environ.get("EDGECOMP_REQUIRE_EMU") == "1"
EXAMPLE = Path(edgecomp.__file__).parent / "examples" / "firmware"
NAME = "digits_cnn"


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


@pytest.fixture(scope="module")
def arm64_ready():
    why = None
    try:
        runtime_site("aarch64")
        for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64", "cmake"):
            if shutil.which(tool) is None:
                why = f"{tool} is not installed"
        if why is None:
            why = runner_command("aarch64")[1]
    except InputError as err:
        why = str(err)
    if why:
        if REQUIRE_EMU:
            pytest.fail(f"EDGECOMP_REQUIRE_EMU=1 but {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def fw_host(tmp_path_factory):
    _need("g++", "cmake")
    return edgecomp.build(example="digits", target="host", output=tmp_path_factory.mktemp("fw") / "digits-host", emit="firmware")


@pytest.fixture(scope="module")
def fw_arm64(tmp_path_factory, arm64_ready):
    return edgecomp.build(example="digits", target="arm64", output=tmp_path_factory.mktemp("fw") / "digits-arm64", emit="firmware")


@pytest.fixture(scope="module")
def test_split():
    ex = digits_example()
    x = ex.split("test")[0].astype(np.float32)
    sess = ort.InferenceSession(str(ex.model_path), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])
    return x, ref


def _cmake_build(src: Path, build: Path, firmware: Path, *extra: str) -> None:
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), f"-DCMAKE_PREFIX_PATH={firmware}", *extra],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, text=True)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)


def _check_outputs(out: Path, ref: np.ndarray) -> None:
    got = np.fromfile(out, np.float32).reshape(ref.shape)
    assert np.abs(got - ref).max() <= 1e-4
    assert np.array_equal(got.argmax(1), ref.argmax(1))


def test_manifest_records_firmware_and_its_verification(fw_host):
    fw = fw_host.manifest["firmware"]
    assert fw["name"] == NAME and fw["weights_coding"] == "raw"
    for rel in fw["files"].values():
        assert (fw_host.path / "firmware" / rel).exists()
    for lib in ("libtvm_runtime.so", "libtvm_ffi.so"):
        assert f"firmware/runtime/lib/{lib}" in fw_host.manifest["files"]  # hashed like every file
    assert any(f.startswith("firmware/runtime/licenses/apache-tvm") for f in fw_host.manifest["files"])
    v = fw["verification"]
    assert "natively" in v["ran"] and v["file"]["ok"] and v["linked"]["ok"]
    assert v["file"]["outputs"][0]["max_abs"] <= 1e-4
    header = (fw_host.path / "firmware" / "include" / f"{NAME}.h").read_text()
    assert "#define DIGITS_CNN_INPUT0_SHAPE {1, 1, 8, 8}" in header and "int digits_cnn_run(" in header
    # the bundle with its firmware folder still loads (checksums) and runs
    assert edgecomp.run_bundle(fw_host.path)["logits"].shape[-1] == 10


def test_host_example_with_cmake_matches_ort(fw_host, test_split, tmp_path):
    """The repo's C example, using only the header and the CMake package, on the whole test split."""
    x, ref = test_split
    firmware = fw_host.path / "firmware"
    _cmake_build(EXAMPLE, tmp_path / "build", firmware)
    (tmp_path / "in.bin").write_bytes(x.tobytes())
    r = _run([tmp_path / "build" / "run_model", tmp_path / "in.bin", tmp_path / "out.bin", firmware / "weights" / f"{NAME}.weights"])
    assert r.returncode == 0, r.stderr
    assert f"{len(x)} samples" in r.stdout
    _check_outputs(tmp_path / "out.bin", ref)
    r = _run([tmp_path / "build" / "run_model_linked", tmp_path / "in.bin", tmp_path / "out2.bin"])
    assert r.returncode == 0, r.stderr
    _check_outputs(tmp_path / "out2.bin", ref)


def test_host_example_with_make_fragment(fw_host, test_split, tmp_path):
    _need("make", "cc")
    x, ref = test_split
    mk = fw_host.path / "firmware" / f"{NAME}.mk"
    (tmp_path / "Makefile").write_text(
        f"include {mk}\n"
        f"CFLAGS += $(DIGITS_CNN_CFLAGS) -DEDGECOMP_MODEL={NAME} '-DEDGECOMP_MODEL_HEADER=\"{NAME}.h\"' -DEDGECOMP_LINKED=1\n"
        f"app: {EXAMPLE / 'main.c'}\n\t$(CC) $(CFLAGS) -o $@ $^ $(DIGITS_CNN_LDLIBS_LINKED)\n"
    )
    r = _run(["make", "-C", tmp_path, "app"])
    assert r.returncode == 0, r.stderr
    (tmp_path / "in.bin").write_bytes(x[:20].tobytes())
    r = _run([tmp_path / "app", tmp_path / "in.bin", tmp_path / "out.bin"])
    assert r.returncode == 0, r.stderr
    _check_outputs(tmp_path / "out.bin", ref[:20])


def test_arm64_example_cross_built_runs_under_qemu(fw_arm64, test_split, tmp_path):
    x, ref = test_split
    firmware = fw_arm64.path / "firmware"
    assert "qemu-aarch64" in fw_arm64.manifest["firmware"]["verification"]["ran"]
    _cmake_build(EXAMPLE, tmp_path / "build", firmware, f"-DCMAKE_TOOLCHAIN_FILE={EXAMPLE / 'aarch64-linux-gnu.cmake'}")
    exe = tmp_path / "build" / "run_model"
    assert exe.read_bytes()[18:20] == (183).to_bytes(2, "little")  # ELF e_machine: aarch64
    (tmp_path / "in.bin").write_bytes(x.tobytes())
    # One TVM thread under qemu-user (as edgecomp's own emulated runs): with two, the program's
    # parallel kernels did not finish in 300 s there (a qemu-user limit; natively they run).
    qemu = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-E", "TVM_NUM_THREADS=1"]
    r = _run([*qemu, exe, tmp_path / "in.bin", tmp_path / "out.bin", firmware / "weights" / f"{NAME}.weights"])
    assert r.returncode == 0, r.stderr
    _check_outputs(tmp_path / "out.bin", ref)
    r = _run([*qemu, tmp_path / "build" / "run_model_linked", tmp_path / "in.bin", tmp_path / "out2.bin"])
    assert r.returncode == 0, r.stderr
    _check_outputs(tmp_path / "out2.bin", ref)


def test_the_cmake_package_refuses_another_architecture(fw_arm64, tmp_path):
    """An arm64 firmware folder found by a host (x86_64) project: a clear CMake error, not a link failure."""
    r = _run(["cmake", "-S", EXAMPLE, "-B", tmp_path / "b", f"-DCMAKE_PREFIX_PATH={fw_arm64.path / 'firmware'}"])
    assert r.returncode != 0 and "was built for aarch64" in r.stderr


@pytest.mark.parametrize("target", ["host", "arm64"])
def test_rebuild_is_byte_identical(target, fw_host, request, tmp_path):
    first = fw_host if target == "host" else request.getfixturevalue("fw_arm64")
    again = edgecomp.build(example="digits", target=target, output=tmp_path / "again", emit="firmware")
    fw_files = {k: v for k, v in first.manifest["files"].items() if k.startswith("firmware/")}
    assert len(fw_files) >= 15
    for rel, info in fw_files.items():
        assert again.manifest["files"][rel]["sha256"] == info["sha256"], rel
        assert (again.path / rel).read_bytes() == (first.path / rel).read_bytes(), rel


def _example(fw_host, tmp_path) -> Path:
    build = tmp_path / "build"
    _cmake_build(EXAMPLE, build, fw_host.path / "firmware")
    return build / "run_model"


def test_corrupted_or_foreign_weights_are_refused(fw_host, test_split, tmp_path):
    x, _ = test_split
    exe = _example(fw_host, tmp_path)
    (tmp_path / "in.bin").write_bytes(x[:2].tobytes())
    good = (fw_host.path / "firmware" / "weights" / f"{NAME}.weights").read_bytes()

    def run(blob: bytes):
        (tmp_path / "w").write_bytes(blob)
        return _run([exe, tmp_path / "in.bin", tmp_path / "out.bin", tmp_path / "w"])

    flipped = bytearray(good)
    flipped[-100] ^= 0x40
    r = run(bytes(flipped))
    assert r.returncode == 1 and "checksum mismatch (corrupted weights)" in r.stderr
    r = run(good[: len(good) // 2])
    assert r.returncode == 1 and "truncated or malformed" in r.stderr
    other = weights_blob([np.zeros((3, 5), np.float32)] * 8)
    r = run(other)
    assert r.returncode == 1 and "tensor 0 has shape (3, 5)" in r.stderr and "weights of another model?" in r.stderr
    r = run(b"not weights at all")
    assert r.returncode == 1 and "bad magic" in r.stderr
    r = _run([exe, tmp_path / "in.bin", tmp_path / "out.bin", tmp_path / "missing.weights"])
    assert r.returncode == 1 and "missing.weights: No such file or directory" in r.stderr


def test_zstd_weights_decompress_at_load(tmp_path, test_split):
    _need("g++", "cmake")
    x, ref = test_split
    res = edgecomp.build(example="digits", target="host", output=tmp_path / "z", emit="firmware", entropy="zstd")
    fw = res.manifest["firmware"]
    assert fw["weights_coding"] == "zstd" and fw["verification"]["file"]["ok"] and fw["verification"]["linked"]["ok"]
    coded = res.path / "firmware" / "weights" / f"{NAME}.weights"
    assert coded.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    _cmake_build(EXAMPLE, tmp_path / "build", res.path / "firmware")
    (tmp_path / "in.bin").write_bytes(x[:30].tobytes())
    r = _run([tmp_path / "build" / "run_model", tmp_path / "in.bin", tmp_path / "out.bin", coded])
    assert r.returncode == 0, r.stderr
    _check_outputs(tmp_path / "out.bin", ref[:30])


def test_raw_library_refuses_zstd_weights(fw_host, tmp_path):
    import zstandard

    exe = _example(fw_host, tmp_path)
    raw = (fw_host.path / "firmware" / "weights" / f"{NAME}.weights").read_bytes()
    (tmp_path / "w.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "in.bin").write_bytes(np.zeros((1, 1, 8, 8), np.float32).tobytes())
    r = _run([exe, tmp_path / "in.bin", tmp_path / "out.bin", tmp_path / "w.zst"])
    assert r.returncode == 1 and "built without zstd" in r.stderr


def test_weights_blob_layout():
    """The layout the C glue reads: header, one 88-byte entry per tensor, 64-aligned data, CRC-32."""
    params = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, -2], np.int8), np.float32(0.5)]
    blob = weights_blob(params)
    magic, version, count, data_offset, data_size, crc = struct.unpack_from("<8sIIQQQ", blob)
    assert (magic, version, count) == (b"EDGEFW01", 1, 3) and data_offset % 64 == 0
    assert crc == zlib.crc32(blob[data_offset:data_offset + data_size])
    for i, p in enumerate(params):
        code, bits, lanes, ndim, *rest = struct.unpack_from("<BBHi8qQQ", blob, 40 + 88 * i)
        shape, (offset, nbytes) = rest[:8], rest[8:]
        a = np.asarray(p)
        assert ndim == a.ndim and tuple(shape[:ndim]) == a.shape and nbytes == a.nbytes and offset % 64 == 0
        assert (code, bits) == ({"f": 2, "i": 0}[a.dtype.kind], a.dtype.itemsize * 8)
        got = np.frombuffer(blob[data_offset + offset:data_offset + offset + nbytes], a.dtype).reshape(a.shape)
        assert np.array_equal(got, a)


def two_output_model() -> onnx.ModelProto:
    """x (float32 2x3) → Relu → a; MatMul(x, W) → b (float32 2x4): two outputs, one weight."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "W")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("MatMul", ["x", "W"], ["b"])],
        "two_out",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])],
        [w],
    )
    return make_model(graph)


def test_several_outputs_and_a_custom_name(tmp_path):
    _need("g++")
    model = save(two_output_model(), tmp_path / "two-out.v2.onnx")
    assert c_name("two-out.v2") == "two_out_v2"
    res = edgecomp.build(model, target="host", output=tmp_path / "b", emit="firmware", firmware_name="tiny")
    v = res.manifest["firmware"]["verification"]
    assert [o["name"] for o in v["file"]["outputs"]] == ["a", "b"] and v["file"]["ok"] and v["linked"]["ok"]
    header = (res.path / "firmware" / "include" / "tiny.h").read_text()
    assert "#define TINY_NUM_OUTPUTS 2" in header and "#define TINY_OUTPUT1_SHAPE {2, 4}" in header


def test_bad_firmware_options(cli, tmp_path):
    out = tmp_path / "out"
    rc, _, err = cli("build", "--example", "digits", "--emit", "firmwear", "-o", out)
    assert_bad_input(rc, err, mentions=["unknown --emit 'firmwear'", "firmware"], output=out)
    rc, _, err = cli("build", "--example", "digits", "--emit", "firmware", "--firmware-name", "9lives", "-o", out)
    assert_bad_input(rc, err, mentions=["--firmware-name '9lives'", "C identifier"], output=out)


def test_missing_aarch64_runtime_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECOMP_EMU_HOME", str(tmp_path / "nowhere"))
    if shutil.which(get_target("arm64").cross_compiler.replace("gcc", "g++")) is None:
        pytest.skip("no aarch64 g++")
    out = tmp_path / "out"
    rc, _, err = cli("build", "--example", "digits", "--target", "arm64", "--emit", "firmware", "-o", out)
    assert_bad_input(rc, err, mentions=["aarch64 TVM runtime libraries", "setup_emu_arm64.sh"], output=out)
