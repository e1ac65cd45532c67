"""The project's modules form layers: none imports a module that imports it back, however indirectly, and
type-only or function-level imports count too."""

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

MLP = Path(__file__).resolve().parent.parent / "mlp"


def imports_of(path: Path) -> set[str]:
    """The mlp modules a file imports anywhere in it, by name (`mlp.study` as `study`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mlp":
            if node.module == "mlp":  # from mlp import final
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("mlp.")}
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = {path.stem: imports_of(path) for path in MLP.glob("*.py")}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        raise AssertionError(f"an import loop: {' -> '.join(error.args[1])}") from None
    # The tuning layers, each importing only those before it.
    layers = ["search", "study", "trials", "final", "report", "tune"]
    assert [name for name in order if name in layers] == layers
    assert "gpu_sizing" in graph["tune"] and not {"trials", "final", "report", "tune"} & graph["gpu_sizing"]


def test_the_walk_sees_type_only_and_function_level_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mlp.tune import run_study\n"
        "def f():\n    import mlp.report\n    from mlp import final\n"
    )
    assert imports_of(source) == {"tune", "report", "final"}


def test_no_class_is_over_200_lines():
    """Classes a reader can hold in mind at once (the model, the stack, the CLI are the longest)."""
    long = [f"{path.name}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in MLP.glob("*.py") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 200]
    assert not long, long
