"""The package layering of docs/architecture.md, checked on the source with ``ast`` (no imports run).

* No import cycle between modules (function-level imports count: they couple modules the same way).
  ``from pkg import submodule`` is an edge to the submodule only, not to ``pkg/__init__``.
* Between packages: an import may only point to the same or a lower layer, and the package graph has
  no cycle (so two packages on the same layer may use each other in one direction only).

A new package must be added to LAYERS (and to docs/architecture.md).
"""
from __future__ import annotations

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_kd"

LAYERS: list[set[str]] = [
    {"__init__", "config"},                       # 0: the version, the YAML/dataclass config loader
    {"runtime", "utils"},                         # 1: process groups, parallel primitives, device; I/O helpers
    {"models"},                                   # 2: model configs, presets, GPT builder
    {"losses"},                                   # 3: LM and KD losses on vocab-parallel logits
    {"data"},                                     # 4: tokenizers, indexed datasets, GPT datasets
    {"training"},                                 # 5: the Trainer, checkpoints, optimizer, metrics
    {"distill", "posttrain", "logits", "miniplm", "evaluation", "interop"},  # 6: algorithms
    {"quickstart"},                               # 7: the end-to-end demo pipeline
    {"commands", "cli", "__main__"},              # 8: the command line
]
LAYER_OF = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [node.module, *subs]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                raise AssertionError(f"{path}: relative import; use absolute megatron_kd imports")
            else:
                continue
            for target in targets:
                while target not in mods and "." in target:  # `import megatron_kd.x.y.z` -> nearest module
                    target = target.rsplit(".", 1)[0]
                if target in mods and target != mod:
                    edges[mod].add(target)
    return edges


def _cycles(edges: dict[str, set[str]], nodes) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_module_import_cycles():
    mods = _modules()
    cycles = _cycles(_edges(mods), mods)
    assert not cycles, f"import cycles between modules: {cycles}"


def test_every_package_has_a_layer():
    unknown = sorted({_package(m) for m in _modules()} - set(LAYER_OF))
    assert not unknown, f"packages without a layer: {unknown}: add them to LAYERS here and to docs/architecture.md"


def test_imports_point_down_the_layers_and_packages_form_no_cycle():
    mods = _modules()
    pkg_edges: dict[str, set[str]] = collections.defaultdict(set)
    upward = []
    for mod, targets in _edges(mods).items():
        for target in targets:
            src, dst = _package(mod), _package(target)
            if src == dst or src not in LAYER_OF or dst not in LAYER_OF:
                continue
            pkg_edges[src].add(dst)
            if LAYER_OF[dst] > LAYER_OF[src]:
                upward.append(f"{mod} (layer {LAYER_OF[src]}) imports {target} (layer {LAYER_OF[dst]})")
    assert not upward, "imports pointing up a layer:\n" + "\n".join(sorted(upward))
    cycles = _cycles(pkg_edges, set(LAYER_OF))
    assert not cycles, f"package-level import cycles: {cycles}"


def test_checker_sees_cycles_and_upward_imports(tmp_path):
    """The checks themselves: a two-module cycle and an upward edge are found."""
    edges = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert _cycles(edges, {"a", "b", "c"}) == [["a", "b"]]
    assert LAYER_OF["training"] > LAYER_OF["models"] and LAYER_OF["commands"] == len(LAYERS) - 1
