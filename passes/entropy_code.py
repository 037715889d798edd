"""Entropy coding of a bundle's weights, and the Shannon bound it is measured against.

The last compression stage is lossless: the weights file is coded with zstd (or, where it gets
closer to the bound, rANS from ``constriction``). Choices are made by measurement, per dtype group:

- **layout**: tensors grouped by dtype in one frame, or one frame per tensor sharing a trained
  zstd dictionary (dictionaries pay for many small frames, not for one large one);
- **byte shuffle**: multi-byte values split into byte planes (all first bytes, then all second
  bytes ...), which puts float exponents next to each other;
- **level**: zstd levels are tried on a sample of the group and the smallest output wins (a
  faster level wins ties within 0.5%).

The bound reported per tensor is the order-0 (memoryless) Shannon entropy of the symbols a
byte-oriented coder sees: the values themselves for 1-byte dtypes, the byte planes for wider ones.
It does not count the cost of describing the distribution, so no coder reaches it on small
tensors; rANS with a per-tensor histogram gets within that table's size of it.

The container is ``MAGIC``, a little-endian u32 header length, a zstd-coded JSON header, then the
frames. The
header lists every tensor (key, dtype, shape, sha256 of its raw bytes) and every frame; decoding
checks each tensor's sha256, so a corrupted file is refused, never silently loaded.

Pure functions, no file I/O (``edgecomp.bundle`` reads and writes the file).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any

import numpy as np

from edgecomp.errors import BundleError, InputError

__all__ = ["CODECS", "MAGIC", "encode", "decode", "order0_bits", "symbol_bits"]

MAGIC = b"EDGECW1\n"
CODECS = ("zstd", "ans")
LEVELS = (3, 9, 15, 19, 22)
_SAMPLE_BYTES = 2 << 20
_DICT_BYTES = 16 << 10


def _digest(raw: bytes) -> str:
    """Per-tensor check of the decoder's output: the first 64 bits of sha256 (the whole file's
    sha256 is in the bundle manifest; this catches a decoder or frame gone wrong)."""
    return hashlib.sha256(raw).hexdigest()[:16]


def _symbols(raw: bytes, itemsize: int, shuffle: bool) -> bytes:
    if not shuffle or itemsize == 1:
        return raw
    return np.frombuffer(raw, np.uint8).reshape(-1, itemsize).T.tobytes()


def _unshuffle(data: bytes, itemsize: int, shuffle: bool) -> bytes:
    if not shuffle or itemsize == 1:
        return data
    return np.frombuffer(data, np.uint8).reshape(itemsize, -1).T.tobytes()


def order0_bits(values: np.ndarray) -> float:
    """Total order-0 Shannon information of ``values`` (bits): n·H(empirical distribution)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    if flat.size == 0:
        return 0.0
    _, counts = np.unique(flat, return_counts=True)
    p = counts / flat.size
    return float(-(counts * np.log2(p)).sum())


def symbol_bits(array: np.ndarray) -> float:
    """The bound used in reports: order-0 bits of the values (1-byte dtypes) or of each byte
    plane (wider dtypes), i.e. of the symbols a byte-oriented coder works on."""
    a = np.ascontiguousarray(array)
    if a.dtype.itemsize == 1:
        return order0_bits(a.view(np.uint8))
    planes = a.view(np.uint8).reshape(-1, a.dtype.itemsize)
    return float(sum(order0_bits(planes[:, i]) for i in range(a.dtype.itemsize)))


# -- zstd ------------------------------------------------------------------------------------------
def _zstd():
    import zstandard

    return zstandard


