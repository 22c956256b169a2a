"""The plugin boundary (issue 19), read from the source: who may import whom, no cycles, no huge modules.

Every `.py` under `agent/` and `drivers/` is parsed with `ast`; every import of an `agent` or `drivers`
module is collected with where it is (module level, inside a function, or under `if TYPE_CHECKING:`).
Each rule is one test whose failure lists every violation with its file and line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("agent", "drivers")
SDK = "drivers.sdk"
MAX_LINES = 400

#: Legacy modules that stay for one release and only re-export their new home (besides the SDK).
SHIMS: dict[str, str] = {
    "drivers.base": SDK,
    "drivers.registry": SDK,
    "drivers.serial_printer": "drivers.printer",
    "drivers.marlin": "drivers.printer",
    "drivers.inspection_report": "drivers.file_drop",
    "drivers.opcua_publish": "drivers.opcua",
}

#: What a driver's simulator must not import from its own package: the code it is an oracle for. A package
#: not listed here: every module but `config` and the simulator's own `sim*` modules. The package itself
#: (`__init__`) counts too, since it re-exports the driver.
SIM_FORBIDDEN: dict[str, frozenset[str]] = {
    "opcua": frozenset({"driver", "convert", "subscription", "publish", "security", "commission"}),
    "modbus": frozenset({"driver", "codec", "planner", "client", "commission"}),
    "printer": frozenset({"serial", "marlin", "lines", "window", "reports", "commands", "stream"}),
    "file_drop": frozenset(
        {
            "driver",
            "report",
            "report_csv",
            "report_json",
            "result",
            "scoring",
            "candidates",
            "entries",
            "folder",
            "ledger",
            "status",
            "watch",
        }
    ),
}
#: Modules of a driver package that its simulator may import.
SIM_ALLOWED = frozenset({"config"})


@dataclass(frozen=True)
class Import:
    """One import of a first-party module: who, where, what, and in which context."""

    source: str  # the importing module
    path: Path
    line: int
    target: str  # the imported module (resolved to a known module where one matches)
    module_level: bool  # executed when the module is imported (not inside a function)
    type_checking: bool  # only under `if TYPE_CHECKING:`

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def files() -> tuple[Path, ...]:
    """Every production source file."""
    return tuple(sorted(p for top in FIRST_PARTY for p in (ROOT / top).rglob("*.py")))


@cache
def sources() -> dict[str, Path]:
    """Every production module by name (a package wins over a module of the same name, as in Python)."""
    return {module_name(p): p for p in sorted(files(), key=lambda p: p.name == "__init__.py")}


def resolve(name: str) -> str:
    """The known module `name` is or lies in (`drivers.x.Class` -> `drivers.x`); else `name` itself."""
    known = sources()
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> Iterator[tuple[str, str]]:
    """(target module, the name as written) for each first-party module `node` imports."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield resolve(alias.name), alias.name
        return
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    for alias in node.names:
        # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg.
        full = f"{base}.{alias.name}" if alias.name != "*" else base
        yield resolve(full), full


def imports_of(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool, type_checking: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target, _ in _targets(node, module, is_package):
                if target.split(".")[0] in FIRST_PARTY:
                    found.append(Import(module, path, node.lineno, target, module_level, type_checking))
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            module_level = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, module_level, True)
            for child in node.orelse:
                visit(child, module_level, type_checking)
            return
        for inner in ast.iter_child_nodes(node):
            visit(inner, module_level, type_checking)

    visit(tree, True, False)
    return found


@cache
def all_imports() -> tuple[Import, ...]:
    return tuple(i for path in files() for i in imports_of(module_name(path), path))


def within(name: str, package: str) -> bool:
    """Whether module `name` is `package` or lies below it."""
    return name == package or name.startswith(package + ".")


def driver_package(module: str) -> str | None:
    """The driver a module of `drivers/` belongs to (`drivers.modbus`), None for the SDK and `drivers` itself.

    A top-level module that is not a legacy shim (a driver not yet made a package) is its own driver.
    """
    parts = module.split(".")
    if parts[0] != "drivers" or len(parts) < 2 or parts[1] == "sdk" or module in SHIMS:
        return None
    return ".".join(parts[:2])


def report(rule: str, violations: Iterable[str]) -> None:
    lines = sorted(set(violations))
    assert not lines, f"{rule}: {len(lines)} violation(s):\n  " + "\n  ".join(lines)


# ---- the rules -------------------------------------------------------------------------------------------


def test_the_walk_sees_the_tree() -> None:
    """The walker finds the packages and the kinds of import the rules depend on."""
    names = set(sources())
    assert {"agent", "agent.config", SDK, "drivers.sdk.registry", "drivers.modbus.driver"} <= names
    seen = all_imports()
    assert any(i.type_checking for i in seen), "no TYPE_CHECKING import found: the walker misses them"
    assert any(i.source == "drivers.modbus.sim" and i.target == "drivers.modbus.config" for i in seen)


