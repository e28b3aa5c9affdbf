"""`f2d-bench report RUN [RUN...] -o DIR` and `f2d-bench reports index [DIR]`: the argparse wiring (the work
is in :mod:`render` and :mod:`index`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from f2d_bench.argtypes import int_at_least, open_fraction


def _cmd_report(args: argparse.Namespace) -> int:
    from f2d_bench import api
    from f2d_bench.report.index import INDEX_HTML

    index = api.report(args.runs, args.out, grid_faces=args.grid_faces, grid_seeds=args.grid_seeds,
                       n_resamples=args.resamples, confidence=args.confidence)
    print(f"report: {index.resolve()}")
    print(f"index of reports: {(Path(args.out).resolve().parent / INDEX_HTML)}")
    return 0


def _cmd_reports_index(args: argparse.Namespace) -> int:
    import json

    from f2d_bench.report.index import INDEX_JSON, OK, write_index

    page = write_index(args.dir)
    counts: dict[str, int] = {}
    for entry in json.loads((page.parent / INDEX_JSON).read_text(encoding="utf-8"))["reports"]:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    others = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()) if status != OK)
    print(f"{counts.get(OK, 0)} report(s){f'; also listed: {others}' if others else ''}")
    print(f"index of reports: {page.resolve()}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``report`` command to ``subparsers`` (the object ``add_subparsers()`` returned)."""
    p = subparsers.add_parser(
        "report", help="HTML report of scored runs: the paper's tables, plots, image grids",
        description="Write a static HTML report (index.html with CSS, SVG plots, CSV/JSON and images beside it) "
                    "of one or more scored runs, merged. It opens from disk with no network. Then rewrite the "
                    "index of the folder that holds DIR (its index.html and index.json list every report there).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="scored run directories (f2d-bench score RUN)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="report folder (created)")
    p.add_argument("--grid-faces", type=int_at_least(0), default=8, metavar="N",
                   help="faces shown in each method's image grid (0: all; default 8)")
    p.add_argument("--grid-seeds", type=int_at_least(0), default=4, metavar="N",
                   help="seeds shown per face and prompt (0: all; default 4)")
    p.add_argument("--resamples", type=int_at_least(1), default=2000, help="bootstrap resamples of faces (default 2000)")
    p.add_argument("--confidence", type=open_fraction, default=0.95,
                   help="interval level, strictly between 0 and 1 (default 0.95)")
    p.set_defaults(func=_cmd_report)
    return p


def register_reports(subparsers) -> argparse.ArgumentParser:
    """Add the ``reports`` command (with its ``index`` subcommand) to ``subparsers``."""
    p = subparsers.add_parser("reports", help="work with a folder of reports (its index and leaderboard)",
                              description="Work with a folder of reports written by `f2d-bench report`.")
    commands = p.add_subparsers(dest="reports_command", metavar="SUBCOMMAND", required=True)
    ix = commands.add_parser(
        "index", help="rebuild DIR/index.html and DIR/index.json from the reports in DIR",
        description="Rebuild the index of a reports folder: one row per report folder in DIR (name, date, runs, "
                    "methods with base model and sampling, hMean and gMean with intervals, faces, images, link), "
                    "a leaderboard with each method id's best and latest Table 1 numbers, and the reason for "
                    "every folder that is not a readable report. `f2d-bench report` does this after each report.")
    ix.add_argument("dir", nargs="?", default="reports", metavar="DIR", help="the reports folder (default: reports)")
    ix.set_defaults(func=_cmd_reports_index)
    return p
