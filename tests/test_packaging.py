"""What a user gets from `pip install es-serve` rather than from this checkout."""

import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["adapters", "es_serve", "es_serve.server", "rewards"]
TOP_LEVEL = ["adapters", "es_serve", "rewards", "launch", "benchmarks"]
# What a package needs at run time: its modules, the C sources the engines compile, the dashboard page.
RUNTIME_SUFFIXES = {".py", ".c", ".html"}


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves(package):
    # The names resolve lazily, so a moved module breaks `from es_serve import X` only when X is used.
    module = importlib.import_module(package)
    assert module.__all__, f"{package} exports nothing"
    for name in module.__all__:
        value = getattr(module, name)
        owner = getattr(value, "__module__", None)
        assert owner is None or owner.split(".")[0] == package.split(".")[0], (name, owner)
    with pytest.raises(AttributeError, match="NotAName"):
        module.NotAName  # noqa: B018


# Run from outside the checkout, against the installed copy only: every public name, and the files the
# engines compile or serve at run time.
_CHECK_INSTALLED = """
import importlib, sys
from pathlib import Path
site = Path(sys.argv[1]).resolve()
for package in sys.argv[2:]:
    module = importlib.import_module(package)
    assert site in Path(module.__file__).resolve().parents, (package, module.__file__)
    for name in getattr(module, "__all__", []):
        getattr(module, name)
from adapters import normal
from es_serve.engines import member_kernel
from es_serve.server import app
for path in (normal.SOURCE, member_kernel.SOURCE, member_kernel.GEMM_SOURCE, app.DASHBOARD):
    assert site in path.resolve().parents and path.is_file(), path
print("installed copy complete")
"""


@pytest.mark.slow
def test_a_built_wheel_holds_every_package_and_kernel_source(tmp_path):
    # An editable install (the README's) maps whole folders, so a package or data file the wheel leaves
    # out goes unnoticed until a user installs the wheel: es_serve.engines was missing from it once.
    # Built from a clean copy: setuptools builds in the source folder and reuses its build/ folder, where an
    # earlier build's modules would stand in for ones the configuration leaves out.
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "runs", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("es_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # The reference is the source tree: every run-time file below the top-level packages.
    sources = {
        path.relative_to(ROOT).as_posix()
        for top in TOP_LEVEL
        for path in (ROOT / top).rglob("*")
        if path.suffix in RUNTIME_SUFFIXES and "__pycache__" not in path.parts
    }
    assert "es_serve/engines/kernels/member_lora.c" in sources
    assert not sources - names, f"missing from {wheel.name}: {sorted(sources - names)}"
    packages = sorted(n.removesuffix("/__init__.py").replace("/", ".") for n in names if n.endswith("/__init__.py"))
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        cwd=tmp_path,
    )
    out = subprocess.run(
        [sys.executable, "-c", _CHECK_INSTALLED, str(site), *packages],
        cwd=tmp_path,
        # Only the installed copy on the path, whatever PYTHONPATH this run inherited.
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "installed copy complete" in out.stdout
