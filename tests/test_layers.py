"""The core's layers (pissa/__init__.py says what each holds): a module imports only modules of its
own layer or of the layers below it, and no import cycle exists, lazy imports included (an import
under `if TYPE_CHECKING:` is for type checkers only and does not count). The backends sit beside
layer 3: they import the core's layers 0-3 only (math, adapters, files), never training and above."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "pissa"

# Package prefix -> layer, bottom first; pissa.__init__ (the facade) and the CLI are the roof.
LAYERS = {
    "pissa.errors": 0, "pissa.dist": 0, "pissa.memory": 0,
    "pissa.numeric": 1,
    "pissa.adapters": 2,
    "pissa.files": 3,
    "pissa.jobs": 4,
    "pissa.training": 5,
    "pissa.studies": 6,
    "pissa.cli": 7, "pissa.__main__": 7, "pissa": 7,
}


BACKENDS = {"pissa_torch": ROOT.parent / "backends" / "torch", "pissa_mlx": ROOT.parent / "backends" / "mlx"}
BACKEND_LAYER = 3  # the highest core layer a backend may import


def modules(root: Path, package: str = "pissa") -> dict[str, Path]:
    found = {}
    for path in root.rglob("*.py"):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (functions included)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = {f"{module}.{a.name}" for a in node.names} & known
            found.update(submodules)
            if len(submodules) < len(node.names):  # a name from the module itself, not a submodule of it
                found.add(module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known and m != name}


def layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def graph(root: Path, package: str = "pissa") -> dict[str, set[str]]:
    mods = modules(root, package)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
                  for a, deps in edges.items() for b in deps if layer(b) > layer(a))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_every_module_has_a_layer():
    assert all(layer(m) is not None for m in modules(ROOT))


def test_no_module_imports_a_layer_above_it():
    assert upward(graph(ROOT)) == []


def test_the_core_has_no_import_cycle():
    assert cycles(graph(ROOT)) == []


def backend_imports(backends: dict[str, Path], core: Path) -> list[str]:
    """Each import of a core module above BACKEND_LAYER by a backend module, in words."""
    known = set(modules(core))
    return sorted(f"{name} imports {dep} (layer {layer(dep)})"
                  for package, root in backends.items() for name, path in modules(root, package).items()
                  for dep in imports(name, path, known) if layer(dep) > BACKEND_LAYER)


def test_a_backend_imports_only_the_core_layers_0_to_3():
    assert backend_imports(BACKENDS, ROOT) == []


def test_the_checks_find_an_upward_import_and_a_cycle(tmp_path):
    """The two checks above on a made-up package: they must be able to fail."""
    pkg = tmp_path / "pissa"
    for folder in ("numeric", "jobs"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "numeric" / "a.py").write_text("def f():\n    from pissa.jobs import b\n")     # lazy and upward
    (pkg / "jobs" / "b.py").write_text("from pissa.numeric import a\n")
    (pkg / "numeric" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                          "    from pissa.jobs import b\n")               # type-only: allowed
    edges = graph(pkg)
    assert upward(edges) == ["pissa.numeric.a (layer 1) imports pissa.jobs.b (layer 4)"]
    assert cycles(edges) == [["pissa.jobs.b", "pissa.numeric.a"]]
    backend = tmp_path / "backend"
    backend.mkdir()
    (backend / "__init__.py").write_text("")
    (backend / "ok.py").write_text("from pissa.numeric import a\n")
    (backend / "train.py").write_text("def f():\n    from pissa.jobs.b import x\n")        # lazy, layer 4
    assert backend_imports({"pissa_x": backend}, pkg) == ["pissa_x.train imports pissa.jobs.b (layer 4)"]
