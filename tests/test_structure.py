"""Layering of the package: no import cycle between its parts; data/ does not depend on the model code."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sere_scale"


def _imports() -> dict:
    """{part: set of parts it imports}, a part being a top-level module or subpackage of sere_scale; every
    import counts (also those inside functions)."""
    graph: dict = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).with_suffix("").parts
        pkg = rel[:-1]  # the package a relative import starts from
        part = rel[0]
        deps = graph.setdefault(part, set())
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.ImportFrom):
                if n.level:
                    base = list(pkg[:len(pkg) - n.level + 1])
                    target = base + (n.module.split(".") if n.module else [])
                    names = [target + [a.name] for a in n.names]
                elif n.module and n.module.startswith("sere_scale."):
                    target = n.module.split(".")[1:]
                    names = [target]
                else:
                    continue
                for t in [target, *names]:
                    if t and (PKG.joinpath(*t).with_suffix(".py").exists() or (PKG.joinpath(*t)).is_dir()):
                        if t[0] != part:
                            deps.add(t[0])
                        break
            elif isinstance(n, ast.Import):
                for a in n.names:
                    if a.name.startswith("sere_scale.") and a.name.split(".")[1] != part:
                        deps.add(a.name.split(".")[1])
    return graph


def test_no_import_cycle_between_parts():
    graph = _imports()
    for a, deps in graph.items():
        for b in deps:
            assert a not in graph.get(b, ()), f"import cycle {a} <-> {b}"

    # and no longer cycles: depth-first search for a back edge
    state: dict = {}

    def visit(v, path):
        state[v] = 1
        for w in graph.get(v, ()):
            assert state.get(w) != 1, "import cycle " + " -> ".join([*path, v, w])
            if w not in state:
                visit(w, [*path, v])
        state[v] = 2

    for v in graph:
        if v not in state:
            visit(v, [])


def test_layering():
    graph = _imports()
    assert "models" not in graph["data"] and "engine" not in graph["data"]
    assert "models" not in graph["engine"]
    assert "viz" not in graph["eval"] and "train" not in graph["profiling"] and "trainer" not in graph["profiling"]


def test_small_files_and_a_loop_on_a_screen():
    """No module of the package over ~400 lines; the loop the Trainer runs (``fit``) fits on a screen."""
    import inspect

    from sere_scale.trainer import Trainer
    big = {str(f.relative_to(PKG)): n for f in PKG.rglob("*.py") if (n := len(f.read_text().splitlines())) > 400}
    assert not big, big
    assert len(inspect.getsource(Trainer.fit).splitlines()) <= 60


def test_one_definition_of_the_step():
    """The trainer, the profiler and the step benchmark run ``step.train_step``; no other module calls the
    EMA update or the center update (the step's last parts) outside the engines themselves."""
    root = PKG.parent
    callers = []
    for f in [*PKG.rglob("*.py"), *(root / "benchmarks").glob("*.py")]:
        rel = str(f.relative_to(root))
        if rel.startswith("sere_scale/engine/") or rel == "sere_scale/step.py":
            continue
        for n in ast.walk(ast.parse(f.read_text())):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and n.func.attr in ("ema_update", "after_step")):
                callers.append((rel, n.func.attr))
    assert not callers, callers
    for rel in ("sere_scale/trainer.py", "sere_scale/profiling/runner.py", "benchmarks/engine_step.py"):
        assert "train_step(" in (root / rel).read_text(), rel
