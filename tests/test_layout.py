"""The shape of the code: the tools at the root over the cars/ library, imports that only go down, tools that answer
--help at once."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = sorted(p.name for p in ROOT.glob("*.py"))


def imports_of(path: Path) -> set[str]:
    """Every module a file imports when it runs, at the top or inside a function (`from cars import x` names cars.x);
    not those under `if TYPE_CHECKING:`, which only annotations read."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"cars.{alias.name}" for alias in node.names} if node.module == "cars" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {f"cars.{p.stem}": p for p in (ROOT / "cars").glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & set(modules) for name, path in modules.items()}


def test_the_tools_are_the_scripts_at_the_root_over_the_library():
    assert TOOLS == [
        "app.py",
        "compare.py",
        "curves.py",
        "eval.py",
        "export.py",
        "inspect_data.py",
        "interpolate.py",
        "lr_find.py",
        "predict.py",
        "soup.py",
        "sweep.py",
        "train.py",
    ]
    tools = {name.removesuffix(".py") for name in TOOLS}
    for path in (ROOT / "cars").glob("*.py"):
        assert not imports_of(path) & tools, f"library module {path.name} imports a tool: {imports_of(path) & tools}"
    # a tool stands on the library alone; a sweep's trial (and a curve's cell) is train.py's recipe itself, run in
    # the sweep's process so that the pruner can stop it between epochs; a WiSE-FT cell's mix is interpolate.py's
    allowed = {"sweep.py": {"train"}, "curves.py": {"train", "interpolate"}}
    for name in TOOLS:
        assert imports_of(ROOT / name) & tools <= allowed.get(name, set()), f"{name} imports another tool"


def test_no_import_circles_in_the_library():
    edges = graph()
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module) :] + [module]))
        if module not in done:
            path.append(module)
            for child in edges[module]:
                visit(child)
            path.pop()
            done.add(module)

    for module in edges:
        visit(module)


@pytest.mark.parametrize("script", TOOLS)
def test_help_answers_before_torch_is_imported(script):
    """--help is parsed by cars.cli, which imports no torch: it answers at once, not after seconds of imports."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / script)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "print('heavy:', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy', "
        "'datasets', 'matplotlib')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and result.stdout.strip().endswith("heavy: []"), result.stdout[-500:]


def test_the_cam_methods_offered_are_the_ones_explained():
    import pytorch_grad_cam

    from cars.cli import CAM_METHODS
    from cars.explain import CAM_METHODS as CLASSES

    assert tuple(CLASSES) == CAM_METHODS
    assert all(isinstance(getattr(pytorch_grad_cam, name, None), type) for name in CLASSES.values())


POSITIONAL_AT_MOST = 5  # a wider signature takes the rest by keyword, so that a call says what each value is


def test_wide_signatures_take_keywords():
    """The recipe's rule: a function with more than five parameters takes the rest keyword-only (after a `*`)."""
    files = [*ROOT.glob("*.py"), *(ROOT / "cars").glob("*.py"), *(ROOT / "bench").glob("*.py"), *ROOT.glob("docs/*.py")]
    wide = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(positional) > POSITIONAL_AT_MOST:
                    wide.append(f"{path.relative_to(ROOT)}: {node.name}({', '.join(positional)})")
    assert not wide, "make the later parameters keyword-only: " + "; ".join(wide)
