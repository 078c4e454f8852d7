"""`cdp bench`: runs bench/suite.py, the one benchmark of the whole platform, from this checkout.

The benchmarks are not part of the installed package (they start servers, load the other bench
scripts by path and write into bench/results/), so the command finds bench/suite.py in the
checkout the package is installed from (`pip install -e`, as `make setup` does) or in the current
directory, and hands it every option as they are.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path("bench") / "suite.py"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    # Options belong to bench/suite.py, not to this parser: with "+" as its only prefix, every
    # "--option" is passed through untouched (`cdp bench --help` prints the bench's own help).
    parser: argparse.ArgumentParser = commands.add_parser(
        "bench", prefix_chars="+", add_help=False,
        help="benchmark the whole suite against raw JetStream (bench/suite.py; `cdp bench --help`)",
        description="Runs bench/suite.py of this checkout with the given options.",
    )
    parser.add_argument("options", nargs="*", help="options of bench/suite.py, e.g. --smoke")
    return parser


def script() -> Path | None:
    """bench/suite.py of the checkout this package lives in, else of the current directory."""
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):
        if (root / SCRIPT).is_file():
            return root / SCRIPT
    return None


def command(args: argparse.Namespace) -> int:
    found = script()
    if found is None:
        print(f"cdp bench: {SCRIPT} not found: the benchmarks are not installed with the package; run "
              "`cdp bench` in a checkout of the repository (or `make bench` there)", file=sys.stderr)
        return 2
    # The bench takes over this process: Ctrl-C and SIGTERM reach it directly.
    os.execv(sys.executable, [sys.executable, str(found), *args.options])
