"""The package's plan, checked: every import runs down the declared layer order, none in a cycle.

Each folder of ``covidseg/`` declares in its ``__init__.py`` docstring what it may import (a line
``Imports from: ...``), and the package's own docstring declares it for the commands at the top
(``Commands import from: ...``). These tests read those lines, every import in the package (module
level and inside functions, ``importlib.import_module("covidseg...")`` and ``covidseg.x.y``
attribute chains included) and every ``_target_`` in ``conf/``, so the plan stays true as the code
grows. The package's own ``__init__`` (its version) imports nothing, so any module may read it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import covidseg

PACKAGE = Path(covidseg.__file__).parent
CONF = PACKAGE.parent / "conf"
COMMANDS = "commands"  # the modules at the top of the package
ROOT = "package"  # covidseg/__init__.py
NOTHING = "nothing of covidseg's but itself"
LONGEST_CALLBACK_MODULE = 250  # lines: training's callbacks, one job to a module


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """``core``, ``data``, ... for a module in a folder; ``commands`` for one at the top."""
    parts = module.split(".")
    if len(parts) == 1:
        return ROOT
    return parts[1] if (PACKAGE / parts[1]).is_dir() else COMMANDS


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _known_prefix(dotted: str, known: set[str]) -> str:
    """The longest module of ``known`` that ``dotted`` (a module, or a name in one) starts with."""
    parts = dotted.split(".")
    return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in known), dotted)


def imported_modules(source: str, known: set[str], where: str = "<source>") -> set[str]:
    """The covidseg modules ``source`` imports: ``from covidseg.a import b`` counts as ``covidseg.a.b``
    where that is a module, else as ``covidseg.a``; ``import_module("covidseg.x")`` and
    ``covidseg.x.y`` attribute chains count as imports of the modules they name."""
    found: set[str] = set()
    tree = ast.parse(source, where)
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}  # parts of a longer chain
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "covidseg"}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{where}: relative import; covidseg's imports are absolute"
            if node.module is None or node.module.split(".")[0] != "covidseg":
                continue
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name == "import_module" and str(node.args[0].value).startswith("covidseg."):
                found.add(_known_prefix(node.args[0].value, known))
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            chain, part = [node.attr], node.value
            while isinstance(part, ast.Attribute):
                chain.append(part.attr)
                part = part.value
            if isinstance(part, ast.Name) and part.id == "covidseg" and len(chain) > 0:
                dotted = ".".join(["covidseg", *reversed(chain)])
                if (prefix := _known_prefix(dotted, known)) != "covidseg":
                    found.add(prefix)
    return found


def parse_allowance(docstring: str, prefix: str, layers: set[str], where: str) -> set[str]:
    """The layers a ``<prefix>: a, b and c.`` line names; every item must be a layer, "the
    commands", or that the layer imports nothing of covidseg's."""
    match = re.search(rf"^{prefix}:(.*?)\.?$", docstring, re.M)
    assert match, f"{where}'s docstring has no line '{prefix}: ...' saying what it may import"
    text = match.group(1).strip()
    if text == NOTHING:
        return set()
    items = [item.strip() for item in re.split(r",|\band\b", text) if item.strip()]
    unknown = [item for item in items if item not in layers and item != "the commands"]
    assert not unknown, f"{where} names what is not a layer of covidseg: {unknown}"
    return {COMMANDS if item == "the commands" else item for item in items}


def declared_layers() -> dict[str, set[str]]:
    """Each layer's allowed imports, as the docstrings declare them."""
    layers = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}

    def docstring(path: Path) -> str:
        return ast.get_docstring(ast.parse(path.read_text())) or ""

    plan = {
        layer: parse_allowance(docstring(PACKAGE / layer / "__init__.py"), "Imports from", layers, layer)
        for layer in layers
    }
    plan[COMMANDS] = parse_allowance(docstring(PACKAGE / "__init__.py"), "Commands import from", layers, "covidseg")
    return plan


def violations(found: dict[str, set[str]], plan: dict[str, set[str]]) -> list[str]:
    """``module (layer) -> target (layer)`` for each import of ``found`` that the plan does not allow."""
    against = []
    for module, targets in sorted(found.items()):
        layer = layer_of(module)
        for target in sorted(targets):
            target_layer = layer_of(target)
            if layer == ROOT:
                against.append(f"{module} -> {target} (the package's __init__ imports nothing)")
            elif target_layer not in (layer, ROOT) and target_layer not in plan[layer]:
                against.append(f"{module} ({layer}) -> {target} ({target_layer})")
    return against


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {
        module: imported_modules(path.read_text(), set(found), str(path)) - {module} for module, path in found.items()
    }


def test_every_import_runs_down_the_declared_layer_order() -> None:
    against = violations(import_graph(), declared_layers())
    assert against == [], "imports against the declared layer order:\n" + "\n".join(against)


def test_every_target_in_the_configs_is_one_training_may_build() -> None:
    """Training builds every ``_target_`` of conf/ (callbacks, data, model): each must be a class
    of a layer training may import, and exist."""
    import importlib

    allowed = declared_layers()["training"] | {"training"}
    targets = set()
    for path in CONF.rglob("*.yaml"):
        targets |= set(re.findall(r"_target_:\s*(covidseg\.[\w.]+)", path.read_text()))
    assert targets, "no covidseg _target_ found in conf/"
    known = set(modules())
    for target in sorted(targets):
        module = _known_prefix(target, known)
        assert layer_of(module) in allowed, f"conf/ builds {target} ({layer_of(module)}), which training may not import"
        assert hasattr(importlib.import_module(module), target.removeprefix(module + ".").split(".")[0]), target


def test_the_plan_keeps_inference_apart_from_training_and_the_ground_floor_at_the_bottom() -> None:
    plan = declared_layers()
    assert plan["core"] == set()
    assert not plan["inference"] & {"training", "evaluation", "serving", "data", COMMANDS}
    assert not plan["training"] & {"serving", COMMANDS}
    assert COMMANDS not in plan["serving"] | plan["reports"] | plan["evaluation"]
    assert COMMANDS in plan["benchmarks"] and "benchmarks" not in plan[COMMANDS]

    def below(layer: str, path: tuple[str, ...]) -> None:  # the declared order itself has no loop
        for lower in plan.get(layer, set()):
            assert lower not in path, f"the plan loops: {' -> '.join((*path, layer, lower))}"
            below(lower, (*path, layer))

    for layer in plan:
        below(layer, ())


def test_no_import_cycle() -> None:
    graph = import_graph()
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


def test_the_checker_finds_every_kind_of_wrong_import() -> None:
    known = set(modules())
    source = (
        "from covidseg.training.build import build_run\n"
        "import covidseg\n"
        "def later():\n"
        "    import importlib\n"
        "    importlib.import_module('covidseg.serving.app')\n"
        "    return covidseg.evaluation.test_loop.load_for_data\n"
    )
    seen = imported_modules(source, known)
    assert seen == {"covidseg.training.build", "covidseg", "covidseg.serving.app", "covidseg.evaluation.test_loop"}
    plan = declared_layers()
    against = violations({"covidseg.inference.upward": seen}, plan)
    assert len(against) == 3 and all(line.startswith("covidseg.inference.upward (inference)") for line in against)
    assert violations({"covidseg.training.fine": {"covidseg.core.errors", "covidseg.inference.loader"}}, plan) == []
    with pytest.raises(AssertionError, match="names what is not a layer"):
        parse_allowance("Imports from: core, servng.", "Imports from", {"core", "serving"}, "x")
