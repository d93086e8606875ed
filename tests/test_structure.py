"""What the import contract (``lint-imports``, contracts in pyproject.toml, run by ``make test``) cannot say: the
package's top level holds only its entry points and subpackages, each subpackage says what it holds and what it
may import, the contract is really enforced, files stay small, and there is one definition of the step."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sere_scale"
ROOT = PKG.parent
ENTRY_MODULES = {"__init__.py", "__main__.py", "cli.py"}


def test_top_level_holds_only_entry_points_and_subpackages():
    modules = {f.name for f in PKG.glob("*.py")}
    assert modules <= ENTRY_MODULES, f"loose modules at the top of sere_scale/: {sorted(modules - ENTRY_MODULES)}"
    for d in PKG.iterdir():
        if d.is_dir() and d.name != "__pycache__":
            assert (d / "__init__.py").exists(), f"{d.name}/ is not a package"


def test_each_subpackage_says_what_it_holds_and_what_it_may_import():
    for init in sorted(PKG.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 80, f"{init.relative_to(ROOT)}: docstring missing or too short"
        low = doc.lower()
        assert "imports" in low and "imported by" in low, \
            f"{init.relative_to(ROOT)}: the docstring must say what it imports and what imports it"


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("lint-imports (import-linter) is not installed in this environment")
    return str(exe)


def test_the_import_contract_holds_and_fails_on_a_forbidden_import(tmp_path):
    """``lint-imports`` passes on the package as it is, and fails, naming the contract, on a copy whose engine
    imports the method (forbidden: engines know nothing of SERE)."""
    exe = _lint_imports()
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(PKG, tmp_path / "sere_scale", ignore=shutil.ignore_patterns("__pycache__"))
    ok = subprocess.run([exe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    with open(tmp_path / "sere_scale" / "engine" / "base.py", "a") as f:
        f.write("\nfrom sere_scale.method.sere_method import SEREMethod  # noqa: E402,F401\n")
    bad = subprocess.run([exe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert "Engines never import the method" in bad.stdout and "BROKEN" in bad.stdout, bad.stdout


def test_import_sere_scale_is_light():
    """The public API is lazy: ``import sere_scale`` loads neither torch nor DeepSpeed, and a public name
    loads its own module."""
    code = ("import sys, sere_scale; assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules; "
            "sere_scale.overlap_boxes; assert 'sere_scale.geometry.boxes' in sys.modules; "
            "assert 'deepspeed' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_small_files_and_a_loop_on_a_screen():
    """No module of the package over ~400 lines; the loop the Trainer runs (``fit``) fits on a screen."""
    import inspect

    from sere_scale.run.trainer import Trainer
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
        if rel.startswith("sere_scale/engine/") or rel == "sere_scale/run/step.py":
            continue
        for n in ast.walk(ast.parse(f.read_text())):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and n.func.attr in ("ema_update", "after_step")):
                callers.append((rel, n.func.attr))
    assert not callers, callers
    for rel in ("sere_scale/run/trainer.py", "sere_scale/run/profiler.py", "benchmarks/engine_step.py"):
        assert "train_step(" in (root / rel).read_text(), rel
