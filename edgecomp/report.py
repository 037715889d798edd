"""The human report of a build (``report.md`` in the bundle), made from the manifest alone."""

from __future__ import annotations

from typing import Any

__all__ = ["render_report"]


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
        lines += [
            "| layer | op | method | weight | rank / full | erank | params | MACs | error | decision |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for layer in p["layers"]:
            lines.append(
                f"| `{layer['name']}` | {layer['op']} | {layer['method']} | {layer['weight_shape']} | "
                f"{layer['rank']} / {layer['full_rank']} | {layer['erank']:.1f} | "
                f"{layer['params'][0]:,} → {layer['params'][1]:,} | {layer['macs'][0]:,} → {layer['macs'][1]:,} | "
                f"{layer['error']:.3g} | {layer['decision']} |"
            )
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
    lines += ["", "## Files", "", "| file | bytes |", "|---|---|"]
    for rel, info in m["files"].items():
        lines.append(f"| `{rel}` | {info['bytes']:,} ({_fmt_bytes(info['bytes'])}) |")
    lines += ["", "## Tools", ""]
    lines += [f"- {k} {v}" for k, v in m["tools"].items()]
    return "\n".join(lines) + "\n"