def _sample(raws: list[bytes], itemsize: int, budget: int = _SAMPLE_BYTES) -> list[bytes]:
    """Whole tensors of the group picked at random (seeded), about ``budget`` bytes in all; when
    the first pick alone is larger, it is cut at an element boundary. ``raws`` itself if small."""
    if sum(map(len, raws)) <= budget:
        return raws
    picked: list[bytes] = []
    total = 0
    for i in np.random.default_rng(0).permutation(len(raws)):
        raw = raws[i]
        if total + len(raw) > budget:
            if total:
                continue
            raw = raw[: budget - budget % itemsize]
        picked.append(raw)
        total += len(raw)
    return picked


def _per_tensor(z, syms: list[bytes], level: int) -> tuple[list[bytes], bytes] | None:
    """One frame per tensor with a dictionary trained on the group (None if it cannot train)."""
    if len(syms) < 8:  # too few samples to train a dictionary on
        return None
    try:
        chunks = [s[i:i + 4096] for s in syms for i in range(0, len(s), 4096)]
        d = z.train_dictionary(_DICT_BYTES, chunks, level=level)
    except z.ZstdError:
        return None
    c = z.ZstdCompressor(level=level, dict_data=d)
    return [c.compress(s) for s in syms], d.as_bytes()


def _zstd_group(raws: list[bytes], itemsize: int) -> dict[str, Any]:
    """The smallest zstd coding of one dtype group. Shuffle, level and layout are chosen on a
    sample of the group's tensors (about 2 MiB), then the whole group is coded once."""
    z = _zstd()
    sample = _sample(raws, itemsize)
    trials: dict[tuple[bool, int], int] = {}
    for shuffle in ((False, True) if itemsize > 1 else (False,)):
        data = b"".join(_symbols(r, itemsize, shuffle) for r in sample)
        for lv in LEVELS:
            trials[(shuffle, lv)] = len(z.ZstdCompressor(level=lv).compress(data))
    smallest = min(trials.values())
    shuffle, level = min((k for k, n in trials.items() if n <= smallest * 1.005), key=lambda k: (k[1], k[0]))
    part = [_symbols(r, itemsize, shuffle) for r in sample]
    grouped = len(z.ZstdCompressor(level=level).compress(b"".join(part)))
    per_tensor = _per_tensor(z, part, level)
    use_dict = per_tensor is not None and sum(map(len, per_tensor[0])) + len(per_tensor[1]) < grouped
    syms = part if sample is raws else [_symbols(r, itemsize, shuffle) for r in raws]
    if use_dict and sample is not raws:
        per_tensor = _per_tensor(z, syms, level)
    if use_dict and per_tensor is not None:
        frames, dict_bytes, layout = per_tensor[0], per_tensor[1], "per-tensor"
    else:
        frames, dict_bytes, layout = [z.ZstdCompressor(level=level).compress(b"".join(syms))], b"", "grouped"
    tried = {f"{'shuffled' if sh else 'plain'}@{lv}": n for (sh, lv), n in trials.items()}
    return {"layout": layout, "frames": frames, "dict": dict_bytes, "shuffle": shuffle, "level": level,
            "levels_tried": tried, "bytes": sum(map(len, frames)) + len(dict_bytes)}


# -- rANS (constriction) ---------------------------------------------------------------------------
def _ans_encode(sym: bytes) -> tuple[bytes, list[int]]:
    """rANS over one byte stream with its own histogram (stored, 256 × u32)."""
    import constriction

    data = np.frombuffer(sym, np.uint8).astype(np.int32)
    counts = np.bincount(data, minlength=256)
    if data.size == 0:
        return b"", counts.tolist()
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(data, model)
    return coder.get_compressed().tobytes(), counts.tolist()


def _ans_decode(frame: bytes, counts: list[int], n: int) -> bytes:
    import constriction

    if n == 0:
        return b""
    counts_a = np.asarray(counts, np.float64)
    model = constriction.stream.model.Categorical(counts_a / counts_a.sum(), perfect=False)
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(frame, np.uint32).copy())
    return coder.decode(model, n).astype(np.uint8).tobytes()


