"""The package's import graph: no circle, and arrows only down the pipeline's floors
(core <- model <- export <- fusion, precision <- engine <- runtime <- serve <- cli), but for the deviations named
in docs/architecture.md."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "trtglm"
FLOORS = {"core": 0, "model": 1, "export": 2, "fusion": 3, "precision": 3, "engine": 4, "runtime": 5, "serve": 6,
          "cli": 7, "__main__": 7, "__init__": 0}
# Checks that run a graph go through the runtime's ONNX Runtime backend (one executor, not two): the export's
# validation, and the build's accuracy gate (over a staged build's chain of stages too).
DEVIATIONS = {("export.validate", "runtime.backends"), ("engine.build", "runtime.backends"),
              ("engine.build", "runtime.evaluate"), ("engine.build", "runtime.staged")}


def module_of(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imports() -> dict[str, set[str]]:
    modules = {module_of(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [target] if node.module else [f"{target}.{a.name}" if target else a.name
                                                           for a in node.names]
                for c in candidates:
                    if c in modules and c != name:
                        graph[name].add(c)
                    elif c not in modules and c.rsplit(".", 1)[0] in modules and c.rsplit(".", 1)[0] != name:
                        graph[name].add(c.rsplit(".", 1)[0])
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                for alias in node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]:
                    if alias.name.startswith("trtglm."):
                        target = alias.name[len("trtglm."):]
                        if target in modules:
                            graph[name].add(target)
    return graph


def floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def test_no_import_circle():
    graph, state, path = imports(), {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_run_down_the_pipeline():
    up = sorted((m, t) for m, targets in imports().items() for t in targets
                if floor(t) > floor(m) and (m, t) not in DEVIATIONS)
    assert not up, "imports from a lower stage to a higher one: " + ", ".join(f"{m} -> {t}" for m, t in up)


def test_every_module_is_in_a_stage():
    assert {m.split(".")[0] for m in imports()} <= set(FLOORS)
    assert not [p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__", "cli")]


def test_the_deviations_still_exist():
    graph = imports()
    assert all(t in graph[m] for m, t in DEVIATIONS), "a deviation is gone: remove it from DEVIATIONS and the docs"


def test_the_library_never_prints():
    """Only the command line writes to the terminal: the library reports through core/progress.py and logging."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} print")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                offenders += [f"{path.relative_to(PACKAGE)}:{node.lineno} imports {n}" for n in names
                              if n.split(".")[0] in ("rich", "click")]
    assert not offenders, offenders
