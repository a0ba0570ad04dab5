"""The tree keeps the shape docs/architecture.md describes: the VM's side imports
nothing of a batch system's package (Torque's, OpenPBS's) and names none of their
hooks, exit codes or spool files, the batch systems' packages import nothing of
each other, every module has a row in the module table, and each concept's names
live in one module."""

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "vmwn")
# What may use both sides: the command line and the operator commands.
BOTH_SIDES = ("cli.py", "commands/")
# One package per batch system.
BATCH_SYSTEMS = ("torque/", "openpbs/")


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


def _core():
    return [m for m in _modules() if not m.startswith(BATCH_SYSTEMS + BOTH_SIDES)]


def test_the_vms_side_imports_nothing_of_a_batch_system():
    core = _core()
    assert "lifecycle.py" in core and "reap.py" in core and "jobrun.py" in core
    reaching = {m: sorted({i for i in _imports(m) if i.startswith(("vmwn.torque",
                                                                     "vmwn.openpbs"))})
                for m in core}
    assert {m: i for m, i in reaching.items() if i} == {}


def test_the_batch_systems_import_nothing_of_each_other():
    reaching = {}
    for m in _modules():
        for own, other in (("torque/", "vmwn.openpbs"), ("openpbs/", "vmwn.torque")):
            if m.startswith(own):
                found = sorted({i for i in _imports(m) if i.startswith(other)})
                if found:
                    reaching[m] = found
    assert any(m.startswith("openpbs/") for m in _modules())
    assert reaching == {}


# A batch system's hook names, exit-code tables and spool files, as they would
# appear in code (string constants; docstrings and comments may explain them).
BATCH_NAMES = re.compile(r"mom_priv|\.(JB|SC|TK|OU|ER)\b|execjob_|queuejob|\$job_starter|"
                         r"\$prologalarm|^(prologue|epilogue)(\.parallel)?$")


def _code_strings(rel, source=None):
    """(line, text) of the string constants in ``rel`` that are not docstrings."""
    if source is None:
        with open(os.path.join(PKG, rel), encoding="utf-8") as f:
            source = f.read()
    tree = ast.parse(source, rel)
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docs:
            yield node.lineno, node.value


def test_the_core_names_no_batch_systems_hook_exit_code_or_spool_file():
    # config.py documents the site's batch-system settings (pbs_home, prologue_deadline).
    found = [f"{m}:{line}: {text[:60]!r}" for m in _core() if m != "config.py"
             for line, text in _code_strings(m) if BATCH_NAMES.search(text)]
    assert found == []


def test_the_batch_name_check_can_fail():
    src = ('"""mom_priv is explained here."""\n'
           'T = {"prologue": 1}\nP = os.path.join(h, "mom_priv", "jobs")\nH = "execjob_begin"\n')
    hits = [t for _, t in _code_strings("x.py", src) if BATCH_NAMES.search(t)]
    assert sorted(hits) == ["execjob_begin", "mom_priv", "prologue"]


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
    (r'"\.(JB|SC|TK)"', "torque/pbs.py|openpbs/mom.py"),
    (r'"mom_priv", "jobs"', "torque/pbs.py|openpbs/mom.py"),
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


def _all_names(rel, source=None):
    """The names ``rel``'s ``__all__`` lists, or None when it has none."""
    if source is None:
        with open(os.path.join(PKG, rel), encoding="utf-8") as f:
            source = f.read()
    for node in ast.parse(source, rel).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return None


def test_every_name_in_every_modules_all_exists():
    import importlib
    missing, checked = [], []
    for rel in sorted(_modules()):
        names = _all_names(rel)
        if names is None:
            continue
        dotted = "vmwn." + rel[:-len(".py")].replace("/", ".")
        module = importlib.import_module(dotted.removesuffix(".__init__"))
        checked.append(rel)
        missing += [f"{rel}: {n}" for n in names if not hasattr(module, n)]
    assert "lifecycle.py" in checked and "warden.py" in checked
    assert missing == []


def test_the_all_reader_finds_the_list():
    """So that the check above can fail: a module's __all__ is read."""
    assert _all_names("x.py", "import os\n__all__ = ['a', 'gone']\n") == ["a", "gone"]
    assert _all_names("x.py", "ALL = ['a']\n") is None
