"""The FastAPI application: jobs, events, OpenAI-compatible completions, metrics and the dashboard."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..run_dir import RunDir
from . import metrics as prometheus
from .batcher import CompletionBatcher
from .engine_slot import EngineSlot
from .events import job_events
from .inference import Inference
from .jobs import JobManager, summary
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
    manager = JobManager(settings, slot)
    inference = Inference(slot, manager, settings)
    batcher = CompletionBatcher(inference.run_group, settings.batch_window_s, settings.max_batch)
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
        text = await asyncio.to_thread(prometheus.render, manager, batcher.stats)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

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

    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel(job_id: str):
        job, err = _job(job_id)
        return err or manager.cancel(job_id)

    # -- inference ------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": inference.models()}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await openai_routes.completions(request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await openai_routes.chat(request)

    app.add_middleware(Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    return app
