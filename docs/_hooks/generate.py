"""MkDocs hooks: the pages and files generated from the code and the measurements.

- ``<!-- generated: cli-reference -->`` in a page becomes the help of every
  ``kms-async`` command, taken from ``kms_async._cli.build_parser()``, so the
  CLI reference cannot drift from the parser.
- ``benchmarks/hot_path.png`` is drawn at build time by ``benchmarks/chart.py``
  from the measured figures in ``benchmarks/results.json`` (copied beside it),
  so the chart on the site shows measured figures only.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import tempfile
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results.json"
CLI_MARKER = "<!-- generated: cli-reference -->"


def _cli_reference() -> str:
    # The parser of this checkout, whatever copy of the package is installed.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from kms_async._cli import build_parser

    # argparse wraps help to the terminal's width: fix it for the same page everywhere.
    os.environ["COLUMNS"] = "88"
    parser = build_parser()
    parser.prog = "kms-async"
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = ["## kms-async", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in subparsers.choices.items():
        sub.prog = f"kms-async {name}"
        parts += [f"## kms-async {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, _cli_reference())
    return markdown


def _draw_chart() -> bytes:
    spec = importlib.util.spec_from_file_location("_bench_chart", ROOT / "benchmarks" / "chart.py")
    assert spec is not None and spec.loader is not None
    chart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chart)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "hot_path.png")
        message = chart.draw(str(RESULTS), out)
        if not os.path.exists(out):
            raise RuntimeError(f"benchmarks/chart.py drew no chart: {message}")
        return pathlib.Path(out).read_bytes()


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "benchmarks/results.json", content=RESULTS.read_bytes()))
    files.append(File.generated(config, "benchmarks/hot_path.png", content=_draw_chart()))
    return files
