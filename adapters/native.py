"""Building the project's small C kernels: once per machine and compiler, into a cache, atomically.

A plain shared library compiled by the system C compiler and called through ctypes needs no torch
headers and builds in about a second; no packaging tool does "compile one file on first use, cache it
by source, flags and CPU" without a build system, so this is written by hand. es_serve's member
kernel uses it too (adapters is the lower layer).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


def kernel_cache_dir() -> Path:
    root = os.environ.get("ES_SERVE_CACHE") or Path.home() / ".cache" / "es-serve"
    return Path(root) / "kernels"


def find_compiler(compiler: str | None = None) -> str:
    compiler = compiler or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler '{compiler}' on PATH (install gcc, or set CC)")
    return compiler


def compiler_version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout


def compile_library(compiler: str, args: Sequence[str], source: Path, target: Path, libs: Sequence[str] = ()) -> Path:
    """`compiler args source -o target libs`, unless target exists; returns target.

    Built beside the target and renamed, so concurrent builders each finish a whole file and a crash
    never leaves half a library where a loader would take it.
    """
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *args, str(source), "-o", tmp, *libs], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed: {proc.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
