"""Fig. 7: the best-of-N upper bound, hMean against N (log2 axis), one line per method, as SVG."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from f2d_bench.files import atomic_write_bytes


def plot_best_of_n(curve: pd.DataFrame, path: str | Path, *, title: str | None = None) -> Path:
    """Write the curve of :func:`f2d_bench.aggregate.best_of_n.best_of_n_curve` to ``path`` (SVG).

    Solid lines with markers: the expected best of N (closed form over all images); dashed lines in the
    same colour: the best of the first N seeds. The file is written atomically and carries no date, so
    the same curve gives the same bytes.
    """
    # Figure + its own SVG canvas: no pyplot, no global backend switch, safe without a display.
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    column = curve.attrs.get("column", "hmean")
    ylabel = {"hmean": "hMean", "gmean": "gMean"}.get(column, column)
    fig = Figure(figsize=(6.0, 4.2))
    FigureCanvasSVG(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i % 10}" for i in range(64)]
    ns = sorted(int(n) for n in curve["n"].unique()) if len(curve) else []
    for i, (method, rows) in enumerate(curve.groupby("method", sort=True)):
        label = str(rows["method_label"].iloc[0])
        for variant, style, suffix in (("expected", "-", "expected best of N"), ("first", "--", "best of first N")):
            part = rows[rows["variant"] == variant].sort_values("n")
            if part.empty:
                continue
            ax.plot(part["n"], part["value"], linestyle=style, marker="o" if variant == "expected" else None,
                    color=colours[i % len(colours)], label=f"{label} ({suffix})")
    ax.set_xscale("log", base=2)
    if ns:
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("N (images generated per face and prompt)")
    ax.set_ylabel(f"best {ylabel} among N images (mean over face, prompt)")
    ax.set_title(title or f"Upper bound: best-of-N {ylabel} (Fig. 7)")
    ax.grid(True, alpha=0.3)
    if len(curve):
        ax.legend(fontsize="small")
    fig.tight_layout()
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "f2d-bench"}):  # fixed element ids: same curve, same bytes
        fig.savefig(buf, format="svg", metadata={"Date": None})
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
