"""Bundles are checked when loaded: modified, missing or extra files are refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgecomp
from edgecomp.bundle import staged_output


@pytest.fixture
def bundle_copy(digits_host_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(digits_host_bundle.path, dst)
    return dst


def test_untouched_copy_runs_and_matches_reference(bundle_copy):
    b = edgecomp.load_bundle(bundle_copy)
    try:
        ref_in, ref_out = b.reference()
    finally:
        b.close()
    out = edgecomp.run_bundle(bundle_copy)  # default: the bundle's own reference inputs
    assert out["logits"].shape == ref_out["logits"].shape == (8, 1, 10)
    assert np.max(np.abs(out["logits"] - ref_out["logits"])) <= 1e-4


@pytest.mark.parametrize("victim", ["weights.npz", "model.so", "reference/outputs.npz"])
def test_modified_file_is_refused(bundle_copy, victim):
    path = bundle_copy / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    with pytest.raises(edgecomp.BundleError, match=f"checksum mismatch for {victim}"):
        edgecomp.run_bundle(bundle_copy)


def test_missing_and_extra_files_are_refused(bundle_copy):
    (bundle_copy / "evil.so").write_bytes(b"\x7fELF")
    with pytest.raises(edgecomp.BundleError, match="unexpected file evil.so"):
        edgecomp.load_bundle(bundle_copy)
    (bundle_copy / "evil.so").unlink()
    (bundle_copy / "weights.npz").unlink()
    with pytest.raises(edgecomp.BundleError, match="weights.npz .* missing"):
        edgecomp.load_bundle(bundle_copy)


def test_manifest_problems_are_clear(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(edgecomp.BundleError, match="format version 99"):
        edgecomp.load_bundle(bundle_copy)
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(edgecomp.BundleError, match="not valid JSON"):
        edgecomp.load_bundle(bundle_copy)


def test_tar_bundle_round_trip_and_tamper(digits_host_bundle, tmp_path):
    out = tmp_path / "d.tar"
    edgecomp.build(example="digits", target="host", output=out)
    ref = edgecomp.run_bundle(digits_host_bundle.path)["logits"]
    np.testing.assert_allclose(edgecomp.run_bundle(out)["logits"], ref, atol=1e-6)
    data = bytearray(out.read_bytes())
    i = data.find(b"PK\x03\x04") + 200  # inside the first .npz member
    data[i] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(edgecomp.BundleError, match="checksum mismatch"):
        edgecomp.run_bundle(out)


def test_staged_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(RuntimeError):
        with staged_output(out) as stage:
            (stage / "half-written").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # An existing bundle survives a failed --force rebuild untouched.
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "edgecomp-bundle"}))
    (out / "keep").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with staged_output(out, force=True) as stage:
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["b"] and (out / "keep").read_text() == "old"
