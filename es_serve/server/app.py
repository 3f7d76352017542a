"""The FastAPI application: jobs, events, OpenAI-compatible completions, metrics and the dashboard."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..run_dir import RunDir
from .batcher import CompletionBatcher
from .engine_slot import EngineSlot
from .events import job_events
from .inference import Inference
from .jobs import JOB_LOG, JobManager, QueueFull, summary
from .limits import AdmissionGate, Full, too_many
from .metrics import CONTENT_TYPE, ServerMetrics
from .openai_api import OpenAIRoutes
from .security import Guard
from .settings import ServerSettings
from .validation import FieldErrors, parse_job

DASHBOARD = Path(__file__).with_name("dashboard.html")


def error(status: int, message: str, kind: str = "invalid_request_error", detail=None) -> JSONResponse:
    """OpenAI's error shape (the `openai` client reads error.message) plus FastAPI's `detail`."""
    body = {"error": {"message": message, "type": kind, "code": status}, "detail": detail or message}
    return JSONResponse(body, status_code=status)


def create_app(settings: ServerSettings) -> FastAPI:
    slot = EngineSlot()
    server_metrics = ServerMetrics()
    manager = JobManager(settings, slot, server_metrics)
    inference = Inference(slot, manager, settings)
    batcher = CompletionBatcher(inference.run_group, settings.batch_window_s, settings.max_batch)
    server_metrics.attach(manager, batcher.stats)
    gate = AdmissionGate(settings.max_pending_completions, settings.completion_retry_after_s)
    # vLLM engines answer through vLLM's OpenAI serving classes; the batcher serves the dense engine.
    openai_routes = OpenAIRoutes(inference, settings, batcher, batcher.stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        manager.start()
        batcher.start()
        openai_routes.start()
        try:
            yield
        finally:
            # SIGTERM: the job in progress finishes its step, checkpoints and stays queued for the next start.
            await asyncio.to_thread(manager.join)
            await batcher.stop()
            await asyncio.to_thread(openai_routes.stop)

    app = FastAPI(title="es-serve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings, app.state.manager, app.state.slot, app.state.batcher = settings, manager, slot, batcher
    app.state.metrics, app.state.gate = server_metrics, gate

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        fields = [".".join(str(p) for p in e["loc"] if p != "body") or "body" for e in exc.errors()]
        message = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields, exc.errors(), strict=True))
        detail = [
            {"field": f, "loc": list(e["loc"]), "msg": e["msg"]} for f, e in zip(fields, exc.errors(), strict=True)
        ]
        return error(422, f"invalid request: {message}", detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "error")

    # -- service --------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "running": manager.current, "queue_length": manager.queue_length()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(await asyncio.to_thread(server_metrics.render), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def dashboard():
        return HTMLResponse(DASHBOARD.read_text())

    # -- jobs -----------------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=201)
    async def submit(request: Request):
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError as exc:
            return error(422, f"the body is not JSON: {exc}", detail=[{"field": "body", "msg": str(exc)}])
        try:
            config = await asyncio.to_thread(parse_job, body, settings)
        except FieldErrors as exc:
            return error(422, f"invalid job: {exc}", detail=exc.detail())
        try:
            job = manager.submit(config)
        except QueueFull as exc:
            server_metrics.rejected.labels(queue="jobs").inc()
            return too_many(str(exc), settings.job_retry_after_s)
        except RuntimeError as exc:
            return error(503, str(exc), "unavailable")
        return JSONResponse(manager.get(job["id"]), status_code=201)

    @app.get("/v1/jobs")
    async def list_jobs():
        return {"object": "list", "data": manager.jobs()}

    def _job(job_id: str):
        job = manager.get(job_id)
        if job is None:
            return None, error(404, f"no job {job_id!r}; GET /v1/jobs lists them", "not_found_error")
        return job, None

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str):
        job, err = _job(job_id)
        return err or job

    @app.get("/v1/jobs/{job_id}/metrics")
    async def job_metrics(job_id: str):
        job, err = _job(job_id)
        if err:
            return err
        records = await asyncio.to_thread(RunDir(job["run_dir"]).metrics)
        return {"object": "list", "job": job_id, "data": [summary(r) for r in records]}

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, request: Request, after: int = -1):
        job, err = _job(job_id)
        if err:
            return err
        last_id = request.headers.get("last-event-id", "")
        if last_id.isdigit():
            after = int(last_id)
        return StreamingResponse(
            job_events(manager, job_id, after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/v1/jobs/{job_id}/log", response_class=PlainTextResponse)
    async def job_log(job_id: str):
        job, err = _job(job_id)
        if err:
            return err
        path = Path(job["run_dir"]) / JOB_LOG
        text = await asyncio.to_thread(lambda: path.read_text(errors="replace") if path.is_file() else "")
        return PlainTextResponse(text)

    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel(job_id: str):
        job, err = _job(job_id)
        return err or manager.cancel(job_id)

    # -- inference ------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": inference.models()}

    async def _admitted(run):
        """A completion handler's body under the queue bound, timed for /metrics.

        A streamed answer is timed to its first byte: the stream itself outlives this call.
        """
        started = time.perf_counter()
        try:
            async with gate.admit():
                response = await run()
        except Full as exc:
            server_metrics.rejected.labels(queue="completions").inc()
            return too_many(str(exc), settings.completion_retry_after_s)
        usage = {}
        body = getattr(response, "body", None)
        if body and response.status_code < 400:
            try:
                usage = json.loads(body).get("usage") or {}
            except (ValueError, AttributeError):
                usage = {}
        server_metrics.observe_completion(
            time.perf_counter() - started,
            usage.get("completion_tokens", 0),
            usage.get("prompt_tokens", 0),
            status="ok" if response.status_code < 400 else "error",
        )
        return response

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _admitted(lambda: openai_routes.completions(request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _admitted(lambda: openai_routes.chat(request))

    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    return app