def test_driver_packages_import_only_the_sdk_and_themselves() -> None:
    violations = []
    for imp in all_imports():
        if imp.source in SHIMS:
            home = SHIMS[imp.source]
            if not (within(imp.target, SDK) or within(imp.target, home)):
                violations.append(f"{imp.where()} (legacy shim of {home}) imports {imp.target}")
            continue
        own = driver_package(imp.source)
        if own is None or within(imp.target, SDK) or within(imp.target, own) or imp.target == "drivers":
            continue
        other = driver_package(imp.target) or imp.target
        what = "the agent core" if within(imp.target, "agent") else f"another driver ({other})"
        violations.append(f"{imp.where()} ({own}) imports {imp.target}: {what}; a driver imports drivers.sdk only")
    report("driver packages import only drivers.sdk and themselves", violations)


def test_agent_imports_no_concrete_driver() -> None:
    violations = []
    for imp in all_imports():
        if not within(imp.source, "agent") or not within(imp.target, "drivers"):
            continue
        if within(imp.target, SDK) or imp.target == "drivers":
            continue
        if imp.target in SHIMS:
            why = f"a legacy shim of {SHIMS[imp.target]}; import drivers.sdk"
        else:
            why = "a concrete driver; the core reaches drivers through drivers.sdk.registry only"
        violations.append(f"{imp.where()} ({imp.source}) imports {imp.target}: {why}")
    report("agent/ imports drivers.sdk only", violations)


def test_sdk_imports_neither_agent_nor_drivers() -> None:
    violations = [
        f"{imp.where()} imports {imp.target}"
        for imp in all_imports()
        if within(imp.source, SDK) and not (within(imp.target, SDK) or imp.target == "drivers")
    ]
    report("drivers/sdk imports only itself", violations)


def _is_sim(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last == "sim" or last.startswith("sim_")


def sim_forbidden(package: str) -> set[str]:
    """The modules of `package` (`drivers.x`) its simulator must not import, the package itself included."""
    short = package.split(".", 1)[1]
    members = {m.rsplit(".", 1)[1] for m in sources() if m.startswith(package + ".")}
    listed = SIM_FORBIDDEN.get(short)
    code = listed if listed is not None else {m for m in members if m not in SIM_ALLOWED and not _is_sim(m)}
    shims = {name for name, home in SHIMS.items() if home == package}
    return {package} | {f"{package}.{m}" for m in code} | shims


def test_sim_forbidden_lists_cover_each_package() -> None:
    """A package listed in SIM_FORBIDDEN classifies every module it has: a new one must be listed or allowed."""
    unclassified = []
    for short, listed in SIM_FORBIDDEN.items():
        package = f"drivers.{short}"
        members = {m.rsplit(".", 1)[1] for m in sources() if m.startswith(package + ".")}
        for m in sorted(members - listed - SIM_ALLOWED):
            if not _is_sim(m):
                unclassified.append(f"{package}.{m}: add it to SIM_FORBIDDEN[{short!r}] or SIM_ALLOWED")
        for m in sorted(listed - members):
            unclassified.append(f"{package}.{m} is listed in SIM_FORBIDDEN but does not exist")
    report("every driver module is classified for the simulator rule", unclassified)


def test_simulators_do_not_import_their_driver() -> None:
    violations = []
    for imp in all_imports():
        own = driver_package(imp.source)
        if own is None or not _is_sim(imp.source) or own == imp.source:
            continue
        forbidden = sim_forbidden(own)
        if imp.target in forbidden:
            violations.append(
                f"{imp.where()} ({imp.source}) imports {imp.target}: a simulator is an independent oracle; "
                f"it may import drivers.sdk, {own}.config and its own sim modules, never "
                + ", ".join(sorted(forbidden))
            )
    report("simulators do not import the code they test", violations)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path (first node repeated at the end) for each strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        members = set(component)
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, ()):
            continue
        # The shortest way from `start` back to itself inside the component.
        previous: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, ())):
                    if w == start:
                        found = v
                        break
                    if w in members and w not in previous:
                        previous[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        assert found is not None
        path = [found]
        while path[-1] != start:
            path.append(previous[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def test_find_cycles_reports_the_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert sorted(find_cycles(graph)) == [["a", "b", "c", "a"], ["d", "d"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {name: set() for name in sources()}
    lines: dict[tuple[str, str], Import] = {}
    for imp in all_imports():
        if imp.module_level and not imp.type_checking and imp.target in graph and imp.target != imp.source:
            graph[imp.source].add(imp.target)
            lines.setdefault((imp.source, imp.target), imp)
    violations = []
    for cycle in find_cycles(graph):
        steps = [f"{a} ({lines[(a, b)].where()})" for a, b in pairwise(cycle)]
        violations.append(" -> ".join([*steps, cycle[-1]]))
    report("no import cycles between modules (module-level imports)", violations)


def test_no_production_module_over_400_lines() -> None:
    violations = []
    for path in files():
        count = path.read_bytes().count(b"\n")
        if count > MAX_LINES:
            violations.append(f"{path.relative_to(ROOT)}: {count} lines")
    report(f"production modules have at most {MAX_LINES} lines", violations)
