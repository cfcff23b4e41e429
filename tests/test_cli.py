"""The ``bcd`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

from bcd.cli import main


def test_plugins_lists_builtins_with_their_package(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    import bcd

    assert {"kind": "solver", "name": "adamw", "source": f"bcd {bcd.__version__}"} in rows
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


def test_every_flag_of_every_command_has_help():
    import argparse

    from bcd.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"plugins", "memory", "profile", "finetune"}
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"bcd {name} {action.option_strings[0]} has no help"
        assert sub.description, name
