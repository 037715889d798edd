"""Pictures for reports: self-contained HTML with matplotlib figures embedded as PNG data.

People look at these instead of reading tables: per layer, the singular value spectrum and the
rank chosen; a waterfall of the model's size through the passes; accuracy against size and
latency per configuration (the benchmark). matplotlib runs headless (Agg); nothing is fetched.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Sequence

from edgecomp.report import layer_table

__all__ = ["pyplot", "png_data_uri", "spectra_figure", "waterfall_figure", "html_page", "table_html", "bundle_html"]


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def spectra_figure(layers: Sequence[dict[str, Any]], max_panels: int = 24):
    """Normalized singular values per layer (log scale), the chosen rank as a vertical line."""
    plt = pyplot()
    layers = [layer for layer in layers if layer.get("spectrum")][:max_panels]
    if not layers:
        return None
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        s = layer["spectrum"]
        top = s[0] if s and s[0] > 0 else 1.0
        ax.semilogy(range(1, len(s) + 1), [max(v / top, 1e-8) for v in s], lw=1.2)
        if layer.get("rank"):
            color = "tab:green" if layer.get("decision") == "factorized" else "tab:gray"
            ax.axvline(layer["rank"], color=color, ls="--", lw=1)
        ax.axvline(layer.get("erank", 0), color="tab:orange", ls=":", lw=1)
        ax.set_title(f"{layer['name'][:28]}\n{layer['method']} r={layer.get('rank')}/{layer['full_rank']}", fontsize=7)
        ax.tick_params(which="both", labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle("singular values (normalized); dashed: rank kept (green: factorized), dotted: effective rank", fontsize=8)
    fig.tight_layout()
    return fig


def waterfall_figure(steps: Sequence[tuple[str, float]], unit: str = "KiB"):
    """Bars of a size through the stages, each labelled with its value."""
    plt = pyplot()
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(steps)), 2.8))
    names = [n for n, _ in steps]
    values = [v for _, v in steps]
    bars = ax.bar(range(len(steps)), values, color=["tab:blue"] + ["tab:green"] * (len(steps) - 1))
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(steps)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(unit)
    ax.set_title("size through the stages", fontsize=9)
    fig.tight_layout()
    return fig


def html_page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A self-contained page: ``sections`` are (heading, inner HTML)."""
    body = "\n".join(f"<h2>{html.escape(h)}</h2>\n{inner}" for h, inner in sections)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def table_html(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def bundle_html(manifest: dict[str, Any]) -> str:
    """The build's HTML report: passes, per-layer spectra and ranks, the size waterfall."""
    m = manifest
    sections = []
    rows = [
        (p["name"], "lossy" if p.get("lossy") else "exact", f"{p['params'][0]:,} → {p['params'][1]:,}",
         f"{p['param_bytes'][1] / 1024:,.1f}", "; ".join(
             f"cos {o['min_cosine']:.5f}" + (f", top-1 {o['top1']:.3f}" if o.get("top1") is not None else "")
             for o in p["numerics"]["outputs"]))
        for p in m["passes"]
    ]
    sections.append(("Passes", table_html(["pass", "kind", "params", "KiB after", "vs original"], rows)))
    steps = [("input model", m["passes"][0]["param_bytes"][0] / 1024)] if m["passes"] else []
    steps += [(p["name"], p["param_bytes"][1] / 1024) for p in m["passes"]]
    files = m.get("files", {})
    weights_file = m.get("runtime", {}).get("weights", "weights.npz")
    if weights_file in files:
        steps.append((weights_file, files[weights_file]["bytes"] / 1024))
    fig = waterfall_figure(steps)
    if fig is not None:
        sections.append(("Size waterfall (parameter bytes)", f"<img src='{png_data_uri(fig)}'>"))
    for p in m["passes"]:
        if p.get("layers"):
            fig = spectra_figure(p["layers"])
            if fig is not None:
                sections.append((f"Spectra and ranks: {p['name']}", f"<img src='{png_data_uri(fig)}'>"))
            header, layer_rows = layer_table(p["layers"])
            sections.append((f"Layers: {p['name']}", table_html(header, layer_rows)))
    v = m.get("verification", {})
    if v:
        sections.append(("Verification", f"<p>{html.escape(v.get('ran', ''))}</p><pre>{html.escape(str(v.get('numerics', {}).get('outputs')))}</pre>"))
    return html_page(f"edgecomp: {m['model']['name']} for {m['target']['name']}", sections)
