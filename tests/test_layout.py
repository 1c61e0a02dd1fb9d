"""The package layout of docs/design.md holds: each kd package imports only the packages below it, kd never
imports recipes/, and no module is left at the kd/ root (every import, function-local ones included)."""

import ast
from pathlib import Path

KD = Path(__file__).resolve().parents[1] / "kd"
# package -> the kd packages it may import (besides itself); the table of docs/design.md "Package layout"
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "teacher": {"core", "data"},
    "generate": {"core", "data", "teacher"},
    "losses": {"core"},
    "train": {"core", "data", "teacher", "generate", "losses"},
    "cache": {"core", "data", "teacher", "losses", "train"},
    "ops": {"core", "data", "teacher", "generate", "losses", "train", "cache"},
    "testing": {"core", "data", "teacher", "generate", "losses", "train", "cache", "ops"},
}


def _kd_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "kd":
                yield from (f"kd.{a.name}" for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_kd_root_holds_only_packages():
    assert sorted(p.name for p in KD.glob("*.py")) == ["__init__.py"]
    assert {p.name for p in KD.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ALLOWED)
    for pkg in ALLOWED:
        doc = ast.get_docstring(ast.parse((KD / pkg / "__init__.py").read_text()))
        assert doc and "Owns" in doc and "May import" in doc, pkg


def test_packages_import_only_downwards():
    bad = []
    for path in sorted(KD.glob("*/*.py")):
        pkg = path.parent.name
        for mod in _kd_imports(path):
            top = mod.split(".")[0]
            if top == "recipes":
                bad.append(f"{path.relative_to(KD.parent)} imports {mod}")
            elif top == "kd":
                other = mod.split(".")[1] if "." in mod else ""
                if other != pkg and other not in ALLOWED[pkg]:
                    bad.append(f"{path.relative_to(KD.parent)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_long_functions_say_why():
    """A function of 80 lines or more in kd/ or recipes/ has a comment on the line above it saying why."""
    bad = []
    for path in sorted([*KD.rglob("*.py"), *(KD.parent / "recipes").glob("*.py")]):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 79:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if not lines[first - 2].lstrip().startswith("#"):
                    bad.append(f"{path.relative_to(KD.parent)}:{node.lineno} {node.name}")
    assert not bad, "functions of 80+ lines without a comment above saying why:\n" + "\n".join(bad)
