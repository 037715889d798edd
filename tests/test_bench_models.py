"""edgecomp.bench.models: the cheap parts, checked without fetching the big models.

MobileNetV2 and MiniLM need torch, transformers and ~100 MB of weight packages; CI does not install
those, so their recipes are exercised through their deterministic pieces (photo views and split,
sentence splitter) and the digits-cnn fetch, which runs the same fetch/cache/meta code.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from edgecomp.bench import models as bm
from edgecomp.importer import sha256_file
from edgecomp.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def _sample_set(arrays: dict[str, np.ndarray], names: list[str]) -> set[bytes]:
    return {b"".join(arrays[n][i].tobytes() for n in names) for i in range(len(arrays[names[0]]))}


# ---- digits-cnn: the full fetch path --------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return bm.fetch("digits-cnn", cache_dir=tmp_path_factory.mktemp("cache"), quiet=True)


def test_digits_fetch_writes_model_data_and_meta(digits):
    assert digits.folder.name == "digits-cnn"
    meta = json.loads((digits.folder / "meta.json").read_text())
    assert meta == digits.meta
    assert meta["metric"] == "accuracy"
    assert meta["inputs"] == [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert meta["onnx_sha256"] == sha256_file(digits.onnx)
    for f in (digits.onnx, digits.eval, digits.calib):
        assert meta["files"][f.name]["sha256"] == sha256_file(f)
    ev, cal = digits.arrays("eval"), digits.arrays("calib")
    assert set(ev) == set(meta["data_keys"]) == {"input", "label", "ref_logits"}
    assert ev["input"].shape == (360, 1, 1, 8, 8) and ev["input"].dtype == np.float32
    assert cal["input"].shape == (256, 1, 1, 8, 8)
    assert ev["ref_logits"].shape == (360, 1, 10)
    assert meta["splits"] == {"eval": 360, "calib": 256}
    # The reference logits are the model's: accuracy as recorded for the shipped example.
    scores = bm.evaluate("digits-cnn", ev["ref_logits"], ev)
    assert scores["accuracy"] == pytest.approx(0.9777, abs=1e-3)
    assert scores["top1_agreement"] == 1.0 and scores["max_abs_error"] == 0.0


def test_digits_calib_and_eval_are_disjoint(digits):
    ev, cal = digits.arrays("eval"), digits.arrays("calib")
    assert not _sample_set(ev, ["input"]) & _sample_set(cal, ["input"])


def test_digits_feeds_match_the_model(digits):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(digits.onnx), providers=["CPUExecutionProvider"])
    feed = digits.feeds("eval")[0]
    out = sess.run(None, feed)[0]
    np.testing.assert_allclose(out, digits.arrays("eval")["ref_logits"][0], atol=1e-5)


def test_fetch_reuses_a_valid_cache_and_rebuilds_a_damaged_one(digits):
    before = {f: f.stat().st_mtime_ns for f in (digits.onnx, digits.eval, digits.calib)}
    again = bm.fetch("digits-cnn", cache_dir=digits.folder.parent, quiet=True)
    assert {f: f.stat().st_mtime_ns for f in (again.onnx, again.eval, again.calib)} == before
    digits.eval.write_bytes(b"damaged")
    fixed = bm.fetch("digits-cnn", cache_dir=digits.folder.parent, quiet=True)
    assert sha256_file(fixed.eval) == digits.meta["files"]["eval.npz"]["sha256"]  # same bytes again
    assert not list(digits.folder.parent.glob(".digits-cnn.*"))  # no temporary folders left


def test_fetch_force_is_byte_reproducible(digits, tmp_path):
    other = bm.fetch("digits-cnn", cache_dir=tmp_path, force=True, quiet=True)
    assert other.meta["files"] == digits.meta["files"]


def test_unknown_model_is_a_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match="unknown benchmark model 'resnet'.*digits-cnn"):
        bm.fetch("resnet", cache_dir=tmp_path)


def test_registry_records():
    assert set(bm.BENCH_MODELS) == {"digits-cnn", "mobilenetv2", "minilm"}
    assert bm.BENCH_MODELS["minilm"].inputs == ("input_ids", "attention_mask")
    assert bm.BENCH_MODELS["mobilenetv2"].metric == "top1_agreement"
    for model in bm.BENCH_MODELS.values():
        assert callable(model.build)
        torch_reqs = [r for r in model.requires if r.module == "torch"]
        assert all(not r.auto_install for r in torch_reqs)  # never pip install torch


def test_missing_packages_give_one_line_errors(monkeypatch):
    monkeypatch.setenv("EDGECOMP_BENCH_NO_INSTALL", "1")
    needs = bm.Requirement("edgecomp_no_such_module", ("--no-deps", "no-such-pkg"), "for a test")
    optional = bm.Requirement("edgecomp_no_such_labels", ("no-such-labels",), "labels", optional=True)
    model = bm.BENCH_MODELS["digits-cnn"]
    fake = bm.BenchModel(**{**model.__dict__, "name": "fake", "requires": (optional,)})
    assert bm.ensure_requirements(fake, log=lambda m: None) == ["edgecomp_no_such_labels"]
    fake = bm.BenchModel(**{**model.__dict__, "name": "fake", "requires": (optional, needs)})
    with pytest.raises(InputError, match=r"fake needs edgecomp_no_such_module .*pip install --no-deps no-such-pkg$"):
        bm.ensure_requirements(fake, log=lambda m: None)
    torch_like = bm.Requirement("edgecomp_no_such_torch", ("torch==2.13.0",), "export", auto_install=False)
    monkeypatch.delenv("EDGECOMP_BENCH_NO_INSTALL")
    fake = bm.BenchModel(**{**model.__dict__, "name": "fake", "requires": (torch_like,)})
    with pytest.raises(InputError, match="CPU build"):  # torch is never pip-installed
        bm.ensure_requirements(fake, log=lambda m: None)


def test_tool_list_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["models.py", "list", "--cache", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "tools" / "models.py"), run_name="__main__")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "mobilenetv2" in out and "not fetched" in out


# ---- minilm data: the sentence splitter ------------------------------------------------------


def test_pydoc_sentences_are_many_unique_and_deterministic():
    first = bm.pydoc_sentences()
    assert first == bm.pydoc_sentences()
    assert len(first) >= 500 + 128
    assert len({" ".join(s.casefold().split()) for s in first}) == len(first)
    for s in first:
        assert bm.MIN_WORDS <= len(s.split()) <= bm.MAX_WORDS
        assert s[0].isupper() and s.endswith(".") and ">>>" not in s


def test_sentence_splits_are_disjoint_and_stable():
    ev, cal = bm.sentence_splits()
    assert len(ev) == 512 and len(cal) == 128
    assert not set(ev) & set(cal)
    assert (ev, cal) == bm.sentence_splits()


def test_split_sentences_drops_code_and_headings():
    text = ("Customizing things\n******************\n\nThe following methods can be defined to customize\n"
            "   the meaning of attribute access.  Short one.\n\n   >>> print('This is an example.')\n"
            "   This is an example.\n\nx = f(a, b) == g(c) if it is true.\n")
    assert bm.split_sentences(text) == [
        "The following methods can be defined to customize the meaning of attribute access."]


# ---- mobilenetv2 data: photo views and the photo split ---------------------------------------


def _image(w: int, h: int):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(300, 451), (640, 427)])  # portrait (chelsea) and landscape
def test_photo_views_are_deterministic_imagenet_crops(size):
    image = _image(*size)
    views = bm.photo_views(image)
    again = bm.photo_views(image)
    assert [n for n, _ in views] == [n for n, _ in again]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(views, again))
    names = [n for n, _ in views]
    assert len(views) == 20 == len(set(names))
    assert all(a.shape == (3, 224, 224) and a.dtype == np.float32 for _, a in views)
    d = dict(views)
    np.testing.assert_array_equal(d["s256-center-flip"], d["s256-center"][:, :, ::-1])
    # s256-center is the standard transform: shorter side 256, center 224, /255, mean/std.
    from PIL import Image

    w, h = size
    rw, rh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    small = np.asarray(image.resize((rw, rh), Image.Resampling.BILINEAR), np.float32) / 255
    top, left = round((rh - 224) / 2), round((rw - 224) / 2)
    want = (small[top:top + 224, left:left + 224].transpose(2, 0, 1) - bm.IMAGENET_MEAN) / bm.IMAGENET_STD
    np.testing.assert_allclose(d["s256-center"], want, atol=1e-6)


def test_grayscale_photos_become_three_equal_channels():
    Image = pytest.importorskip("PIL.Image")
    gray = Image.fromarray(np.arange(300 * 400, dtype=np.uint32).reshape(300, 400).astype(np.uint8), "L")
    x = dict(bm.photo_views(gray))["s320-top-left"]
    # equal channels before normalisation
    raw = x * bm.IMAGENET_STD + bm.IMAGENET_MEAN
    np.testing.assert_allclose(raw[0], raw[1], atol=1e-6)
    np.testing.assert_allclose(raw[1], raw[2], atol=1e-6)


def test_photos_split_disjointly_by_source_and_scene():
    ev, cal = bm.split_photos()
    assert ev and cal
    assert not {p.name for p in ev} & {p.name for p in cal}
    assert not {p.group for p in ev} & {p.group for p in cal}  # e.g. the motorcycle stereo pair
    assert sorted(p.name for p in ev + cal) == sorted(p.name for p in bm.PHOTOS)
    assert len({p.name for p in bm.PHOTOS}) == len(bm.PHOTOS)
    assert bm.CALIB_PHOTO_GROUPS <= {p.group for p in bm.PHOTOS}
    assert {"chelsea", "astronaut", "grace_hopper"} <= {p.name for p in ev}  # sanity-check photos


# ---- metrics --------------------------------------------------------------------------------


def test_classification_metrics():
    ref = np.array([[[2.0, 1.0, 0.0]], [[0.0, 1.0, 3.0]]], np.float32)
    same = bm.classification_metrics(ref, ref, labels=np.array([0, 1]))
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    assert same["accuracy"] == 0.5 and same["max_abs_error"] == 0.0
    flipped = bm.classification_metrics(ref[:, :, ::-1], ref)
    assert flipped["top1_agreement"] == 0.0 and flipped["mean_kl"] > 0 and flipped["max_abs_error"] == 3.0


def test_embedding_metrics_and_spearman():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((20, 1, 8))
    m = bm.embedding_metrics(ref * 3.0, ref)  # scale does not change cosine or rankings
    assert m["min_cosine"] == pytest.approx(1.0) and m["pairwise_spearman"] == pytest.approx(1.0)
    noisy = bm.embedding_metrics(ref + 0.5 * rng.standard_normal(ref.shape), ref)
    assert noisy["min_cosine"] < 0.99 and 0 < noisy["pairwise_spearman"] < 1
    assert bm.spearman([1, 2, 2, 3], [10, 20, 20, 30]) == pytest.approx(1.0)  # ties averaged
    assert bm.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
