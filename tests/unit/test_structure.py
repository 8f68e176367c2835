"""The package's shape: no import cycle between modules or between folders, no MPI at import time, no source
folder a tool takes for build output, and the communication core read by the linter."""
import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "mpiinfer")


def modules() -> dict:
    """dotted module name -> path, for every module of the package."""
    out = {}
    for dirpath, dirnames, files in os.walk(PKG):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def imports(name: str, path: str, known: set) -> set:
    """The package modules that ``name`` imports anywhere in its file (lazy imports inside functions too)."""
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[:len(base) - node.level + 1]
                mod = ".".join(parent + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                found.add(full if full in known else mod)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        state[n] = 2
        stack.pop()
        return None
    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def folder(mod: str) -> str:
    """mpiinfer.engine.runner -> mpiinfer.engine; top-level modules are their own node."""
    parts = mod.split(".")
    return ".".join(parts[:2])


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) - {"mpiinfer"} for m, p in mods.items()}


def test_no_import_cycle_between_modules(graph):
    assert find_cycle(graph) is None


def test_no_import_cycle_between_folders(graph):
    folders = {}
    for m, deps in graph.items():
        folders.setdefault(folder(m), set()).update(folder(d) for d in deps if folder(d) != folder(m))
    assert find_cycle(folders) is None


def test_only_the_entries_take_the_world_communicator():
    """``MPI.COMM_WORLD`` is read by the job entry and the comm benchmark's entry; everything else is given it."""
    users = sorted(m for m, p in modules().items()
                   if any(isinstance(n, ast.Attribute) and n.attr == "COMM_WORLD" for n in ast.walk(ast.parse(open(p).read()))))
    assert users == ["mpiinfer.job", "mpiinfer.tools.comm_bench"], users


def test_no_source_folder_named_like_build_output():
    for dirpath, dirnames, _ in os.walk(PKG):
        for d in dirnames:
            assert d not in ("dist", "build"), os.path.join(dirpath, d)


def test_import_touches_no_mpi():
    """Importing every module initialises no MPI (mpi4py.MPI stays unimported)."""
    code = ("import importlib, sys\n"
            f"for m in {sorted(modules())!r}:\n"
            "    if m != 'mpiinfer.__main__':\n"
            "        importlib.import_module(m)\n"
            "assert 'mpi4py.MPI' not in sys.modules, 'mpi4py.MPI imported at import time'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_linter_reads_the_communication_core():
    files = subprocess.run(["ruff", "check", "--show-files", "."], cwd=ROOT, capture_output=True, text=True,
                           timeout=120).stdout
    for name in ("mesh.py", "collectives.py", "dda.py", "dda_cuda.py"):
        assert os.path.join("mpiinfer", "comm", name) in files, name
