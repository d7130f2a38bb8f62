"""The import graph of the top-level packages (grimp, function-level imports included): no cycle between
packages, nor between the modules of any package; layers that point one way, from the command line down to the wire
format; and inside `benchmarks/`, its commands over its tools over their shared base."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests")

# Top to bottom: a package may import any package below its own layer, never one above it. The three servers
# never import each other (they talk over gRPC and the feature transport); what they share sits below them.
# The bottom shared layer's packages may import each other (none does today): each stands alone in its job.
LAYERS = [
    "dvd",  # the command line
    "benchmarks",  # `dvd bench`: starts stacks, measures the servers' parts
    "planner",  # `dvd plan`: capacity planning from stage profiles
    grimp.Layer("vision_server", "language_server", "gateway", independent=True),
    grimp.Layer("transport", "checkpoint", "contracts", "launcher", independent=False),
    "proto",  # the generated gRPC and feature-header messages
]


# Inside `benchmarks/`: `dvd bench`'s commands, then the tools (every other module or sub-package), then the base
# they share. The tools may use each other (compare -> report) as long as no cycle forms; the base uses no tool.
BENCHMARK_COMMANDS, BENCHMARK_BASE = "cli", "toolkit"
BENCHMARK_TOOLS = sorted(({p.stem for p in (ROOT / "benchmarks").glob("*.py")}
                          | {p.parent.name for p in (ROOT / "benchmarks").glob("*/__init__.py")})
                         - {"__init__", BENCHMARK_COMMANDS, BENCHMARK_BASE})
BENCHMARK_LAYERS = [BENCHMARK_COMMANDS, grimp.Layer(*BENCHMARK_TOOLS, independent=False), BENCHMARK_BASE]


def _names(layer) -> set[str]:
    return set(layer.module_tails) if isinstance(layer, grimp.Layer) else {layer}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    for package in PACKAGES:  # the repository's own code, not an installed copy elsewhere
        origin = Path(importlib.util.find_spec(package).origin).resolve()
        assert origin.is_relative_to(ROOT), f"{package} found at {origin}, not in {ROOT}"
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def _import_line(graph: grimp.ImportGraph, importer: str, imported: str) -> str:
    """One import from package `importer` into package `imported`, as `module:line: statement`."""
    for module in sorted(graph.find_descendants(importer) | {importer}):
        for target in sorted(graph.find_modules_directly_imported_by(module)):
            if target == imported or target.startswith(imported + "."):
                detail = graph.get_import_details(importer=module, imported=target)[0]
                return f"{module}:{detail['line_number']}: {detail['line_contents']}"
    raise AssertionError(f"no import from {importer} into {imported}")


def _cycle(graph: grimp.ImportGraph, modules: list[str]) -> list[str] | None:
    """A cycle among sibling `modules` (each with everything below it; the first one back at the end), or None."""
    edges = {a: [b for b in modules if b != a and graph.direct_import_exists(importer=a, imported=b,
                                                                              as_packages=True)]
             for a in modules}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for imported in edges[module]:
            cycle = visit(imported, path + [module])
            if cycle:
                return cycle
        done.add(module)
        return None

    for module in modules:
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


def _illegal(graph: grimp.ImportGraph, layers: list, containers: set[str] | None = None) -> list[str]:
    """Each import against `layers` (top to bottom), as `importer -> imported: route`."""
    lines = []
    for dependency in sorted(graph.find_illegal_dependencies_for_layers(layers=layers, containers=containers)):
        for route in sorted(dependency.routes):
            chain = [f"{{{', '.join(sorted(route.heads))}}}", *route.middle, f"{{{', '.join(sorted(route.tails))}}}"]
            lines.append(f"  {dependency.importer} -> {dependency.imported}: " + " -> ".join(chain))
    return lines


def test_every_top_level_package_has_a_layer():
    placed = set().union(*map(_names, LAYERS))
    assert placed == set(PACKAGES), f"place {sorted(set(PACKAGES) - placed)} in LAYERS; " \
                                    f"{sorted(placed - set(PACKAGES))} no longer exist"


def test_no_import_cycle_between_top_level_packages(graph):
    cycle = _cycle(graph, PACKAGES)
    if cycle:
        pytest.fail("import cycle " + " -> ".join(cycle) + ":\n" + "\n".join(
            f"  {a} -> {b}: {_import_line(graph, a, b)}" for a, b in zip(cycle, cycle[1:])))


def test_no_import_cycle_between_the_modules_of_any_package(graph):
    """At every depth: the modules and sub-packages of one package (each with what lies below it) import each
    other one way only."""
    found = []
    for package in sorted(graph.modules):
        children = sorted(graph.find_children(package))
        cycle = _cycle(graph, children) if len(children) > 1 else None
        if cycle:
            found.append(" -> ".join(cycle) + ":\n" + "\n".join(
                f"    {a} -> {b}: {_import_line(graph, a, b)}" for a, b in zip(cycle, cycle[1:])))
    if found:
        pytest.fail("import cycles inside packages:\n  " + "\n  ".join(found))


def test_layers_point_one_way(graph):
    lines = _illegal(graph, LAYERS)
    if lines:
        pytest.fail("imports against the layers (top to bottom: " + " > ".join(
            "/".join(sorted(_names(layer))) for layer in LAYERS) + "):\n" + "\n".join(lines))


def test_benchmark_commands_sit_on_tools_that_sit_on_the_shared_base(graph):
    assert BENCHMARK_TOOLS and "benchmarks.toolkit" in graph.modules, "benchmarks/ lost its tools or its base"
    lines = _illegal(graph, BENCHMARK_LAYERS, containers={"benchmarks"})
    if lines:
        pytest.fail("imports against benchmarks/'s layers (top to bottom: cli > the tools > toolkit):\n"
                    + "\n".join(lines))
