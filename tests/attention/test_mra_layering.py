"""The MRA package's layers: no import cycle, the jit code apart, the torch path without triton."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = "mra_lra.attention.mra"
ROOT = Path(__file__).resolve().parents[2] / "mra_lra" / "attention" / "mra"
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def imported_modules(name: str) -> set[str]:
    """The package's modules that `name` imports anywhere in its source (deferred imports in a
    function included): "__init__" for a name taken from the package itself."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == PACKAGE:
            found |= {a.name if a.name in MODULES else "__init__" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE + "."):
            found.add(node.module.rsplit(".", 1)[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith(PACKAGE)}
    return found - {name}


def test_no_import_cycle_and_no_module_takes_names_from_the_package():
    graph = {name: imported_modules(name) for name in MODULES}
    assert "launch" in graph["__init__"] and "kernels" in graph["launch"]  # the walk sees edges
    for name, deps in graph.items():
        if name != "__init__":
            assert "__init__" not in deps, name
    visiting, done = set(), set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in visiting, f"import cycle: {' -> '.join(path + (name,))}"
        if name in done:
            return
        visiting.add(name)
        for dep in graph[name]:
            visit(dep, path + (name,))
        visiting.discard(name)
        done.add(name)

    for name in MODULES:
        visit(name, ())


def test_kernels_module_holds_only_jit_code():
    tree = ast.parse((ROOT / "kernels.py").read_text())
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert functions and all(
        any(ast.unparse(d) == "triton.jit" for d in f.decorator_list) for f in functions
    )
    assert not [n for n in tree.body if isinstance(n, ast.ClassDef)]


@pytest.mark.parametrize("name", MODULES)
def test_each_module_imports_on_its_own(name):
    module = PACKAGE if name == "__init__" else f"{PACKAGE}.{name}"
    run = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_torch_path_and_selection_need_no_triton():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # import triton now fails
        import torch
        from mra_lra.attention import build
        from mra_lra.attention.mra import resolve_backend
        q = torch.randn(1, 2, 100, 16, requires_grad=True)
        build("mra", block_per_row=2)(q, q, q, None).sum().backward()
        assert resolve_backend("auto", torch.device("cuda")) == "torch"
        assert not [m for m in sys.modules if m.startswith("mra_lra.attention.mra.") and
                    m.rsplit(".", 1)[1] in ("kernels", "launch")]
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
