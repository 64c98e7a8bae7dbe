"""Package structure: no import circles between map_merge's modules, lazy imports included."""

import ast
from pathlib import Path

import map_merge

ROOT = Path(map_merge.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere (top level or inside functions);
    package ``__init__`` files are re-export hubs and not nodes."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = {name for name, p in files.items() if p.name != "__init__.py"}
    graph = {}
    for name in modules:
        path = files[name]
        package = name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets |= {module} | {f"{module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = (targets & modules) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_graph_sees_lazy_imports():
    graph = _import_graph()
    assert "map_merge.objective" in graph["map_merge.asynchronous"]  # a top-level relative import
    assert "map_merge.asynchronous" in graph["map_merge.adaptive"]  # imported inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_circles():
    assert _cycles(_import_graph()) == []
