"""The floor plan: docs/architecture.md is the code's, the library does not lean on the lab, no
module reads another object's private members, no import cycle, no module past its size."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "bcd").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py"))
sys.path.insert(0, str(ROOT / "tools"))
import architecture  # noqa: E402 - tools/ is not a package


def test_the_documented_graph_is_the_codes():
    documented = architecture.section(architecture.DOC.read_text())
    assert documented == architecture.mermaid(), "docs/architecture.md is stale: python tools/architecture.py --write"


def test_every_module_has_one_row_in_what_each_module_owns_and_every_row_a_module():
    table = architecture.DOC.read_text().split("## What each module owns", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \|", table, flags=re.M)
    labels = [architecture.label(name) for name in architecture.modules()]
    assert sorted(rows) == sorted(labels)


def test_the_library_imports_nothing_from_the_lab_and_the_lab_lives_in_its_folder():
    graph = architecture.graph()
    leaning = {m: sorted(t for t in targets if architecture.group_of(t) == "lab")
               for m, targets in graph.items() if architecture.group_of(m) != "lab"}
    assert not {m: t for m, t in leaning.items() if t}
    lab_packages = ("transformers", "accelerate", "datasets", "tensorboard", "rich", "matplotlib", "tokenizers")
    outside = [str(p.relative_to(ROOT)) for p in SOURCES if not p.is_relative_to(ROOT / "bcd" / "lab")
               and any(m.split(".")[0] in lab_packages for m in _third_party(p))]
    assert not outside, f"lab packages imported outside bcd/lab/: {outside}"


def test_no_module_is_past_its_size():
    """One idea per module: at most 350 lines; the optimizer class, the wiring, under 250."""
    long = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 350}
    assert not long
    source = (ROOT / "bcd" / "optimizer.py").read_text()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "BlockCoordinateOptimizer")
    assert cls.end_lineno - cls.lineno + 1 < 250


def _third_party(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


#: The exceptions, each with its reason. torch has no public way to run code at the end of a
#: backward (a multi-grad hook fires before the last accumulation and fails under autograd.grad
#: on leaves); FSDP2 queues a callback on the engine, and bcd.averaging does the same.
ALLOWED_PRIVATE = {"Variable._execution_engine"}


def test_no_module_reads_another_objects_private_members():
    """``x._name`` only on ``self`` or ``cls``: what another object keeps private is not a way in."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                    and ast.unparse(node) not in ALLOWED_PRIVATE):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not found, found


def test_the_bcd_package_has_no_import_cycle():
    graph = architecture.graph()
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            assert state.get(target) != "open", " -> ".join(trail + [node, target])
            if target not in state:
                visit(target, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
