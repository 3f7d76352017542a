"""vLLM's engine-client interface over the server's one shared engine, with continuous batching.

vLLM's OpenAI serving classes talk to an `EngineClient` (normally AsyncLLM, an engine in its own
process). Here the engine is the in-process LLM that training also uses, so one thread steps its
LLMEngine for every request in flight: new requests join the running batch at the next step, and each
step's outputs go straight to the request that asked, which is what makes streaming real.

The thread holds the slot's lock while any request is in flight, because LLM.generate (training,
evaluation) would otherwise step the same engine and swallow our outputs. A session stops taking new
requests after `session_s` seconds and releases the lock once its requests finish, so a training step
waiting for the engine is not starved by a steady stream of completions.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .batcher import BatchStats

logger = logging.getLogger(__name__)


@dataclass
class _Submission:
    target: str  # whose weights: a job id or a model name
    engine: object  # the engine the request was rendered for; a rebuilt engine fails the request
    request_id: str
    prompt: object
    params: object
    kwargs: dict
    loop: asyncio.AbstractEventLoop = field(repr=False)
    out: asyncio.Queue = field(repr=False)


@dataclass
class _Abort:
    request_id: str


class EngineGone(RuntimeError):
    """The engine a request was prepared for was replaced (another model was loaded) before it ran."""


class StepDriver:
    """Steps the shared engine for every in-flight completion; `prepare(target)` runs under the lock."""

    def __init__(self, slot, prepare, stats: BatchStats | None = None, session_s: float = 2.0):
        self.slot, self.prepare, self.session_s = slot, prepare, session_s
        self.stats = stats if stats is not None else BatchStats()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.backlog: deque = deque()
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="es-serve-engine-steps", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, sub: _Submission) -> None:
        self.inbox.put(sub)

    def abort(self, request_id: str) -> None:
        self.inbox.put(_Abort(request_id))

    # -- the stepping thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self.stopping.is_set():
            if self.backlog:
                first = self.backlog.popleft()
            else:
                try:
                    first = self.inbox.get(timeout=0.5)
                except queue.Empty:
                    continue
            if isinstance(first, _Abort):
                # Not in the engine: drop it if it still waits for its turn.
                self.backlog = deque(x for x in self.backlog if getattr(x, "request_id", None) != first.request_id)
                continue
            with self.slot.lock:
                try:
                    self._session(first)
                except Exception:  # a bug here must not stop every later completion
                    logger.exception("completion session failed")
            if self.backlog:
                time.sleep(0.01)  # a training step waiting for the lock gets it before the next session

    def _session(self, first: _Submission) -> None:
        target = first.target
        try:
            engine = self.prepare(target)
        except Exception as exc:  # Busy, a model that fails to load: every waiting request for it hears why
            self._fail_all(target, exc, first)
            return
        core = engine.llm.llm_engine
        live: dict[str, _Submission] = {}
        aborted: set[str] = set()
        started = time.monotonic()
        seconds, tokens, requests = 0.0, 0, 0
        waiting = [first]
        while True:
            while True:
                try:
                    waiting.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            admitting = time.monotonic() - started < self.session_s
            for item in waiting:
                if isinstance(item, _Abort):
                    if item.request_id in live:
                        core.abort_request([item.request_id])
                        live.pop(item.request_id)
                    else:
                        aborted.add(item.request_id)
                        self.backlog = deque(x for x in self.backlog if x.request_id != item.request_id)
                elif item.request_id in aborted:
                    continue
                elif item.target != target or not admitting:
                    self.backlog.append(item)
                elif item.engine is not engine:
                    _deliver(item, EngineGone(f"the engine was rebuilt before {item.request_id} ran; send it again"))
                else:
                    try:
                        core.add_request(item.request_id, item.prompt, item.params, **item.kwargs)
                    except Exception as exc:  # a request the engine refuses fails alone
                        _deliver(item, exc)
                        continue
                    live[item.request_id] = item
                    requests += 1
            waiting = []
            if not live:
                break
            t0 = time.perf_counter()
            try:
                outputs = core.step()
            except Exception as exc:  # the engine failed mid-batch: its requests hear why, the thread goes on
                try:
                    core.abort_request(list(live))
                except Exception:
                    logger.exception("could not abort the requests of a failed engine step")
                for sub in live.values():
                    _deliver(sub, exc)
                live.clear()
                break
            seconds += time.perf_counter() - t0
            for out in outputs:
                sub = live.get(out.request_id)
                if sub is None:
                    continue
                tokens += sum(len(c.token_ids) for c in out.outputs) if out.finished else 0
                _deliver(sub, out)
                if out.finished:
                    del live[out.request_id]
        if requests:
            stats = self.stats
            stats.batches += 1
            stats.requests += requests
            stats.last_batch_size = requests
            stats.generate_seconds += seconds
            stats.completion_tokens += tokens

    def _fail_all(self, target: str, exc: Exception, first: _Submission) -> None:
        _deliver(first, exc)
        keep = deque()
        for source in (self.backlog, _drain(self.inbox)):
            for item in source:
                if isinstance(item, _Submission) and item.target == target:
                    _deliver(item, exc)
                else:
                    keep.append(item)
        self.backlog = keep


def _drain(q: queue.SimpleQueue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def _deliver(sub: _Submission, item) -> None:
    try:
        sub.loop.call_soon_threadsafe(sub.out.put_nowait, item)
    except RuntimeError:  # the event loop closed: the server is shutting down
        pass


class SharedEngineClient:
    """The part of vLLM's EngineClient its OpenAI serving classes call, for one target on one engine.

    `engine` is es-serve's VLLMEngine; its LLMEngine supplies the configuration, renderer (prompt
    rendering and tokenization exactly as vLLM's server does it) and input processor.
    """

    def __init__(self, driver: StepDriver, target: str, engine):
        core = engine.llm.llm_engine
        self.driver, self.target, self.engine = driver, target, engine
        self.vllm_config, self.model_config = core.vllm_config, core.model_config
        self.renderer, self.input_processor = core.renderer, core.input_processor

    is_running, is_stopped, errored, dead_error = True, False, False, None

    def check_admission(self, n: int = 1, request_id: str | None = None) -> None:
        pass

    async def generate(self, prompt, sampling_params, request_id: str, *, lora_request=None, **kwargs):
        if lora_request is not None:
            raise ValueError("es-serve serves the merged weights of a job or model; LoRA adapters are not accepted")
        forwarded = {k: kwargs[k] for k in ("trace_headers", "priority", "prompt_text") if kwargs.get(k) is not None}
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        self.driver.submit(
            _Submission(self.target, self.engine, request_id, prompt, sampling_params, forwarded, loop, out)
        )
        finished = False
        try:
            while not finished:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the client went away, or the request failed: free its slot in the batch
                self.driver.abort(request_id)

    async def abort(self, request_id) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            self.driver.abort(rid)

    async def is_tracing_enabled(self) -> bool:
        return False

    async def do_log_stats(self) -> None:
        pass

    async def check_health(self) -> None:
        pass

    async def notify_kv_transfer_request_rejected(self, *args, **kwargs) -> None:
        pass
