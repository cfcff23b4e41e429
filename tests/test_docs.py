"""Every hook is documented in docs/ (tests/test_plugins.py exercises each); the README's commands are the CI's."""

from __future__ import annotations

from pathlib import Path

from bcd import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "bcd_spec")]


def test_the_hooks_are_found():
    assert set(HOOKS) == {"register_partitioners", "register_orderings", "register_solvers"}


def test_every_hook_is_documented():
    guide = (ROOT / "docs" / "plugins.md").read_text()
    for name in HOOKS:
        assert f"### {name}\n" in guide, name
        assert getattr(hookspecs, name).__doc__.strip(), name


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = 'pip install torch==2.13.0 && pip install -e ".[test]" && ruff check && python -m pytest'
    assert command in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install --quiet torch==2.13.0 && python -m pip install --quiet -e ".[test]" && ruff check && python -m pytest' in ci