def _pack_counts(counts: list[int]) -> bytes:
    """A histogram as a 32-byte bitmap of the symbols present and a u32 count for each."""
    c = np.asarray(counts, np.uint32)
    return np.packbits(c > 0).tobytes() + c[c > 0].astype("<u4").tobytes()


def _unpack_counts(blob: bytes) -> list[int]:
    present = np.unpackbits(np.frombuffer(blob[:32], np.uint8)).astype(bool)
    counts = np.zeros(256, np.int64)
    counts[present] = np.frombuffer(blob[32:], "<u4")
    return counts.tolist()


def _ans_group(raws: list[bytes], itemsize: int) -> dict[str, Any]:
    """One ANS stream per tensor and byte plane (planes of a float have very different stats),
    each preceded by its histogram."""
    frames = []
    for raw in raws:
        planes = np.frombuffer(raw, np.uint8).reshape(-1, itemsize)
        for i in range(itemsize):
            f, counts = _ans_encode(planes[:, i].tobytes())
            frames += [_pack_counts(counts), f]
    return {"layout": "per-tensor-plane", "frames": frames, "shuffle": True, "bytes": sum(len(f) for f in frames)}


# -- the container ---------------------------------------------------------------------------------
def encode(arrays: dict[str, np.ndarray], codec: str = "zstd") -> tuple[bytes, dict[str, Any]]:
    """Code ``arrays`` (in order); returns the file's bytes and a report (sizes vs the bound)."""
    if codec not in CODECS:
        raise InputError(f"unknown entropy coder {codec!r} (known: {', '.join(CODECS)})")
    if codec == "ans":
        try:
            import constriction  # noqa: F401
        except ImportError:
            raise InputError("entropy coder 'ans' needs the constriction package (pip install constriction)") from None
    groups: dict[str, list[str]] = {}
    for key, a in arrays.items():
        groups.setdefault(np.asarray(a).dtype.str, []).append(key)
    header: dict[str, Any] = {"codec": codec, "tensors": [], "groups": []}
    payload: list[bytes] = []
    offset = 0
    report_tensors = []
    tried: dict[str, Any] = {}
    for dtype, keys in groups.items():
        raws = [np.ascontiguousarray(arrays[k]).tobytes() for k in keys]
        itemsize = np.dtype(dtype).itemsize
        chosen = _zstd_group(raws, itemsize) if codec == "zstd" else _ans_group(raws, itemsize)
        frames = []
        blobs = ([chosen["dict"]] if chosen.get("dict") else []) + chosen["frames"]
        for blob in blobs:
            frames.append([offset, len(blob)])
            payload.append(blob)
            offset += len(blob)
        group = {k: chosen[k] for k in ("layout", "shuffle") if k in chosen}
        group.update(dtype=dtype, keys=keys, frames=frames, has_dict=bool(chosen.get("dict")))
        if "level" in chosen:
            group["level"] = chosen["level"]
        tried[dtype] = chosen.get("levels_tried")
        header["groups"].append(group)
        for k, raw in zip(keys, raws):
            a = np.asarray(arrays[k])
            header["tensors"].append({"key": k, "dtype": dtype, "shape": list(a.shape),
                                      "sha256": _digest(raw)})
            report_tensors.append({"key": k, "dtype": a.dtype.name, "shape": list(a.shape), "bytes": len(raw),
                                   "bound_bytes": math.ceil(symbol_bits(a) / 8),
                                   "value_entropy_bits": round(abs(order0_bits(a)) / max(1, a.size), 4)})
    order = {k: i for i, k in enumerate(arrays)}
    header["tensors"].sort(key=lambda t: order[t["key"]])
    # The header (names, shapes, digests) is JSON, itself zstd-coded: ~40 B per tensor instead of ~90.
    head = _zstd().ZstdCompressor(level=19).compress(json.dumps(header, separators=(",", ":")).encode())
    blob = MAGIC + struct.pack("<I", len(head)) + head + b"".join(payload)
    raw_total = sum(t["bytes"] for t in report_tensors)
    bound_total = sum(t["bound_bytes"] for t in report_tensors)
    report = {
        "codec": codec,
        "raw_bytes": raw_total,
        "coded_bytes": len(blob),
        "header_bytes": len(MAGIC) + 4 + len(head),
        "bound_bytes": bound_total,
        "ratio": round(raw_total / max(1, len(blob)), 4),
        "vs_bound": round(len(blob) / max(1, bound_total), 4),
        "groups": [
            {k: g[k] for k in ("layout", "shuffle", "level", "has_dict") if k in g}
            | {"dtype": np.dtype(g["dtype"]).name, "levels_tried": tried.get(g["dtype"]), "tensors": len(g["keys"]), "coded_bytes": sum(n for _, n in g["frames"]),
               "raw_bytes": sum(t["bytes"] for t in report_tensors if t["key"] in set(g["keys"])),
               "bound_bytes": sum(t["bound_bytes"] for t in report_tensors if t["key"] in set(g["keys"]))}
            for g in header["groups"]
        ],
        "tensors": report_tensors,
    }
    return blob, report


