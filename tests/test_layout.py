"""The package's dependencies point one way (README, "Layout"; the module map at the top of pipeline.py).

Read from the source, every import counted, also those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lora_export"
ENTRY_POINTS = {"lora_export.cli", "lora_export.demo"}  # the only importers of the recipe (pipeline)


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every import in the module, at any depth."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub, None) if sub in MODULES else (base, a.name))
    return [(m, n) for m, n in found if m in MODULES and m != name]


GRAPH = {name: {m for m, _ in _imports(name)} for name in MODULES}


def test_the_reader_sees_every_module_and_its_imports():
    assert {"lora_export.pipeline", "lora_export.exportdir", "lora_export.export.genai_builder"} <= set(MODULES)
    assert "lora_export.exportdir" in GRAPH["lora_export.pipeline"]
    assert "lora_export.switchable_parity" in GRAPH["lora_export.pipeline"]  # a lazy import, inside validate()


def test_no_import_cycles():
    try:
        tuple(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"an import cycle: {' -> '.join(e.args[1])}")


def test_only_the_entry_points_import_the_recipe():
    importers = {m for m, deps in GRAPH.items() if "lora_export.pipeline" in deps}
    assert importers <= ENTRY_POINTS, f"{sorted(importers - ENTRY_POINTS)} import pipeline: move what they need " \
                                      "to a module below it (exportdir, prompts, sidepath, reference)"


RECIPES = {f"lora_export.{m}" for m in ("pipeline", "switchable", "switchable_parity", "switchable_bench", "cli",
                                        "demo")}
STAGES = RECIPES | {f"lora_export.{m}" for m in ("train", "adapters", "merge", "parity", "latency", "runtime",
                                                 "reference", "exportdir", "memory", "prompts", "sidepath")} | {
    m for m in MODULES if m.split(".")[:2] in (["lora_export", "export"], ["lora_export", "quantize"])}
CORE = ("manifests", "progress", "checkpoint", "nf4math", "fingerprint", "errors", "jsonfile", "tensorfile",
        "outputs", "isolate", "base", "quantized_base", "data", "precision", "versions", "families")
SHARED = ("exportdir", "memory", "prompts", "sidepath", "reference")  # between the stages and the recipes


def test_the_core_imports_no_stage():
    """The records and helpers every stage builds on sit below all of them (README, "Layout")."""
    for low in CORE:
        assert not GRAPH[f"lora_export.{low}"] & STAGES, f"{low} imports {GRAPH[f'lora_export.{low}'] & STAGES}"


def test_what_the_recipes_share_imports_no_recipe():
    for shared in SHARED:
        assert not GRAPH[f"lora_export.{shared}"] & RECIPES, f"{shared} imports {GRAPH[f'lora_export.{shared}'] & RECIPES}"


def test_no_module_takes_a_private_name_from_another():
    taken = sorted((m, src, n) for m in MODULES for src, n in _imports(m) if n and n.startswith("_"))
    assert taken == [], taken
