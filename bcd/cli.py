"""The ``bcd`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from bcd import plugins


def _plugins(args: argparse.Namespace) -> int:
    rows = plugins.list_plugins()
    if args.json:
        print(json.dumps([{"kind": r.kind, "name": r.name, "source": r.source} for r in rows], indent=2))
        return 0
    table = Table(title="bcd plugins")
    for column in ("kind", "name", "source", "factory"):
        table.add_column(column)
    for r in rows:
        factory = f"{getattr(r.factory, '__module__', '?')}.{getattr(r.factory, '__qualname__', r.factory)}"
        table.add_row(r.kind, r.name, r.source, factory)
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bcd",
        description="bcd: block-coordinate optimization for PyTorch (BAdam and friends).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    listing = commands.add_parser(
        "plugins",
        help="list every registered partitioner, ordering and solver with the package it came from",
        description="List every registered plugin: its kind, the name to use it by, the package that "
        "registered it (distribution and version, or '(in-process)') and its factory.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bcd`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
