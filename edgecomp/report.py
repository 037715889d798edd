"""The human report of a build (``report.md`` in the bundle), made from the manifest alone."""

from __future__ import annotations

from typing import Any

__all__ = ["render_report", "layer_table"]

# Per-layer fields too long for a table row (kept in the manifest, drawn in report.html).
_NOT_TABULATED = ("spectrum",)


def _cell(value: Any, key: str = "") -> str:
    """A layer record's value as table text: shapes as ``64×512``, other ``[before, after]``
    pairs as ``before → after``."""
    if key.endswith("shape") and isinstance(value, (list, tuple)):
        return "×".join(str(d) for d in value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"{_cell(value[0])} → {_cell(value[1])}"
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def layer_table(layers: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a pass's per-layer records, whatever fields that pass records."""
    header = [k for k in dict.fromkeys(k for layer in layers for k in layer) if k not in _NOT_TABULATED]
    return header, [[_cell(layer.get(k), k) for k in header] for layer in layers]


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _numerics(check: dict[str, Any]) -> str:
    parts = []
    for o in check["outputs"]:
        s = f"`{o['name']}` max\\|err\\| {o['max_abs']:.2e}, cos {o['min_cosine']:.6f}"
        if o.get("top1") is not None:
            s += f", top-1 {o['top1']:.3f}"
        parts.append(s)
    return "; ".join(parts)


def _entropy_section(ec: dict[str, Any] | None) -> list[str]:
    """The coded weights file against its order-0 Shannon bound, per dtype group and tensor."""
    if not ec:
        return []
    lines = [
        "", f"## Entropy coding of the weights ({ec['codec']})", "",
        f"- {ec['raw_bytes']:,} B of weights → {ec['coded_bytes']:,} B coded ({ec['ratio']:.2f}x), "
        f"of which {ec['header_bytes']:,} B header; order-0 Shannon bound {ec['bound_bytes']:,} B "
        f"(coded / bound = {ec['vs_bound']:.3f})",
        "",
        "| dtype | tensors | layout | byte shuffle | level | raw | coded | bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in ec["groups"]:
        lines.append(
            f"| {g['dtype']} | {g['tensors']} | {g.get('layout', '–')} | {g.get('shuffle', '–')} | "
            f"{g.get('level', '–')} | {g['raw_bytes']:,} | {g['coded_bytes']:,} | {g['bound_bytes']:,} |"
        )
    big = sorted(ec.get("tensors", []), key=lambda t: -t["bytes"])[:10]
    if big:
        lines += ["", "Largest tensors (the bound counts the symbols a byte coder sees: values for 1-byte "
                  "dtypes, byte planes for wider ones):", "",
                  "| tensor | dtype | shape | raw | bound | value entropy (bits/value) |", "|---|---|---|---|---|---|"]
        lines += [f"| {t['key']} | {t['dtype']} | {'×'.join(map(str, t['shape']))} | {t['bytes']:,} | "
                  f"{t['bound_bytes']:,} | {t['value_entropy_bits']} |" for t in big]
    return lines


def _firmware_section(fw: dict[str, Any] | None) -> list[str]:
    if not fw:
        return []
    files = fw["files"]
    lines = [
        "", f"## Firmware (`firmware/`, C name `{fw['name']}`)", "",
        f"- C API: `{files['header']}`; static library `{files['library']}` (model + glue), linked-in weights "
        f"`{files['weights_library']}`; weights file `{files['weights']}` ({fw['weights_coding']}, {fw['weights_bytes']:,} B)",
        f"- CMake: `find_package({fw['name']})` from `{files['cmake']}`; Make: `include {files['make']}`; "
        f"runtime libraries in `{files['runtime']}` ({', '.join(f'{k} {v}' for k, v in fw['runtime'].items())})",
    ]
    v = fw.get("verification") or {}
    if v.get("ran"):
        lines.append(f"- verified: {v['ran']}")
        for how in ("file", "linked"):
            if v.get(how):
                status = "PASS" if v[how]["ok"] else "FAIL"
                lines.append(f"  - weights {how}: {status} on {v[how]['samples']} reference sample(s), {_numerics(v[how])}")
    else:
        lines.append(f"- not run here: {v.get('skipped', 'unknown')}")
    return lines


def render_report(m: dict[str, Any]) -> str:
    t = m["target"]
    lines = [
        f"# edgecomp bundle: {m['model']['name']} for {t['name']}",
        "",
        f"- source model: `{m['model']['path']}` (sha256 `{m['model']['sha256'][:16]}…`)",
        f"- target: **{t['name']}** ({t['arch']}), TVM target `{t['tvm_target']}`",
        f"- built {m['created']} with edgecomp {m['tools'].get('edgecomp')}, TVM {m['tools'].get('apache-tvm')}",
        "",
        "## Inputs and outputs",
        "",
        "| kind | name | shape | dtype |",
        "|---|---|---|---|",
    ]
    for kind in ("inputs", "outputs"):
        for s in m[kind]:
            lines.append(f"| {kind[:-1]} | `{s['name']}` | {s['shape']} | {s['dtype']} |")
    lines += ["", "## Passes (each checked against ONNX Runtime on the original model)", ""]
    if m["passes"]:
        lines += ["| pass | changed | nodes | params | time | numerics |", "|---|---|---|---|---|---|"]
        for p in m["passes"]:
            lines.append(
                f"| {p['name']} | {'yes' if p['modified'] else 'no'} | {p['nodes'][0]} → {p['nodes'][1]} | "
                f"{p['params'][0]:,} → {p['params'][1]:,} | {p['seconds']:.2f} s | {_numerics(p['numerics'])} |"
            )
    else:
        lines.append("No passes ran.")
    for p in m["passes"]:
        if not p.get("layers"):
            continue
        lines += ["", f"### Layers of pass `{p['name']}`", ""]
        st = p.get("stats", {})
        if st:
            lines.append("- " + ", ".join(f"{k}: {v}" for k, v in st.items()))
            lines.append("")
        header, rows = layer_table(p["layers"])
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += _entropy_section(m.get("entropy_coding"))
    v = m["verification"]
    lines += ["", "## Verification of the compiled code", ""]
    lines.append(f"- ran: {v['ran']}")
    if v.get("numerics"):
        status = "PASS" if v["numerics"]["ok"] else "FAIL"
        lines.append(f"- {status} on {v['numerics']['samples']} reference samples: {_numerics(v['numerics'])}")
    if any(p.get("lossy") for p in m["passes"]) and v.get("vs_original"):
        lines.append(f"- against the original model (accuracy budget): {_numerics(v['vs_original'])}")
    if v.get("evaluation"):
        e = v["evaluation"]
        lines.append(
            f"- {e['dataset']}: accuracy {e['compiled_accuracy']:.4f} (compiled) vs {e['ort_accuracy']:.4f} "
            f"(ONNX Runtime, original model) on {e['samples']} labelled samples"
        )
    lines += _firmware_section(m.get("firmware"))
    lines += ["", "## Files", "", "| file | bytes |", "|---|---|"]
    for rel, info in m["files"].items():
        lines.append(f"| `{rel}` | {info['bytes']:,} ({_fmt_bytes(info['bytes'])}) |")
    lines += ["", "## Tools", ""]
    lines += [f"- {k} {v}" for k, v in m["tools"].items()]
    return "\n".join(lines) + "\n"