def decode(blob: bytes, where: str = "weights") -> dict[str, np.ndarray]:
    """The arrays of an ``encode``d file; every tensor's sha256 is checked (BundleError if not)."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise BundleError(f"{where}: not an edgecomp coded weights file")
    (n,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(_zstd().ZstdDecompressor().decompress(blob[start:start + n], max_output_size=1 << 28))
    except Exception:
        raise BundleError(f"{where}: corrupted header") from None
    body = memoryview(blob)[start + n:]
    specs = {t["key"]: t for t in header["tensors"]}
    out: dict[str, np.ndarray] = {}
    try:
        for g in header["groups"]:
            frames = [bytes(body[o:o + ln]) for o, ln in g["frames"]]
            raws = _decode_group(header["codec"], g, frames, specs)
            for key, raw in zip(g["keys"], raws):
                spec = specs[key]
                if _digest(raw) != spec["sha256"]:
                    raise BundleError(f"{where}: tensor {key} decodes to the wrong bytes (checksum mismatch)")
                out[key] = np.frombuffer(raw, np.dtype(spec["dtype"])).reshape(spec["shape"]).copy()
    except BundleError:
        raise
    except Exception as err:  # zstd/ANS errors on corrupted frames
        raise BundleError(f"{where}: cannot decode ({type(err).__name__}: {err})") from None
    return {t["key"]: out[t["key"]] for t in header["tensors"]}


def _decode_group(codec: str, g: dict, frames: list[bytes], specs: dict) -> list[bytes]:
    itemsize = np.dtype(g["dtype"]).itemsize
    sizes = [int(np.prod(specs[k]["shape"], dtype=np.int64)) * itemsize for k in g["keys"]]
    if codec == "ans":
        raws = []
        it = iter(frames)
        for size in sizes:
            planes = []
            for _ in range(itemsize):
                counts = _unpack_counts(next(it))
                planes.append(np.frombuffer(_ans_decode(next(it), counts, size // itemsize), np.uint8))
            raws.append(np.stack(planes, axis=1).tobytes() if planes else b"")
        return raws
    z = _zstd()
    if g["layout"] == "grouped":
        joined = z.ZstdDecompressor().decompress(frames[0], max_output_size=sum(sizes))
        syms, pos = [], 0
        for size in sizes:
            syms.append(joined[pos:pos + size])
            pos += size
    else:
        d = z.ZstdCompressionDict(frames[0]) if g["has_dict"] else None
        dec = z.ZstdDecompressor(dict_data=d) if d is not None else z.ZstdDecompressor()
        body = frames[1:] if g["has_dict"] else frames
        syms = [dec.decompress(f, max_output_size=size) for f, size in zip(body, sizes)]
    return [_unshuffle(s, itemsize, g["shuffle"]) for s in syms]
