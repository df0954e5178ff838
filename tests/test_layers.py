"""Package structure: every module imports, the CLI starts without the heavy libraries, and the import-linter
layers contract in pyproject.toml ([tool.importlinter]) holds."""

import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import traceback

import pytest

import dpokit
from conftest import ROOT

HEAVY = ("torch", "transformers", "datasets")


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -c CODE` in a fresh interpreter (this tree's dpokit: conftest puts src/ on PYTHONPATH)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), capture_output=True,
                          text=True, timeout=timeout)


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(dpokit.__path__, prefix="dpokit.")]
    assert "dpokit.core.models" in names and "dpokit.cli.data" in names, names  # the walk found the tree
    failures = {}
    for name in names:
        if name.rsplit(".", 1)[-1] == "__main__":  # runs the CLI when imported; the tests below start it
            continue
        try:
            importlib.import_module(name)
        except Exception:  # report every broken module at once
            failures[name] = traceback.format_exc(limit=-3)
    assert not failures, "\n".join(f"{name}:\n{tb}" for name, tb in failures.items())


def test_no_package_name_is_shadowed_by_its_own_submodule():
    # `from x import compare` in a package that also has a submodule `compare` works until something imports the
    # submodule, which replaces the package attribute: an import-order bug that random test order exposed.
    code = (
        "import importlib, pkgutil, types, dpokit\n"
        "pkgs = [m.name for m in pkgutil.walk_packages(dpokit.__path__, prefix='dpokit.') if m.ispkg]\n"
        "for p in ['dpokit'] + pkgs:\n"
        "    m = importlib.import_module(p)\n"
        "    names = {k: getattr(m, k) for k in vars(m)}\n"
        "    for sub in pkgutil.iter_modules(m.__path__):\n"
        "        v = names.get(sub.name)\n"
        "        if v is not None and not isinstance(v, types.ModuleType):\n"
        "            print(f'{p}.{sub.name}')\n"
    )
    res = _python(code)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "", f"package attributes that a submodule import would replace: {res.stdout}"


def test_train_packing_imports_in_a_fresh_interpreter():
    # `dpokit.train.packing` must not depend on import order (e.g. on dpokit.train's __init__ or a lazy
    # attribute of dpokit shadowing the subpackage).
    res = _python("import dpokit.train.packing as m; print(m.__name__)")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "dpokit.train.packing"


# Runs the package like `python -m dpokit ARGS`, then reports which heavy libraries got imported.
_CLI_PROBE = """
import json, runpy, sys
sys.argv = ["dpokit", *{args!r}]
code = 0
try:
    runpy.run_module("dpokit", run_name="__main__", alter_sys=True)
except SystemExit as exit_:  # the CLI always ends with sys.exit
    code = exit_.code
print("PROBE " + json.dumps({{"exit": code, "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["data", "--help"], ["train", "--help"]],
                         ids=" ".join)
def test_cli_startup_imports_no_heavy_library(args):
    res = _python(_CLI_PROBE.format(args=args, heavy=HEAVY))
    assert res.returncode == 0, res.stderr[-3000:]
    probe = json.loads(res.stdout.rsplit("PROBE ", 1)[1])
    assert probe["exit"] in (0, None), (probe, res.stderr[-3000:])
    assert probe["heavy"] == [], (
        f"`dpokit {' '.join(args)}` imported {probe['heavy']}: keep heavy imports inside the CLI's command "
        "functions (see src/dpokit/cli/__init__.py)"
    )
    if args == ["--version"]:
        assert res.stdout.startswith("dpokit "), res.stdout


# What a config mistake must not wait for: transformers' Trainer pulls in peft, which imports bitsandbytes, which
# imports torch's compiler (about 5 s of a 9 s start on the 2-core CPU).
TRAINER_STACK = ("peft", "bitsandbytes", "trl", "transformers.trainer", "transformers.training_args")


@pytest.mark.parametrize("args", [
    ["plan", "configs/tiny.yaml", "--set", "eval.judge=sentimnt"],
    ["train", "configs/tiny.yaml", "--set", "eval.judge=sentimnt"],
    ["train", "configs/tiny.yaml", "--set", "train.loss=sigmod"],
    ["train", "configs/tiny.yaml", "--set", "train.engine=trl", "--set", "train.loss=listwise_pl"],
    ["eval", "no-such-run-folder"],
], ids=lambda args: " ".join(args[:1] + args[-1:]))
def test_a_refused_command_stops_before_the_trainers_imports(args):
    res = _python(_CLI_PROBE.format(args=args, heavy=TRAINER_STACK))
    probe = json.loads(res.stdout.rsplit("PROBE ", 1)[1])
    assert probe["exit"] == 2, (probe, res.stderr[-3000:])
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert probe["heavy"] == [], (
        f"`dpokit {' '.join(args)}` imported {probe['heavy']} before refusing: plan first, then import the trainer "
        "(src/dpokit/cli/__init__.py train; checks in dpokit.train.plan import no Trainer)")

def test_import_linter_contract_holds():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("lint-imports (package import-linter, in the dev extra) is not installed")
    res = subprocess.run([exe, "--no-cache"], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]


def _declared_distributions() -> set[str]:
    """Distribution names pyproject.toml declares: the dependencies and every extra, normalised (PEP 503)."""
    import re

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"]) + [s for extra in project["optional-dependencies"].values() for s in extra]
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", s).group(0)).lower() for s in specs}


def _top_level_imports(path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_declared_in_pyproject():
    """A package imported by the code, the tests or the benchmarks must be declared by pyproject.toml itself (a
    dependency or an extra), not arrive by chance as another package's dependency or by hand on this machine: CI
    installs into a fresh virtualenv from the project's files alone."""
    import importlib.metadata
    import re

    local = {"dpokit", "conftest", "throughput", "fsdp_worker"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    local |= {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    to_dist = importlib.metadata.packages_distributions()
    declared = _declared_distributions()
    files = [*(ROOT / "src").rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    assert len(files) > 50, files  # the walk found the tree
    missing = {}
    for path in files:
        for name in _top_level_imports(path) - local - set(sys.stdlib_module_names):
            dists = {re.sub(r"[-_.]+", "-", d).lower() for d in to_dist.get(name, [name])}
            if not dists & declared:
                missing.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(
        f"{name} ({', '.join(sorted(paths)[:3])})" for name, paths in sorted(missing.items()))
