"""The package layout is the pipeline: each stage imports only from the stages before it, with no cycles."""

import ast
from pathlib import Path

import pudding

ROOT = Path(pudding.__file__).parent
# the stages in the order data flows through them; a module may import from its own stage or an earlier one
STAGES = ("core", "pool", "pruning", "healing", "routing", "serving", "evaluation")
TOP = ("cli", "cli_config", "__main__", "__init__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """Every pudding module ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("pudding"):
            for alias in node.names:  # `from pudding.core import load` imports the module pudding.core.load
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pudding.")}
    return {name for name in found if name in MODULES and name != "pudding"}


def stage_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return STAGES.index(part) if part in STAGES else len(STAGES)


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def test_every_module_belongs_to_a_stage_or_the_top_level():
    for name in MODULES:
        parts = name.split(".")
        assert len(parts) == 1 or parts[1] in STAGES or parts[1] in TOP, name


def test_no_stage_imports_a_later_stage():
    upward = [f"{src} -> {dst}" for src, deps in GRAPH.items() for dst in deps if stage_of(dst) > stage_of(src)]
    assert not upward, "imports that run back up the pipeline:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    """Depth-first search over module imports (lazy ones included); a back edge is a cycle."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_cycle_check_catches_a_cycle(monkeypatch):
    """The check above can fail: a planted two-module cycle is reported."""
    monkeypatch.setitem(GRAPH, "pudding.core.errors", GRAPH["pudding.core.errors"] | {"pudding.core.omit"})
    try:
        test_no_import_cycle()
    except AssertionError as error:
        assert "pudding.core.errors" in str(error) and "pudding.core.omit" in str(error)
    else:
        raise AssertionError("a planted cycle went unnoticed")
