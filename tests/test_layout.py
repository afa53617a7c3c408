"""The package's shape: no import cycle between its modules, and entry points that stay thin."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mra_lra"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """The mra_lra modules `path` imports, at module level or inside functions (a deferred
    import that closes a cycle is a cycle all the same), leaving out `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("mra_lra"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                if base.startswith("mra_lra"):
                    found.add(base)
                    found.update(f"{base}.{a.name}" for a in node.names)
            else:
                visit(ast.iter_child_nodes(node))

    visit(tree.body)
    return found


def test_no_import_cycle():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {
        name: {m for m in _imports(path, name) if m in modules and m != name}
        for name, path in modules.items()
    }
    # A module's import also runs its packages' __init__ first.
    for name in graph:
        for target in list(graph[name]):
            parts = target.split(".")
            graph[name].update(
                p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in modules
            )
            graph[name].discard(name)

    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodules
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_entry_points_are_thin():
    for entry in ("train.py", "eval.py"):
        lines = [line for line in (ROOT / entry).read_text().splitlines() if line.strip()]
        assert len(lines) <= 40, entry
