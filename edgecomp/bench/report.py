"""The benchmark's HTML report: accuracy against size, latency per configuration, and the
spectra and ranks the low-rank pass chose, one section per model (figures inline)."""

from __future__ import annotations

import datetime
import html
import json
import os
from pathlib import Path
from typing import Any

from edgecomp.figures import pyplot, html_page, png_data_uri, spectra_figure

__all__ = ["bench_html", "model_figure"]


def model_figure(rows: list[dict[str, Any]], name: str):
    from edgecomp.bench.runner import headline

    plt = pyplot()
    ok = [r for r in rows if not r.get("error")]
    if not ok:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    for r in ok:
        key, value = headline(r)
        a1.scatter(r["bytes"] / 1024, value, s=30)
        a1.annotate(r["config"], (r["bytes"] / 1024, value), fontsize=7, xytext=(4, 2), textcoords="offset points")
    a1.set_xlabel("size (KiB): model file or bundle code + weights")
    a1.set_ylabel(headline(ok[0])[0])
    a1.set_title(f"{name}: accuracy vs size", fontsize=9)
    a1.grid(alpha=0.3)
    names = [r["config"] for r in ok]
    med = [r["latency"]["median_ms"] for r in ok]
    err = [[m - r["latency"]["p10_ms"] for m, r in zip(med, ok)], [r["latency"]["p90_ms"] - m for m, r in zip(med, ok)]]
    a2.bar(range(len(ok)), med, yerr=err, color="tab:blue", capsize=3)
    a2.set_xticks(range(len(ok)), names, rotation=20, ha="right", fontsize=7)
    a2.set_ylabel("latency median (ms), p10–p90")
    a2.set_yscale("log")
    a2.set_title(f"{name}: latency", fontsize=9)
    fig.tight_layout()
    return fig


def bench_html(doc: dict[str, Any]) -> str:
    from edgecomp.bench.runner import markdown_table

    sections = [("Results", f"<pre>{html.escape(markdown_table(doc))}</pre>")]
    for name in dict.fromkeys(r["model"] for r in doc["results"]):
        rows = [r for r in doc["results"] if r["model"] == name]
        fig = model_figure(rows, name)
        if fig is not None:
            sections.append((name, f"<img src='{png_data_uri(fig)}'>"))
        for r in rows:
            if r.get("layers"):
                fig = spectra_figure(r["layers"])
                if fig is not None:
                    sections.append((f"{name}: {r['config']} spectra and ranks", f"<img src='{png_data_uri(fig)}'>"))
    return html_page("edgecomp benchmark", sections)


def day_document(out: Path, prefix: str) -> tuple[Path, str, dict[str, Any]]:
    """``(json path, stem, document)`` of today's results file ``<prefix>-<date>``: models studied
    in earlier runs of the same day are kept, so one document holds all of them."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{prefix}-{datetime.date.today().isoformat()}"
    path = out / f"{stem}.json"
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"models": {}}
    return path, stem, doc


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a crash never leaves half a result file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
