"""The house: lorafit's modules import one another without a circle (lazy imports inside functions count too), and
none has grown past ~400 lines. Read with `ast` from the source, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"
PKG = SRC / "lorafit"
MAX_LINES = 420  # "no module over ~400 lines"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The lorafit modules `path` imports (an `import lorafit.x.y` or `from lorafit.x import y` names lorafit.x.y
    where that is a module, else lorafit.x), wherever the import statement stands."""
    here = module_name(path)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != here and name.startswith("lorafit"):
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {module_name(p) for p in files}
    g = {module_name(p): imports_of(p, modules) for p in files}
    for m in g:  # a package's __init__ re-exporting its submodules is not an import of them by the submodules
        g[m] = {d for d in g[m] if not (m.startswith(d + ".") and d in modules)}
    return g


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_walk_sees_a_circle_when_there_is_one(tmp_path, monkeypatch):
    """The check above can fail: two modules that import each other are reported."""
    pkg = tmp_path / "lorafit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from lorafit.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from lorafit import a\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    try:
        test_no_import_circles()
    except AssertionError as e:
        assert "lorafit.a -> lorafit.b -> lorafit.a" in str(e)
    else:
        raise AssertionError("the circle a -> b -> a was not seen")


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"
