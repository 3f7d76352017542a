"""The OpenAI-compatible subset: request models for completions and chat, and their answers.

Fields the `openai` client may send but es-serve does not implement (logprobs, stop sequences,
penalties, streaming) are refused with a message rather than silently ignored, except those that
cannot change the answer (user, metadata).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..types import Completion


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="a job id, or a model name (the weights of its latest job)")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0)
    stream: Literal[False] | None = Field(None, description="streaming is not supported")
    logprobs: Literal[False] | None = None
    stop: None = Field(None, description="stop sequences are not supported")


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: Literal[False] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):
            # The client's content-part form: only text parts carry meaning for a text model.
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


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
