"""The package's shape, checked from its source (docs/architecture.md, "Layers"):
no import cycle (imports inside functions count, `if TYPE_CHECKING:` ones do not:
they never run), every import goes down the layers or stays in its own, no module
over 400 lines, and knowledge of modes and record kinds only where it belongs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nichooks"
MAX_LINES = 400

# Lower layers never import higher ones.
LAYERS = [
    ("nichooks.errors", "nichooks.log", "nichooks.safefile", "nichooks.trust", "nichooks.guard"),
    ("nichooks.model",),
    ("nichooks.settings",),
    ("nichooks.engine",),
    ("nichooks.host",),
    ("nichooks.modes",),
    ("nichooks.ops",),
    ("nichooks.callers",),
    ("nichooks.serve", "nichooks.entry", "nichooks.cli", "nichooks.install", "nichooks.demo"),
]
# Where a mode's name or a record's kind may be compared with a literal.
MODE_AND_KIND_AWARE = ("nichooks.modes", "nichooks.engine.records")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> int:
    for number, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return number
    raise AssertionError(f"{name} is in no layer: add it to LAYERS and docs/architecture.md")


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str) -> set[str]:
    """The nichooks modules `name` imports when it runs, wherever the import statement is."""
    tree = ast.parse(MODULES[name].read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in MODULES and m != name and m != "nichooks"}


GRAPH = {name: imports(name) for name in MODULES}


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def walk(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                walk(dep, [*path, dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            walk(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_go_down_the_layers() -> None:
    upward = [f"{name} ({layer(name)}) imports {dep} ({layer(dep)})"
              for name, deps in sorted(GRAPH.items()) for dep in sorted(deps)
              if name != "nichooks" and layer(dep) > layer(name)]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it by job"


def _literals(node: ast.expr) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_literals(e) for e in node.elts)) if node.elts else set()
    return set()


def _named(node: ast.expr, what: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == what) or \
        (isinstance(node, ast.Name) and node.id == what)


def compares_mode_or_kind(tree: ast.AST, modes: set[str], kinds: set[str]) -> list[ast.Compare]:
    """`x.mode == "routed"`, `record.kind in ("ovs.port", ...)`: a mode or kind attribute
    (or variable) compared with the literal name of a registered mode or record kind.
    Other `mode`s and `kind`s (a link's kind "bridge", the anti-spoofing mode "mac",
    an OVSDB remote's "unix") are not this project's modes or record kinds."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            literals = set().union(*(_literals(s) for s in sides))
            if (any(_named(s, "mode") for s in sides) and literals & modes) or \
                    (any(_named(s, "kind") for s in sides) and literals & kinds):
                found.append(node)
    return found


def registered() -> tuple[set[str], set[str]]:
    from nichooks.engine.records import KINDS
    from nichooks.modes import registry

    registry.load_all()
    return set(registry.PLACES), set(KINDS)


def test_mode_and_kind_knowledge_stays_in_modes_and_records() -> None:
    modes, kinds = registered()
    outside = [f"{name}:{node.lineno}: {ast.unparse(node)}" for name in sorted(MODULES)
               if not name.startswith(MODE_AND_KIND_AWARE)
               for node in compares_mode_or_kind(ast.parse(MODULES[name].read_text()), modes, kinds)]
    assert not outside, "\n".join(outside)


def test_the_checks_can_fail() -> None:
    """Each check above finds what it looks for in code written to have it."""
    modes, kinds = registered()
    sample = ast.parse('if journal.mode == "routed" or r.kind in ("route.proxy",):\n    pass\n'
                       'if link.kind == "openvswitch" or guest.mode == "mac":\n    pass\n')
    assert len(compares_mode_or_kind(sample, modes, kinds)) == 2
    guarded = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\n")
    assert _type_checking_only(guarded.body[1])
    assert layer("nichooks.engine.journal") < layer("nichooks.ops.plug")


def test_each_record_kind_is_registered_by_the_module_the_registry_names() -> None:
    """An undo imports only the module KIND_PLACES names for a record's kind: that
    import alone must register the kind's undo, check and rebuild, and every kind there
    is must be named (a fresh interpreter each, so nothing else is imported already)."""
    import subprocess
    import sys

    from nichooks.engine.records import KINDS
    from nichooks.modes import registry

    registry.load_all()
    assert set(registry.KIND_PLACES) == {k for k in KINDS if not k.startswith("test.")}
    for kind, place in sorted(registry.KIND_PLACES.items()):
        probe = (f"import importlib; importlib.import_module({place!r}); "
                 "from nichooks.engine.records import KINDS; "
                 f"k = KINDS[{kind!r}]; "
                 "assert None not in (k.undo, k.present, k.rebuild), vars(k)")
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert r.returncode == 0, f"{kind} from {place}: {r.stderr.strip().splitlines()[-1:]}"
