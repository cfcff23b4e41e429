"""The ``bcd`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

from bcd.cli import main


def test_plugins_lists_builtins_with_their_package(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"kind": "solver", "name": "adamw", "source": rows[-2]["source"]} in rows
    assert all(r["source"].startswith("bcd ") for r in rows if r["name"] in {"layer", "random", "sgd"})
    assert {(r["kind"], r["name"]) for r in rows} >= {
        ("partitioner", "layer"), ("partitioner", "random-subset"), ("partitioner", "per-module"),
        ("partitioner", "explicit"), ("ordering", "ascending"), ("ordering", "descending"),
        ("ordering", "random"), ("ordering", "fixed"), ("solver", "adam"), ("solver", "sgd"),
    }


def test_plugins_table_through_the_console_script():
    result = subprocess.run(["bcd", "plugins"], capture_output=True, text=True, check=True)
    assert "random-subset" in result.stdout and "bcd 0.1.0" in result.stdout


def test_help_names_every_command():
    result = subprocess.run([sys.executable, "-m", "bcd.cli", "--help"], capture_output=True, text=True, check=True)
    assert "plugins" in result.stdout
