"""The layers of the code, read from the import statements of every ``leffa/**/*.py`` (with ``ast``,
so nothing is imported to check them):

- ``leffa`` is the library and imports none of the code built on it: ``data_prep`` (which imports
  ``leffa``), ``replicate``, ``benchmarks``, ``tests``;
- the command modules, those that ``leffa.cli`` dispatches to (``leffa.cli.EXTRA_COMMANDS``), sit
  below ``leffa.cli`` and above the rest: only ``leffa.cli`` imports them, and no module of ``leffa``
  imports another command's module (what two commands share lives in a module that is not a command);
- the modules of ``leffa`` import each other at module level without a cycle.

Imports inside functions count for the first two rules, not for the third (a lazy import runs after
every module is loaded).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from leffa import cli

ROOT = Path(__file__).resolve().parents[1]
ABOVE_LEFFA = ("data_prep", "replicate", "benchmarks", "tests")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted((ROOT / "leffa").rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """The modules an import statement names: for ``from a import b``, ``a.b`` where that is a module
    of leffa, else ``a``; a relative import is resolved against ``importer``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    named = [f"{base}.{alias.name}" for alias in node.names]
    return [name for name in named if name in MODULES] or [base]


def _imports(name: str, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement of module ``name``."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))
    if top_level_only:
        nodes, stack = [], list(tree.body)
        while stack:  # the module body, also inside top-level try/if blocks (not `if TYPE_CHECKING:`)
            node = stack.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                stack += node.orelse
            elif isinstance(node, (ast.If, ast.Try)):
                stack += node.body + node.orelse + getattr(node, "finalbody", []) + [
                    n for handler in getattr(node, "handlers", []) for n in handler.body
                ]
            else:
                nodes.append(node)
    else:
        nodes = list(ast.walk(tree))
    return [
        (target, node.lineno)
        for node in nodes
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for target in _targets(node, name)
    ]


def _is_or_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def command_modules() -> set[str]:
    """The modules whose functions ``leffa.cli`` dispatches its extra commands to (read from the
    import statements in the functions of ``EXTRA_COMMANDS``)."""
    found = set()
    for function in cli.EXTRA_COMMANDS.values():
        tree = ast.parse(inspect.getsource(function))
        found |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return found


def test_the_modules_are_found():
    assert {"leffa", "leffa.cli", "leffa.data", "leffa.data.shards", "leffa.shard_writer"} <= set(MODULES)
    assert command_modules() == {"leffa.evaluate", "leffa.visualize", "leffa.export", "leffa.cache_latents"}


def test_leffa_imports_nothing_built_on_it():
    wrong = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
        for name in MODULES
        for target, line in _imports(name)
        if any(_is_or_under(target, above) for above in ABOVE_LEFFA)
    ]
    assert not wrong, "leffa is the library; it must not import the code above it:\n" + "\n".join(wrong)


def test_only_the_cli_imports_the_command_modules():
    commands = command_modules()
    wrong = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports the command module {target}"
        for name in MODULES
        if name != "leffa.cli"
        for target, line in _imports(name)
        if target in commands and target != name
    ]
    assert not wrong, (
        "only leffa.cli imports a command's module; move what is shared into a module that is not a command:\n"
        + "\n".join(wrong)
    )


def test_nothing_in_leffa_imports_the_dispatcher():
    # leffa.cli is the top: the commands and the library reach Lightning's CLI through leffa.lightning_cli
    wrong = [f"{MODULES[name].relative_to(ROOT)}:{line} imports leffa.cli"
             for name in MODULES if name != "leffa.cli" for target, line in _imports(name) if target == "leffa.cli"]
    assert not wrong, "\n".join(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (``[a, b, ..., a]``), or None; depth-first search with three colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_cycle_at_module_level():
    graph = {
        name: {target for target, _ in _imports(name, top_level_only=True) if target in MODULES and target != name}
        for name in MODULES
    }
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among leffa's modules (top-level imports): " + " -> ".join(cycle)
