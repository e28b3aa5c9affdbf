"""The report's figures as SVG files (matplotlib's own SVG canvas: no pyplot, no display needed).

Text is drawn as paths, so a method label never becomes markup inside an SVG; ``$`` is escaped so that
a label is never parsed as mathtext. Files carry no date: the same numbers give the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from f2d_bench.aggregate.metrics import MetricCatalog
from f2d_bench.aggregate.paper import PAPER_IDENTITY, PAPER_TEXT
from f2d_bench.files import atomic_write_bytes

COLUMN_NAMES = {"adaface": "AdaFace", "sphereface": "SphereFace", "facenet": "FaceNet", "clip": "CLIP",
                "dclip": "dCLIP", "siglip": "SigLIP", "hmean": "hMean", "gmean": "gMean",
                "face_detection_rate": "face det."}


def plain(text: object) -> str:
    """A label safe from mathtext (``$`` would start a formula)."""
    return str(text).replace("$", r"\$")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasSVG(fig)
    return fig


def _save(fig, path: Path) -> Path:
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "f2d-bench", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    atomic_write_bytes(path, buf.getvalue())
    return path


def _names(table: pd.DataFrame, width: int = 18) -> list[str]:
    import textwrap

    names = [str(table.loc[m, "label"]) if "label" in table.columns else str(m) for m in table.index]
    return [plain("\n".join(textwrap.wrap(n, width, break_long_words=True)) or n) for n in names]


def plot_means(table1: pd.DataFrame, path: Path, confidence: float) -> Path | None:
    """Bar chart of hMean and gMean per method with the bootstrap interval as error bars."""
    cols = [c for c in ("hmean", "gmean") if c in table1.columns]
    if not cols or not len(table1):
        return None
    n = len(table1)
    fig = _figure(max(5.0, 1.1 * n + 2.0), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n)
    width = 0.8 / len(cols)
    for i, c in enumerate(cols):
        v = table1[c].to_numpy(dtype=float)
        lo = np.clip(v - table1[f"{c}_lo"].to_numpy(dtype=float), 0, None)
        hi = np.clip(table1[f"{c}_hi"].to_numpy(dtype=float) - v, 0, None)
        ax.bar(x + (i - (len(cols) - 1) / 2) * width, v, width, yerr=np.vstack([lo, hi]), capsize=3,
               label=COLUMN_NAMES[c], color=f"C{i}")
    ax.set_xticks(x)
    ax.set_xticklabels(_names(table1), rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center",
                       fontsize="x-small")
    ax.set_ylabel("mean over prompt images")
    ax.set_title(f"hMean and gMean per method\n(error bars: {confidence:.0%} face-bootstrap interval)",
                 fontsize="medium")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_tradeoff(table1: pd.DataFrame, paper: pd.DataFrame | None, path: Path,
                  catalog: MetricCatalog) -> Path | None:
    """Identity (mean of the identity mean metrics: AdaFace, SphereFace, FaceNet) against text (mean of
    the text ones: CLIP, dCLIP, SigLIP).

    The paper's Table 1 methods are drawn in grey as a reference, on the same axes: averaged over the
    same metrics as this report's points (a run scored without SigLIP puts them at the mean of CLIP and
    dCLIP too), and left out when the report averages a metric the paper has no column for.
    """
    ident = [c for c in catalog.identity_metrics if c in table1.columns]
    text = [c for c in catalog.text_metrics if c in table1.columns]
    if not ident or not text or not len(table1):
        return None
    fig = _figure(6.0, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    comparable = set(text) <= set(PAPER_TEXT) and set(ident) <= set(PAPER_IDENTITY)
    if paper is not None and len(paper) and comparable:
        px, py = paper[text].mean(axis=1), paper[ident].mean(axis=1)
        ax.scatter(px, py, color="0.6", marker="s", s=22, label="paper, Table 1 (published)")
        for name, xv, yv in zip(paper.index, px, py):
            ax.annotate(plain(name), (xv, yv), fontsize=6, color="0.45", xytext=(3, 2), textcoords="offset points")
    x = table1[text].mean(axis=1)
    y = table1[ident].mean(axis=1)
    for i, (m, xv, yv) in enumerate(zip(table1.index, x, y)):
        label = plain(table1.loc[m, "label"]) if "label" in table1.columns else plain(m)
        ax.scatter([xv], [yv], color=f"C{i % 10}", s=40, label=label, zorder=3)
    ax.set_xlabel("text alignment: mean of " + ", ".join(COLUMN_NAMES[c] for c in text))
    ax.set_ylabel("identity: mean of " + ", ".join(COLUMN_NAMES[c] for c in ident))
    ax.set_title("Identity vs text trade-off (this report vs the paper)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small", loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_categories(categories: pd.DataFrame, labels: dict, path: Path, column: str = "hmean") -> Path | None:
    """Grouped bars: ``column`` per prompt category, one bar per method."""
    if not len(categories) or column not in categories.columns:
        return None
    wide = categories[column].unstack("category")
    cats = [c for c in ("job", "activity", "expression", "location") if c in wide.columns]
    if not cats:
        return None
    fig = _figure(6.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(cats))
    width = 0.8 / max(1, len(wide))
    for i, m in enumerate(wide.index):
        ax.bar(x + (i - (len(wide) - 1) / 2) * width, wide.loc[m, cats].to_numpy(dtype=float), width,
               label=plain(labels.get(m, m)), color=f"C{i % 10}")
    ax.set_xticks(x)
    ax.set_xticklabels(cats)
    ax.set_ylabel(COLUMN_NAMES.get(column, column))
    ax.set_title(f"{COLUMN_NAMES.get(column, column)} by prompt category")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    return _save(fig, path)
