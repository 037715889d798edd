"""Entropy coding of the weights: bit-exact round trips, the Shannon bound, corrupted files refused."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

import edgecomp
from edgecomp.errors import BundleError, InputError
from edgecomp.passes.entropy_code import decode, encode, order0_bits, symbol_bits


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = np.clip(np.round(rng.laplace(0, 6, (64, 128))), -127, 127).astype(np.int8)
    q[rng.random(q.shape) < 0.6] = 0  # pruned: most weights are zero
    return {
        "w_int8": q,
        "w_fp32": (rng.standard_normal((96, 64)) * 0.05).astype(np.float32),
        "bias": rng.standard_normal(64).astype(np.float32),
        "ids": rng.integers(0, 5, 300).astype(np.int64),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        **{f"small{i}": rng.standard_normal(16).astype(np.float16) for i in range(10)},
    }


@pytest.mark.parametrize("codec", ["zstd", "ans"])
def test_round_trip_is_bit_exact(codec):
    w = weights()
    blob, report = encode(w, codec)
    back = decode(blob)
    assert list(back) == list(w)  # order kept
    for k, a in w.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape
        assert back[k].tobytes() == a.tobytes(), k
    assert report["coded_bytes"] == len(blob)
    assert report["raw_bytes"] == sum(a.nbytes for a in w.values())


def test_round_trip_keeps_nan_inf_and_negative_zero():
    a = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45], np.float32)
    back = decode(encode({"a": a}, "zstd")[0])["a"]
    assert back.tobytes() == a.tobytes()


def test_order0_entropy_matches_hand_computation():
    a = np.array([0, 0, 0, 0, 1, 1, 2, 3], np.int8)  # p = 1/2, 1/4, 1/8, 1/8 → H = 1.75 bits
    assert order0_bits(a) == pytest.approx(8 * 1.75)
    assert order0_bits(np.zeros(100, np.int8)) == 0.0
    f = np.array([1.0, 1.0, 2.0, 2.0], np.float32)  # byte planes: 3 constant-ish planes
    planes = f.view(np.uint8).reshape(-1, 4)
    expected = sum(order0_bits(planes[:, i]) for i in range(4))
    assert symbol_bits(f) == pytest.approx(expected)


def test_coders_approach_the_bound_on_large_tensors():
    """On one large, skewed int8 tensor the bound is achievable: rANS within 1%, zstd within 10%."""
    rng = np.random.default_rng(1)
    q = np.clip(np.round(rng.laplace(0, 4, 400_000)), -127, 127).astype(np.int8)
    bound = symbol_bits(q) / 8
    ans = encode({"q": q}, "ans")[1]
    zst = encode({"q": q}, "zstd")[1]
    assert ans["bound_bytes"] == math.ceil(bound)
    ans_payload = ans["coded_bytes"] - ans["header_bytes"]
    zstd_payload = zst["coded_bytes"] - zst["header_bytes"]
    assert bound <= ans_payload <= 1.01 * bound + 300  # + the 256-entry histogram
    assert bound <= zstd_payload <= 1.10 * bound
    assert zstd_payload < q.nbytes * 0.6  # ~4.1 bits per value instead of 8


def test_zstd_choices_are_recorded():
    _, report = encode(weights(), "zstd")
    by_dtype = {g["dtype"]: g for g in report["groups"]}
    assert set(by_dtype) == {"int8", "float32", "int64", "float16"}
    for g in report["groups"]:
        assert g["level"] in (3, 9, 15, 19, 22)
        assert g["layout"] in ("grouped", "per-tensor")
        assert g["levels_tried"]
    assert by_dtype["int8"]["shuffle"] is False  # nothing to shuffle in 1-byte values


@pytest.mark.parametrize("where", ["header", "payload", "truncated"])
def test_corrupted_blob_is_refused(where):
    blob = bytearray(encode(weights(), "zstd")[0])
    if where == "header":
        blob[12] ^= 0xFF
    elif where == "payload":
        blob[-200] ^= 0x10
    else:
        del blob[-50:]
    with pytest.raises(BundleError):
        decode(bytes(blob), where="w")


def test_unknown_codec():
    with pytest.raises(InputError, match="unknown entropy coder"):
        encode(weights(), "gzip")


@pytest.fixture(scope="module")
def coded_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("ec") / "digits-zstd"
    return edgecomp.build(example="digits", output=out, passes="shape,fold,dce,shape,zstd")


def test_bundle_with_coded_weights_runs_like_the_plain_one(coded_bundle, digits_host_bundle):
    m = coded_bundle.manifest
    assert m["runtime"]["weights"] == "weights.coded" and "weights.npz" not in m["files"]
    ec = m["entropy_coding"]
    assert ec["codec"] == "zstd" and ec["coded_bytes"] == m["files"]["weights.coded"]["bytes"]
    assert ec["coded_bytes"] < ec["raw_bytes"]
    plain = edgecomp.run_bundle(digits_host_bundle.path)
    coded = edgecomp.run_bundle(coded_bundle.path)
    np.testing.assert_array_equal(plain["logits"], coded["logits"])


def test_corrupted_coded_weights_file_is_refused(coded_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(coded_bundle.path, dst)
    path = dst / "weights.coded"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for weights.coded"):
        edgecomp.run_bundle(dst)
    # and with the manifest's checksum made to match, the per-tensor check still refuses it
    m = json.loads((dst / "manifest.json").read_text())
    import hashlib

    m["files"]["weights.coded"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="weights.coded"):
        edgecomp.run_bundle(dst)


@pytest.mark.parametrize("passes, msg", [("zstd,shape", "comes last"), ("shape,zstd,ans", "one entropy coder")])
def test_entropy_coder_placement_in_passes(passes, msg, tmp_path):
    with pytest.raises(InputError, match=msg):
        edgecomp.build(example="digits", output=tmp_path / "x", passes=passes)
    assert not (tmp_path / "x").exists()
