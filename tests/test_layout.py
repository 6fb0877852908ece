"""The package's import graph, read from the source (every import statement, at module level and
inside functions): no cycle, and every import points down the layers below, so the layering can be
read from the layout. A function-level import that goes back up (the running code loading the
trainer, a loader reaching into the API) fails here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "palikit"

# Bottom to top; a module may import its own layer's modules (no cycle) and the layers below.
LAYERS = [
    {"atomic", "dist", "options", "kernels", "config"},  # helpers every layer uses; configs
    {"siglip", "gemma", "paligemma"},  # the architecture and the math
    {"tasks", "rle", "maskcodec", "overlay", "processor", "video", "data", "synthetic", "metrics", "eval_sets"},
    {"weights", "quantize", "adapters", "scheduler"},  # checkpoints in and out, quantised layers, LoRA; batching
    {"generate"},  # sampling, the decode step, beam search
    {"engine"},  # continuous batching
    {"api"},  # load -> Pipeline
    {"jobs", "evaluate", "serve", "finetune", "export"},  # the applications
    {"cli", "__main__", "__init__"},  # verbs; the package's facade
]


def layer_of(module: str) -> int:
    top = module.removeprefix("palikit").lstrip(".").split(".")[0] or "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The palikit modules `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "palikit"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "palikit":
                continue
            for alias in node.names:  # `from . import tasks` imports a module, `from .api import load` a name
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_the_import_graph_has_no_cycle():
    edges = graph()
    assert len(edges) > 30 and edges["palikit.api"] >= {"palikit.engine", "palikit.weights"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_every_import_points_down_the_layers():
    up = [f"{a} -> {b}" for a, targets in graph().items() for b in sorted(targets)
          if layer_of(b) > layer_of(a) and not (a == "palikit.cli" and b == "palikit")]
    assert not up, "imports that reach up a layer: " + ", ".join(up)


def test_running_a_model_does_not_load_the_trainer():
    """`palikit run` / `palikit eval` / the server, and everything below them, import nothing of
    palikit.finetune (directly or through another module)."""
    edges = graph()
    for start in ("palikit.jobs", "palikit.evaluate", "palikit.serve.app"):
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert not {m for m in seen if m.startswith("palikit.finetune")}, start
