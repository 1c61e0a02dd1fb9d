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


def _module_graph():
    """kd module -> the kd modules it imports (function-local imports included)."""
    mods = {".".join(p.relative_to(KD.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in KD.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for mod in _kd_imports(path):
            deps.add(mod if mod in mods else mod.rsplit(".", 1)[0])
        for node in ast.walk(ast.parse(path.read_text())):  # `from kd.x import module` names a module
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_circle_between_modules():
    """No kd module reaches itself through imports, function-local ones included (the packages' order alone would
    allow a circle inside one package, as nf4 <-> nf4_decode <-> nf4_cuda once was)."""
    graph = _module_graph()
    state, path, cycles = {}, [], []

    def visit(u):
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(" -> ".join(path[path.index(v):] + [v]))
            elif v not in state:
                visit(v)
        path.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)
    assert "kd.generate.nf4_matmul" in graph and "kd.teacher.nf4" in graph["kd.generate.nf4_matmul"]  # the walk sees


def test_no_import_of_another_modules_private_name():
    """``from kd.x.y import _name`` only inside kd.x.y itself: what another module needs is public API."""
    bad = []
    for path in sorted([*KD.rglob("*.py"), *(KD.parent / "recipes").glob("*.py")]):
        own = ".".join(path.relative_to(KD.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kd") \
                    and node.module != own:
                bad += [f"{path.relative_to(KD.parent)}: from {node.module} import {a.name}"
                        for a in node.names if a.name.startswith("_")]
    assert not bad, "\n".join(bad)
