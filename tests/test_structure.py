"""The package's modules import each other without cycles: module-level, function-level and through importlib."""
import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "modelscope_plugin"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: Set[str]) -> Set[str]:
    """Every package module ``path`` imports anywhere in its body (``from a.b import c`` counts ``a.b.c`` when that
    is a module, else ``a.b``), including ``importlib.import_module("...")`` with a literal name."""
    found: Set[str] = set()
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
            elif node.args:
                names = ["<computed>"]
        for name in names:
            if name == "<computed>":
                found.add(name)
                continue
            # importing a.b.c runs a and a.b first
            parts = name.split(".")
            found.update(".".join(parts[:end]) for end in range(1, len(parts) + 1) if ".".join(parts[:end]) in known)
    found.discard(module)
    return found


def import_graph() -> Dict[str, Set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, known) for path in paths}


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle as [a, b, ..., a], or [] when the graph has none. A package's ``__init__`` importing its own
    submodules is not a cycle (Python runs the package first either way), so edges into an ancestor package are
    left out."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if node.startswith(target + "."):
                continue
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target in graph and not state.get(target):
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if not state.get(node):
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}}) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycle({"p": {"p.a"}, "p.a": {"p"}, "p.b": {"p.a"}}) == []


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    assert len(graph) > 50 and graph["modelscope_plugin.integration.pipeline"]
    assert find_cycle(graph) == []


# modules that import by a computed name, and what they import that way (never a module of this package)
COMPUTED_IMPORTS = {"modelscope_plugin.integration.pipeline": "ModelScope's built-in pipelines (BUILTIN_PIPELINE_MODULES)"}


def test_no_module_is_imported_through_a_computed_name():
    from modelscope_plugin.integration.pipeline import BUILTIN_PIPELINE_MODULES

    graph = import_graph()
    assert {module for module, imports in graph.items() if "<computed>" in imports} == set(COMPUTED_IMPORTS)
    assert all(name.startswith("modelscope.") for name in BUILTIN_PIPELINE_MODULES.values())


def test_errors_imports_nothing_of_the_package():
    assert import_graph()["modelscope_plugin.errors"] == set()


def test_import_registers_without_importing_networks_trainer_or_metrics():
    """``import modelscope_plugin`` only points ModelScope's index at the package's modules; they are imported (and
    register their classes) when ModelScope first builds one of them."""
    import subprocess
    import sys

    code = ("import sys, modelscope_plugin\n"
            "from modelscope.utils.import_utils import LazyImportModule\n"
            "index = LazyImportModule.get_ast_index()['index']\n"
            "print(sorted(name for name in ('torchvision', 'modelscope_plugin.integration.model', "
            "'modelscope_plugin.integration.pipeline', 'modelscope_plugin.integration.trainer', "
            "'modelscope_plugin.evaluation', 'modelscope_plugin.data.datasets') if name in sys.modules))\n"
            "print(index[('PIPELINES', 'image-segmentation', 'fast-instance-segmentation')]['module'])\n"
            "print(index[('METRICS', 'default', 'segmentation-panoptic-quality')]['module'])\n")
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=PACKAGE.parent).stdout.strip().splitlines()
    assert lines[-3:] == ["[]", "modelscope_plugin.integration.pipeline", "modelscope_plugin.evaluation.metrics"]
