"""The sonett package's internal imports form no cycle (checkpointing and pretraining once imported each other).

Every module is parsed with `ast`, so imports under `if TYPE_CHECKING:` and inside functions count too: a cycle
through any of them is still two modules that cannot be read, or moved, one without the other.
"""

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "modeling"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each sonett module -> the sonett modules it names in an import statement (a package means its __init__)."""
    paths = {module_name(path): path for path in (PACKAGE_ROOT / "sonett").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets.add(module)
                targets.update(f"{module}.{alias.name}" for alias in node.names)  # `from sonett.x import module`
        graph[name] = {target for target in targets if target in paths and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of modules (the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target, stack)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_graph_sees_the_imports_it_must():
    graph = import_graph()
    assert "sonett.model.modeling_sonett" in graph["sonett"]  # a relative import of a package's __init__
    assert "sonett.model.configuration_sonett" in graph["sonett.model.modeling_sonett"]  # `from .x import`
    assert "sonett.training.checkpointing" in graph["sonett.training.pretraining"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
