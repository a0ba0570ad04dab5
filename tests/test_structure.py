"""The tree keeps the shape docs/architecture.md describes: the VM's side imports
nothing of Torque's, every module has a row in the module table, and each
concept's names live in one module."""

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "vmwn")
# What may use both sides: the command line and the operator commands.
BOTH_SIDES = ("cli.py", "commands/")


def _modules():
    for d, dirs, files in os.walk(PKG):
        dirs[:] = [x for x in dirs if x not in ("__pycache__", "guest")]
        for f in files:
            if f.endswith(".py"):
                yield os.path.relpath(os.path.join(d, f), PKG)


def _imports(rel, source=None):
    """Absolute module names ``rel`` imports (relative imports resolved)."""
    if source is None:
        with open(os.path.join(PKG, rel), encoding="utf-8") as f:
            source = f.read()
    tree = ast.parse(source, rel)
    package = ["vmwn"] + rel.split("/")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            yield mod
            yield from (f"{mod}.{a.name}" for a in node.names)


def test_the_vms_side_imports_nothing_of_torques():
    core = [m for m in _modules() if not m.startswith(("torque/",) + BOTH_SIDES)]
    assert "lifecycle.py" in core and "reap.py" in core and "spec.py" in core
    reaching = {m: sorted({i for i in _imports(m) if i.startswith("vmwn.torque")})
                for m in core}
    assert {m: i for m, i in reaching.items() if i} == {}


def test_the_import_walk_resolves_relative_imports():
    """So that the check above can fail: a lazy relative import is found."""
    src = "def f():\n    from ..torque import pbs\n    from . import virt\n"
    found = set(_imports("commands/x.py", src))
    assert "vmwn.torque.pbs" in found and "vmwn.commands.virt" in found
    assert "vmwn.torque.hooks.starter" in set(_imports("torque/x.py", "from .hooks import starter"))


def test_every_module_has_a_row_in_the_architecture_table():
    with open(os.path.join(REPO, "docs", "architecture.md"), encoding="utf-8") as f:
        text = f.read()
    table = text[text.index("## Modules, each owning one outside system"):]
    table = table[:table.index("\n\n", table.index("|---|"))]
    named = set(re.findall(r"`([\w/.]+)`", table))
    missing = []
    for rel in _modules():
        if os.path.basename(rel) == "__init__.py":
            continue
        parts = rel.split("/")
        candidates = {rel} | {"/".join(parts[:i]) + "/" for i in range(1, len(parts))}
        if not candidates & named:
            missing.append(rel)
    assert missing == []


@pytest.mark.parametrize("pattern,owner", [
    # the guest's control files
    (r'"(job\.sh|manifest\.json|nodefile|\.vmwn)"', "guestfiles.py"),
    (r'f"\{tag\}\.(pid|env)"', "guestfiles.py"),
    # the mom's job files
    (r'"\.(JB|SC|TK)"', "torque/pbs.py"),
    (r'"mom_priv", "jobs"', "torque/pbs.py"),
    # the alarm budget
    (r"ALARM_MARGIN\s*=|-\s*(pbs\.)?ALARM_MARGIN\b", "torque/pbs.py"),
])
def test_each_concept_has_one_owner(pattern, owner):
    found = set()
    for rel in _modules():
        with open(os.path.join(PKG, rel), encoding="utf-8") as f:
            if re.search(pattern, f.read()):
                found.add(rel)
    assert found and found <= set(owner.split("|")), found
