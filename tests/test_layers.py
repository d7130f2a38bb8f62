"""The import graph of the top-level packages (grimp, function-level imports included): no cycle between
packages, and layers that point one way, from the command line down to the wire format."""

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


def _package_cycle(graph: grimp.ImportGraph) -> list[str] | None:
    """A cycle of top-level packages (the first one back at the end), or None."""
    edges = {a: [b for b in PACKAGES if b != a and graph.direct_import_exists(importer=a, imported=b,
                                                                               as_packages=True)]
             for a in PACKAGES}
    done: set[str] = set()

    def visit(package: str, path: list[str]) -> list[str] | None:
        if package in path:
            return path[path.index(package):] + [package]
        if package in done:
            return None
        for imported in edges[package]:
            cycle = visit(imported, path + [package])
            if cycle:
                return cycle
        done.add(package)
        return None

    for package in PACKAGES:
        cycle = visit(package, [])
        if cycle:
            return cycle
    return None


def test_every_top_level_package_has_a_layer():
    placed = set().union(*map(_names, LAYERS))
    assert placed == set(PACKAGES), f"place {sorted(set(PACKAGES) - placed)} in LAYERS; " \
                                    f"{sorted(placed - set(PACKAGES))} no longer exist"


def test_no_import_cycle_between_top_level_packages(graph):
    cycle = _package_cycle(graph)
    if cycle:
        pytest.fail("import cycle " + " -> ".join(cycle) + ":\n" + "\n".join(
            f"  {a} -> {b}: {_import_line(graph, a, b)}" for a, b in zip(cycle, cycle[1:])))


def test_layers_point_one_way(graph):
    illegal = graph.find_illegal_dependencies_for_layers(layers=LAYERS)
    lines = []
    for dependency in sorted(illegal):
        for route in sorted(dependency.routes):
            chain = [f"{{{', '.join(sorted(route.heads))}}}", *route.middle, f"{{{', '.join(sorted(route.tails))}}}"]
            lines.append(f"  {dependency.importer} -> {dependency.imported}: " + " -> ".join(chain))
    if illegal:
        pytest.fail("imports against the layers (top to bottom: " + " > ".join(
            "/".join(sorted(_names(layer))) for layer in LAYERS) + "):\n" + "\n".join(lines))
