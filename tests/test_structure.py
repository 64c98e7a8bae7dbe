"""Package structure: no import circles between map_merge's modules (lazy imports and imports through a
package's ``__init__`` included), imports only downward through the README's layers, no module over
450 lines."""

import ast
from pathlib import Path

import map_merge

ROOT = Path(map_merge.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere (top level or inside functions).

    A package is a node too (its ``__init__``): ``from .pkg import name`` of a name that is no
    submodule, or ``import pkg``, runs the package's ``__init__`` and so depends on all it imports;
    ``from .pkg import submodule`` and ``from .pkg.submodule import name`` depend on the submodule only."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                submodules = {f"{module}.{alias.name}" for alias in node.names} & set(files)
                targets |= submodules
                if len(submodules) < len(node.names):  # a name defined in (or re-exported by) the module itself
                    targets.add(module)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = (targets & set(files)) - {name}
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
    assert "map_merge.objective_base" in graph["map_merge.asynchronous"]  # a top-level relative import
    assert "map_merge.asynchronous" in graph["map_merge.adaptive"]  # imported inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_graph_sees_imports_through_a_package_init():
    graph = _import_graph()
    assert "map_merge.task_vectors.base" in graph["map_merge.task_vectors"]  # __init__ re-exports it
    assert "map_merge.task_vectors" in graph["map_merge.mergekit_config"]  # from .task_vectors import TaskVectors (lazy)
    # a submodule named in the import is the dependency, not the package's __init__
    assert "map_merge.task_vectors.safetensors_io" in graph["map_merge.mergekit_filters"]
    assert "map_merge.task_vectors" not in graph["map_merge.mergekit_filters"]
    assert "map_merge" not in graph["map_merge.task_vectors.base"]  # from .. import merge_methods
    assert "map_merge.merge_methods" in graph["map_merge.task_vectors.base"]


def test_no_import_circles():
    assert _cycles(_import_graph()) == []


def test_errors_are_the_bottom_layer():
    """The exceptions several modules raise live in map_merge.errors, which imports nothing of the package."""
    assert _import_graph()["map_merge.errors"] == set()


def test_no_module_over_450_lines():
    long = {_module_name(p): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


# The README's architecture picture, bottom first: a module may import its own layer and those below.
LAYERS = [
    "errors numeric fingerprint deprecation metric_labels",  # shared exceptions, parsers, labels
    "pareto front_metrics designs search surrogate gp_model residual_gp model_choice noisy_trend acquisition",  # core maths
    "objective_base function_objective store executors asynchronous "  # the objective interface ...
    "task_vectors merge_methods groups mergekit_config mergekit_emit mergekit_filters mergekit_methods "
    "mergekit_settings mergekit_weights",  # ... and storage, side by side
    "map adaptive bayes nested result",  # the algorithms
    "model_objective objective tasks lm_eval_task saved_eval moe",  # objectives on models, PWE-MoE
    "plots plot_compare plot_marks compare baselines zoo",  # adapters
    "cli demo config config_read",  # users
]


def _layer_of() -> dict[str, int]:
    return {name: k for k, names in enumerate(LAYERS) for name in names.split()}


def _top(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_module_has_a_layer():
    layer = _layer_of()
    assert {_top(m) for m in _import_graph()} - {""} - set(layer) == set()
    assert len(layer) == sum(len(names.split()) for names in LAYERS)  # no name in two layers


def _upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    layer = _layer_of()
    return sorted(
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if _top(module) and _top(target) and layer[_top(target)] > layer[_top(module)]
    )


def test_imports_only_go_down_the_layers():
    assert _upward(_import_graph()) == []


def test_the_layer_check_sees_an_upward_import():
    fake = {"map_merge.map": {"map_merge.pareto", "map_merge.cli.parser"}, "map_merge.task_vectors.base": {"map_merge.errors"}}
    assert _upward(fake) == [("map_merge.map", "map_merge.cli.parser")]


def _readme_layers() -> list[set[str]]:
    """The modules the README's architecture picture places in each layer, bottom first (``name.py``
    and ``package/`` tokens, ``prefix_*.py`` as the modules it matches; a package's parts in
    parentheses are not layers of their own)."""
    import re

    text = (ROOT.parent / "README.md").read_text()
    picture = text.split("## Architecture", 1)[1].split("```", 2)[1]
    layers, current = [], set()
    for line in picture.splitlines():
        if set(line.strip()) <= {"─"} and line.strip():
            layers.append(current)
            current = set()
            continue
        line = re.sub(r"\([^)]*\)?", "", re.sub(r"\([^)]*$", "", line))  # drop parenthesised parts (even wrapped ones)
        current |= {m.group(1) for m in re.finditer(r"(?<![\w*])(\w+)(?:\.py\b|/)", line)}
        current |= {p.stem for m in re.finditer(r"(\w+\*)\.py\b", line) for p in ROOT.glob(m.group(1) + ".py")}  # mergekit_*.py
    layers.append(current)
    return layers[::-1]


def test_the_readme_picture_is_the_checked_layers():
    assert _readme_layers() == [set(names.split()) for names in LAYERS]
