"""The package's plan, checked: every import runs down the declared layer order, none in a cycle.

Each folder of ``covidseg/`` declares in its ``__init__.py`` docstring what it may import (a line
``Imports from: ...``), and the package's own docstring declares it for the commands at the top
(``Commands import from: ...``). These tests read those lines and every import in the package
(module level and inside functions), so the plan stays true as the code grows. The package's own
``__init__`` (its version) imports nothing, so any module may read it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import covidseg

PACKAGE = Path(covidseg.__file__).parent
COMMANDS = "commands"  # the modules at the top of the package
LONGEST_CALLBACK_MODULE = 250  # lines: training's callbacks, one job to a module


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """``core``, ``data``, ... for a module in a folder; ``commands`` for one at the top."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return parts[1] if (PACKAGE / parts[1]).is_dir() else COMMANDS


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The covidseg modules ``path`` imports: ``from covidseg.a import b`` counts as ``covidseg.a.b``
    where that is a module, else as ``covidseg.a``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "covidseg"}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; covidseg's imports are absolute"
            if node.module is None or node.module.split(".")[0] != "covidseg":
                continue
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
    return found


def declared_layers() -> dict[str, set[str]]:
    """Each layer's allowed imports, as its ``__init__.py`` docstring declares them."""
    layers = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}

    def allowed(docstring: str, prefix: str, where: str) -> set[str]:
        match = re.search(rf"^{prefix}:(.*?)\.?$", docstring, re.M)
        assert match, f"{where}'s docstring has no line '{prefix}: ...' saying what it may import"
        words = set(re.findall(r"[a-z]+", match.group(1)))
        unknown = words & {"core", "data", "models"} - layers
        assert not unknown, f"{where} names layers that do not exist: {unknown}"
        return (words & (layers | {COMMANDS})) | ({COMMANDS} if "commands" in words else set())

    plan = {
        layer: allowed(ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text())) or "",
                       "Imports from", f"covidseg/{layer}/__init__.py")
        for layer in layers
    }  # fmt: skip
    root = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text())) or ""
    plan[COMMANDS] = allowed(root, "Commands import from", "covidseg/__init__.py")
    return plan


def test_every_import_runs_down_the_declared_layer_order() -> None:
    plan, found = declared_layers(), modules()
    against = []
    for module, path in found.items():
        layer = layer_of(module)
        for target in imported_modules(path, set(found)):
            target_layer = layer_of(target)
            if layer == "package":
                against.append(f"{module} -> {target} (the package's __init__ imports nothing)")
            elif target_layer not in (layer, "package") and target_layer not in plan[layer]:
                against.append(f"{module} ({layer}) -> {target} ({target_layer})")
    assert against == [], "imports against the declared layer order:\n" + "\n".join(against)


def test_the_plan_keeps_inference_apart_from_training_and_the_ground_floor_at_the_bottom() -> None:
    plan = declared_layers()
    assert plan["core"] == set()
    assert not plan["inference"] & {"training", "evaluation", "serving", "data", COMMANDS}
    assert not plan["training"] & {"serving", "evaluation", COMMANDS}
    assert COMMANDS not in plan["serving"] | plan["reports"] | plan["evaluation"]
    for layer, allowed in plan.items():  # a layer's allowance is a subset of each layer's below it: no loop
        for lower in allowed:
            assert layer not in plan.get(lower, set()), f"{layer} and {lower} may import each other"


def test_no_import_cycle() -> None:
    found = modules()
    graph = {module: imported_modules(path, set(found)) - {module} for module, path in found.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path, module, target]
            if target not in state and (cycle := visit(target, [*path, module])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("path", sorted((PACKAGE / "training" / "callbacks").glob("*.py")), ids=lambda p: p.name)
def test_each_training_callback_module_keeps_to_one_job(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= LONGEST_CALLBACK_MODULE, f"{path.name} has {lines} lines: split it by job"


def test_the_layer_test_sees_a_wrong_import(tmp_path: Path) -> None:
    """The checker itself: an upward import and a cycle in a module it reads are found."""
    module = tmp_path / "upward.py"
    module.write_text("from covidseg.training.build import build_run\nimport covidseg.serve\n")
    assert imported_modules(module, set(modules())) == {"covidseg.training.build", "covidseg.serve"}
    assert layer_of("covidseg.training.build") == "training" and layer_of("covidseg.serve") == COMMANDS
    assert "training" not in declared_layers()["inference"]
