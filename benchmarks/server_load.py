"""Completion latency under load: 200 concurrent completions against `es-serve serve`, half of them streaming.

Without --url it starts a server on loopback itself, with a zero-step job on a tiny random model (so
the figures are the serving path's, not a big model's), and stops it afterwards. With --url it measures
a server already running, for example an older build (--no-stream there if it cannot stream).

    python -m benchmarks.server_load --json benchmarks/results/server_load.json
    python -m benchmarks.server_load --code ../es-serve-old --no-stream --label before
    python -m benchmarks.server_load --url http://127.0.0.1:8000 --key KEY --model JOB_ID
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_JSON = "benchmarks/results/server_load.json"
PLUGIN = "def distinct_chars(prompts, completions, **columns):\n    return [float(len(set(c))) for c in completions]\n"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one(client, model: str, i: int, max_tokens: int, stream: bool) -> dict:
    body = {"model": model, "prompt": f"What is {i % 20} + {i % 7}?", "max_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    first = None
    try:
        if not stream:
            r = await client.post("/v1/completions", json=body)
            ok = r.status_code == 200
            return {"stream": False, "ok": ok, "latency": time.perf_counter() - start, "error": None if ok else r.text}
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            ok = r.status_code == 200
            async for line in r.aiter_lines():
                if first is None and line.startswith("data: ") and line != "data: [DONE]":
                    first = time.perf_counter() - start
        return {"stream": True, "ok": ok, "latency": time.perf_counter() - start, "first_chunk": first, "error": None}
    except Exception as exc:  # counted, not raised: one failure must not hide the other 199 figures
        return {"stream": stream, "ok": False, "latency": time.perf_counter() - start, "error": repr(exc)}


async def load(url: str, key: str, model: str, requests: int, max_tokens: int, streaming: bool) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one(client, model, i, max_tokens, streaming and i % 2 == 1) for i in range(requests))
        )
        wall = time.perf_counter() - start
    out = {"requests": requests, "max_tokens": max_tokens, "wall_s": wall, "errors": sum(not r["ok"] for r in results)}
    out["first_errors"] = [r["error"] for r in results if not r["ok"]][:3]
    for kind, stream in (("plain", False), ("streaming", True)):
        lat = [r["latency"] for r in results if r["ok"] and r["stream"] == stream]
        if lat:
            out[kind] = {"count": len(lat), "p50_s": percentile(lat, 0.5), "p99_s": percentile(lat, 0.99)}
        if stream and lat:
            first = [r["first_chunk"] for r in results if r["ok"] and r["stream"] and r["first_chunk"] is not None]
            out[kind]["first_chunk_p50_s"] = percentile(first, 0.5)
    return out


def start_server(root: Path, key: str, code: Path):
    """`es-serve serve` on a free loopback port with a finished zero-step job on a tiny model; (proc, url, job)."""
    import socket

    import httpx

    from es_serve.tiny_model import build_tiny_llama

    model_dir = build_tiny_llama(root / "model")
    (root / "rewards").mkdir()
    (root / "rewards" / "mine.py").write_text(PLUGIN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "launch.cli", "serve", "--port", str(port), "--runs", str(root / "runs")]
    cmd += ["--api-key", key, "--rewards-dir", str(root / "rewards")]
    env = dict(os.environ, ES_SERVE_CACHE=str(root / "cache"), VLLM_LOGGING_LEVEL="ERROR", PYTHONPATH=str(code))
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=code)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start; see {root / 'server.log'}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    config = {
        "model": {"name": str(model_dir)},
        # The engine's batch is one step's N x P = 64 requests (what the server e2e test uses too).
        "es": {"population": 16},
        "task": {"prompts_per_step": 4, "eval_prompts": 1},
        "reward": {"fn": "mine.py:distinct_chars"},
        "generation": {"max_tokens": 8},
        "train": {"steps": 0},
        "engine": {"kind": "vllm", "memory_fraction": 0.15},
    }
    job = httpx.post(url + "/v1/jobs", headers=auth, json={"config": config}).json()
    with httpx.stream("GET", f"{url}/v1/jobs/{job['id']}/events", headers=auth, timeout=600) as stream:
        for _ in stream.iter_lines():
            pass
    return proc, url, job["id"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.server_load", description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: start one on loopback with a tiny model)")
    p.add_argument("--key", default="bench-key", help="its API key")
    p.add_argument("--model", help="the job id or model name to ask (required with --url)")
    p.add_argument(
        "--code",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="the es-serve checkout whose server is started (default: this one; an older checkout gives 'before')",
    )
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--no-stream", action="store_true", help="every request non-streaming (servers that cannot stream)")
    p.add_argument("--label", default="", help="a name for this run in the JSON (e.g. before / after)")
    p.add_argument("--json", default=DEFAULT_JSON, metavar="OUT.json")
    args = p.parse_args(argv)
    if args.url and not args.model:
        p.error("--model is required with --url")
    if args.requests < 1 or args.max_tokens < 1:
        p.error("--requests and --max-tokens must be >= 1")

    from benchmarks.throughput import machine

    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.url:
                url, model = args.url.rstrip("/"), args.model
            else:
                proc, url, model = start_server(Path(tmp), args.key, args.code.resolve())
            result = asyncio.run(load(url, args.key, model, args.requests, args.max_tokens, not args.no_stream))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=120)
    result.update(label=args.label, url=args.url or f"started from {args.code} (tiny random model, zero-step job)")
    result.update(threads=os.environ.get("OMP_NUM_THREADS"), machine=machine())
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
