"""/v1/completions and /v1/chat/completions: vLLM's own OpenAI serving classes over the shared engine.

Requests are parsed by vLLM's protocol models (CompletionRequest, ChatCompletionRequest) and answered
by OpenAIServingCompletion / OpenAIServingChat through es-serve's engine client (engine_client.py), so
every parameter vLLM's server accepts (streaming, logprobs, echo with prompt logprobs, stop, penalties,
logit_bias, top_k, min_p, n, seed, response_format...) behaves as it does there, and what vLLM rejects
is rejected with its error body. es-serve adds only its routing (`model` is a job id or a model name),
its 409 while another job trains, and its bounds on what one request may ask for.

The dense engine (engine.kind = dense) answers a documented subset through the completion batcher.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from http import HTTPStatus

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from ..types import Completion, Sampling
from .engine_client import SharedEngineClient, StepDriver
from .engine_slot import Busy
from .inference import Inference, PromptTooLong, UnknownModel
from .settings import ServerSettings

# What the dense engine implements; any other field set in a request is refused by name.
DENSE_FIELDS = frozenset({"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature"})
DENSE_FIELDS |= {"top_p", "n", "seed", "user", "stream"}
# A base model without a chat template: a plain transcript that ends where the answer goes.
TRANSCRIPT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def error(status: int, message: str, kind: str = "invalid_request_error", detail=None) -> JSONResponse:
    """OpenAI's error shape (the `openai` client reads error.message) plus FastAPI's `detail`."""
    body = {"error": {"message": message, "type": kind, "code": status}, "detail": detail or message}
    return JSONResponse(body, status_code=status)


def vllm_error(message: str, param: str | None = None) -> JSONResponse:
    """A 400 in vLLM's ErrorResponse shape, typed as vLLM types the request errors it finds itself."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    body = create_error_response(message, "BadRequestError", HTTPStatus.BAD_REQUEST, param)
    return JSONResponse(body.model_dump(), status_code=HTTPStatus.BAD_REQUEST)


async def _validation_error(exc: ValidationError) -> JSONResponse:
    """vLLM's own answer to a body its protocol model refuses (400, the errors listed, `param` set)."""
    from types import SimpleNamespace

    from fastapi.exceptions import RequestValidationError
    from vllm.entrypoints.serve.exception_handling.handlers.validation import validation_exception_handler

    # The handler reads only whether to log the stack: a stand-in request says no.
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(args=SimpleNamespace(log_error_stack=False))))
    errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
    return await validation_exception_handler(request, RequestValidationError(errors))


