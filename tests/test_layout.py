"""The shape of the code: one room per concern, imports that only go down, entry points that answer at once."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"train.py": "cars.train", "eval.py": "cars.evaluate", "predict.py": "cars.predict", "export.py": "cars.export",
                "inspect_data.py": "cars.inspect_data", "app.py": "cars.app",
                "lr_find.py": "cars.lr_find", "compare.py": "cars.compare"}


def imports_of(path: Path) -> set[str]:
    """Every cars module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cars"):
            found |= {f"cars.{alias.name}" for alias in node.names} if node.module == "cars" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("cars.")}
    return found


def graph() -> dict[str, set[str]]:
    modules = {f"cars.{p.stem}": p for p in (ROOT / "cars").glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & set(modules) for name, path in modules.items()}


def test_no_import_circles_and_no_module_imports_an_entry_point():
    edges = graph()
    for module, imported in edges.items():
        assert not imported & set(ENTRY_POINTS.values()), f"{module} imports an entry point: {imported & set(ENTRY_POINTS.values())}"
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module not in done:
            path.append(module)
            for child in edges[module]:
                visit(child)
            path.pop()
            done.add(module)

    for module in edges:
        visit(module)


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_help_answers_before_torch_is_imported(script):
    """--help is parsed by cars.cli, which imports no torch: it answers at once, not after seconds of imports."""
    probe = ("import runpy, sys\n"
             f"sys.argv = [{script!r}, '--help']\n"
             "try:\n"
             f"    runpy.run_path({str(ROOT / script)!r}, run_name='__main__')\n"
             "except SystemExit as exit:\n"
             "    assert exit.code == 0, exit.code\n"
             "print('heavy:', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy', 'datasets', 'matplotlib')))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and result.stdout.strip().endswith("heavy: []"), result.stdout[-500:]


def test_the_cam_methods_offered_are_the_ones_explained():
    from cars.cli import CAM_METHODS
    from cars.explain import CAM_METHODS as CLASSES

    assert tuple(CLASSES) == CAM_METHODS
