"""Every hook is documented in docs/ and exercised by a test; the README's commands are the CI's."""

from __future__ import annotations

from pathlib import Path

import pluggy

from bcd import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "bcd_spec")]


def test_the_hooks_are_found():
    assert set(HOOKS) == {"register_partitioners", "register_orderings", "register_solvers", "block_switched"}


def test_every_hook_is_documented():
    guide = (ROOT / "docs" / "plugins.md").read_text()
    for name in HOOKS:
        assert f"### {name}\n" in guide, name
        assert getattr(hookspecs, name).__doc__.strip(), name


def test_every_hook_is_exercised_by_a_test():
    sources = "".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py") if p.name != "test_docs.py")
    for name in HOOKS:
        assert f"def {name}(" in sources, name


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
    assert command in readme
    assert "pip install --quiet torch==2.13.0 && python -m pip install --quiet -e \".[test]\" && python -m pytest" in (ROOT / ".ci" / "run").read_text()
