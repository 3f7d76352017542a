"""The stepping thread behind the OpenAI routes: requests join a running batch, leave it when abandoned,
and an engine failure or a busy engine reaches the request instead of stopping the thread.

The engine here is a scripted LLMEngine: each step emits one token for every live request, and a request
finishes after the number of tokens its params ask for.
"""

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from es_serve.server.engine_client import SharedEngineClient, StepDriver
from es_serve.server.engine_slot import Busy


class ScriptedCore:
    def __init__(self):
        self.live: dict[str, list] = {}  # request id -> [tokens made, tokens wanted]
        self.log: list[tuple] = []  # ("add" | "step" | "abort", ...)
        self.fail_next_step = False
        self.vllm_config = self.model_config = self.renderer = self.input_processor = None

    def add_request(self, request_id, prompt, params, **kwargs):
        self.live[request_id] = [0, params]
        self.log.append(("add", request_id, sorted(self.live)))

    def abort_request(self, request_ids, internal=False):
        for rid in request_ids:
            self.live.pop(rid, None)
        self.log.append(("abort", list(request_ids)))

    def step(self):
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("engine step failed")
        time.sleep(0.002)  # a step takes time, so requests arrive while others are in flight
        self.log.append(("step", sorted(self.live)))
        outputs = []
        for rid, state in list(self.live.items()):
            state[0] += 1
            finished = state[0] >= state[1]
            outputs.append(SimpleNamespace(request_id=rid, finished=finished, outputs=[SimpleNamespace(token_ids=[7])]))
            if finished:
                del self.live[rid]
        return outputs


@pytest.fixture
def setup():
    core = ScriptedCore()
    engine = SimpleNamespace(llm=SimpleNamespace(llm_engine=core))
    slot = SimpleNamespace(lock=threading.RLock())
    busy = set()

    def prepare(target):
        if target in busy:
            raise Busy(f"the engine is training; {target} later")
        return engine

    driver = StepDriver(slot, prepare)
    driver.start()
    yield core, engine, driver, busy, slot
    driver.stop()


async def collect(client, rid, tokens, stop_after=None):
    got = []
    gen = client.generate("prompt", tokens, rid)
    async for out in gen:
        got.append(out)
        if stop_after is not None and len(got) >= stop_after:
            await gen.aclose()
            break
    return got


def test_a_new_request_joins_the_running_batch(setup):
    core, engine, driver, _, _ = setup
    client = SharedEngineClient(driver, "job-a", engine)

    async def main():
        long = asyncio.create_task(collect(client, "long", 400))
        while not any(e[0] == "step" for e in core.log):
            await asyncio.sleep(0.001)
        short = await collect(client, "short", 2)
        return await long, short

    long, short = asyncio.run(main())
    assert len(long) == 400 and long[-1].finished and len(short) == 2 and short[-1].finished
    # The short request was added while the long one was in flight, and both were stepped together.
    add_short = next(i for i, e in enumerate(core.log) if e[:2] == ("add", "short"))
    assert core.log[add_short][2] == ["long", "short"]
    assert any(e == ("step", ["long", "short"]) for e in core.log)


def test_an_abandoned_request_is_aborted_and_frees_the_engine(setup):
    core, engine, driver, _, slot = setup
    client = SharedEngineClient(driver, "job-a", engine)
    got = asyncio.run(collect(client, "gone", 10_000, stop_after=2))
    assert len(got) == 2
    deadline = time.time() + 10
    while core.live and time.time() < deadline:
        time.sleep(0.01)
    assert ("abort", ["gone"]) in core.log and not core.live
    assert slot.lock.acquire(timeout=5), "the session kept the engine after its only request went away"
    slot.lock.release()


def test_an_engine_failure_reaches_the_request_and_the_next_one_is_served(setup):
    core, engine, driver, _, _ = setup
    client = SharedEngineClient(driver, "job-a", engine)
    core.fail_next_step = True
    with pytest.raises(RuntimeError, match="engine step failed"):
        asyncio.run(collect(client, "first", 3))
    assert len(asyncio.run(collect(client, "second", 3))) == 3


def test_a_busy_engine_refuses_the_request_with_busy(setup):
    _, engine, driver, busy, _ = setup
    busy.add("job-b")
    with pytest.raises(Busy, match="training"):
        asyncio.run(collect(SharedEngineClient(driver, "job-b", engine), "r", 3))
    assert len(asyncio.run(collect(SharedEngineClient(driver, "job-a", engine), "r2", 2))) == 2