class OpenAIRoutes:
    def __init__(self, inference: Inference, settings: ServerSettings, batcher, stats):
        self.inference, self.settings, self.batcher = inference, settings, batcher
        self.driver = StepDriver(inference.slot, inference.prepare, stats)
        self._serving: dict[tuple, tuple] = {}

    def start(self) -> None:
        self.driver.start()

    def stop(self) -> None:
        self.driver.stop()

    async def completions(self, raw: Request):
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        return await self._answer(raw, CompletionRequest, chat=False)

    async def chat(self, raw: Request):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return await self._answer(raw, ChatCompletionRequest, chat=True)

    async def _answer(self, raw: Request, model_cls, chat: bool):
        """The answer, or nothing once the client hangs up: its requests then leave the engine's batch."""
        from vllm.entrypoints.serve.utils.api_utils import listen_for_disconnect

        body = await raw.body()  # read first: the disconnect listener consumes whatever the client sends
        work = asyncio.ensure_future(self._answer_body(raw, body, model_cls, chat))
        gone = asyncio.ensure_future(listen_for_disconnect(raw))
        done, pending = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if work in done:
            return work.result()
        return Response(status_code=499)  # nobody is there to read it

    async def _answer_body(self, raw: Request, body: bytes, model_cls, chat: bool):
        from vllm.exceptions import VLLMError

        try:
            return await self._run(raw, body, model_cls, chat)
        except Busy as exc:  # another job started training between the check and the run
            return error(409, str(exc), "conflict")
        except (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError) as exc:
            # What vLLM's server leaves to its exception handlers, answered as they answer it.
            from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

            body = create_error_response(exc)
            return JSONResponse(body.model_dump(), status_code=body.error.code)

    async def _run(self, raw: Request, body: bytes, model_cls, chat: bool):
        try:
            body = json.loads(body or b"null")
        except ValueError as exc:
            return vllm_error(f"the body is not JSON: {exc}")
        if not isinstance(body, dict):
            return vllm_error("the body must be a JSON object")
        try:
            req = model_cls.model_validate(body)
        except ValidationError as exc:
            return await _validation_error(exc)
        if req.model_extra:
            # vLLM's server would log these and go on; answering without them would silently change the request.
            names = ", ".join(sorted(req.model_extra))
            return vllm_error(
                f"unknown parameter(s): {names}; vLLM's OpenAI API has no such field here, so it would be ignored",
                param=sorted(req.model_extra)[0],
            )
        bounds = self._bounds(req, chat)
        if bounds is not None:
            return bounds
        try:
            target = self.inference.resolve(req.model)
        except UnknownModel as exc:
            return error(404, str(exc), "not_found_error")
        engine = self.inference.loaded_engine(target)
        if engine is None:  # a weight swap or an engine build: under the lock, off the event loop
            try:
                engine = await asyncio.to_thread(self.inference.engine_for, target)
            except Busy as exc:
                return error(409, str(exc), "conflict")
        if not hasattr(engine, "llm"):
            return await self._dense(req, target, chat)
        serving = self._serving_for(engine, target, req.model or target, chat)
        result = await (serving.create_chat_completion if chat else serving.create_completion)(req, raw)
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        if isinstance(result, ErrorResponse):
            return JSONResponse(result.model_dump(), status_code=result.error.code)
        if hasattr(result, "model_dump"):
            return JSONResponse(result.model_dump())
        return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _bounds(self, req, chat: bool) -> JSONResponse | None:
        """es-serve's limits on one request (422 naming the field); vLLM checks everything else."""
        s = self.settings
        max_tokens = (getattr(req, "max_completion_tokens", None) if chat else None) or req.max_tokens
        if max_tokens is not None and max_tokens > s.max_tokens:
            return error(422, f"max_tokens: at most {s.max_tokens} on this server, got {max_tokens}")
        n = req.n or 1
        if n > s.max_n:
            return error(422, f"n: at most {s.max_n} on this server, got {n}")
        best_of = getattr(req, "best_of", None) or 0
        if best_of > s.max_n:
            return error(422, f"best_of: at most {s.max_n} on this server, got {best_of}")
        prompts = _prompts(req, chat)
        if len(prompts) * n > s.max_prompts:
            return error(422, f"prompt: at most {s.max_prompts} prompts x n per request")
        too_long = [i for i, p in enumerate(prompts) if _chars(p) > s.max_prompt_chars]
        if too_long:
            return error(422, f"prompt {too_long[0]}: longer than {s.max_prompt_chars} characters")
        return None

    def _serving_for(self, engine, target: str, name: str, chat: bool):
        """vLLM's serving object for this engine, weights and served name (cached; rebuilt with the engine)."""
        key = (target, name, chat)
        cached = self._serving.get(key)
        if cached is not None and cached[0] is engine:
            return cached[1]
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.renderers.online_renderer import OnlineRenderer

        client = SharedEngineClient(self.driver, target, engine)
        models = OpenAIServingModels(client, [BaseModelPath(name=name, model_path=str(engine.model_dir))])
        template = None if getattr(engine.tokenizer, "chat_template", None) else TRANSCRIPT_TEMPLATE
        renderer = OnlineRenderer(
            model_config=client.model_config,
            renderer=client.renderer,
            request_logger=None,
            chat_template=template,
            chat_template_content_format="auto",
        )
        if chat:
            from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

            serving = OpenAIServingChat(
                client,
                models,
                "assistant",
                online_renderer=renderer,
                request_logger=None,
                chat_template=template,
                chat_template_content_format="auto",
            )
        else:
            from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

            serving = OpenAIServingCompletion(client, models, online_renderer=renderer, request_logger=None)
        # A request that leaves its length open gets the operator's bound, not the rest of the context.
        default = serving.default_sampling_params.get("max_tokens")
        serving.default_sampling_params["max_tokens"] = min(
            default or self.settings.max_tokens, self.settings.max_tokens
        )
        if len(self._serving) >= 64:
            self._serving.pop(next(iter(self._serving)))
        self._serving[key] = (engine, serving)
        return serving

    # -- the dense engine's subset ------------------------------------------------------------------
    async def _dense(self, req, target: str, chat: bool):
        unsupported = sorted(f for f in req.model_fields_set if f not in DENSE_FIELDS)
        if req.stream:
            unsupported.insert(0, "stream")
        if unsupported:
            return vllm_error(
                f"the dense engine does not implement {', '.join(unsupported)}; it answers model, prompt/messages, "
                "max_tokens, temperature, top_p, n and seed (serve with --engine vllm for the rest)",
                param=unsupported[0],
            )
        prompts = _prompts(req, chat)
        max_tokens = (getattr(req, "max_completion_tokens", None) if chat else None) or req.max_tokens or 16
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        n = req.n or 1
        sampling = Sampling(max_tokens, temperature, top_p, req.seed or 0)
        repeated = [p for p in prompts for _ in range(n)]
        try:
            completions, prompt_tokens = await self.batcher.submit(
                target, repeated, sampling, own_seed=req.seed is not None and temperature > 0
            )
        except Busy as exc:
            return error(409, str(exc), "conflict")
        except PromptTooLong as exc:
            return vllm_error(str(exc))
        render = chat_response if chat else completion_response
        return JSONResponse(render(req.model or target, completions, prompt_tokens // n, max_tokens))


def _prompts(req, chat: bool) -> list:
    if chat:
        return [[{"role": m.get("role"), "content": _text(m.get("content"))} for m in req.messages]]
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt, list) and isinstance(prompt[0], str):
        return list(prompt)
    return [prompt]  # token ids: vLLM checks their length against the model's context


def _text(content) -> str:
    if isinstance(content, list):
        # The client's content-part form: only text parts carry meaning for a text model.
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def _chars(prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    if prompt and isinstance(prompt, list) and isinstance(prompt[0], dict):
        return sum(len(m["content"]) for m in prompt)
    return 0


def _finish(c: Completion, max_tokens: int) -> str:
    return "length" if len(c.token_ids) >= max_tokens else "stop"


def _usage(prompt_tokens: int, completions: list[Completion]) -> dict:
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}


def completion_response(model: str, completions: list[Completion], prompt_tokens: int, max_tokens: int) -> dict:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": _finish(c, max_tokens)}
            for i, c in enumerate(completions)
        ],
        "usage": _usage(prompt_tokens, completions),
    }


def chat_response(model: str, completions: list[Completion], prompt_tokens: int, max_tokens: int) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": _finish(c, max_tokens),
            }
            for i, c in enumerate(completions)
        ],
        "usage": _usage(prompt_tokens, completions),
    }
