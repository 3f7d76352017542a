import atexit
import os
import shutil
import tempfile

import pytest

# Tests must never reach a model hub; everything they load is built or shipped locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# train.report_to=trackio writes to the user's trackio store unless told otherwise; never from tests.
if "TRACKIO_DIR" not in os.environ:
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="es-serve-trackio-")
    atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from es_serve.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


class ServerProcesses:
    """`es-serve serve` subprocesses on loopback, each killed at teardown whatever the test did."""

    def __init__(self, log_dir):
        self.log_dir, self.procs = log_dir, []

    def start(self, runs, *args, env=None, timeout=120):
        import socket
        import subprocess
        import sys
        import time
        from pathlib import Path

        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = Path(self.log_dir) / f"server-{len(self.procs)}.log"
        cmd = [sys.executable, "-m", "launch.cli", "serve", "--port", str(port), "--runs", str(runs), *args]
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, cwd=Path(__file__).resolve().parents[1], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        proc.url, proc.log = f"http://127.0.0.1:{port}", log
        self.procs.append(proc)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(proc.url + "/health", timeout=2).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not answer /health within {timeout} s:\n{log.read_text()[-3000:]}")

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def servers(tmp_path):
    procs = ServerProcesses(tmp_path)
    yield procs
    procs.close()


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory):
    procs = ServerProcesses(tmp_path_factory.mktemp("server-logs"))
    yield procs
    procs.close()


@pytest.fixture
def avx2_kernel(tmp_path, monkeypatch):
    """The member kernel library as an AVX2-only CPU compiles it (no AVX-512 at all), built into a fresh
    cache and put in place of this machine's build for the test; (library, what it can do)."""
    from es_serve.engines import member_kernel

    monkeypatch.setenv("ES_SERVE_CACHE", str(tmp_path))
    try:
        path = member_kernel.build(extra=["-mno-avx512f"])
    except RuntimeError:
        pytest.skip("this compiler does not take -mno-avx512f (not x86)")
    lib, info = member_kernel.open_library(path)
    monkeypatch.setattr(member_kernel, "_library", lib)
    monkeypatch.setattr(member_kernel, "_info", info)
    return lib, info
