"""asyncio on the real model: agenerate/astream through the engine's dispatcher thread
(convoy_engine_poll_any), cancellation, the handoff from direct polling, and close().

The tests run in file order on one engine: the first checks the handoff (so it needs an
engine that has not started the dispatcher), the last closes the engine."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import convoy
from helpers import PARIS_ANSWER, PARIS_CHAT, QUESTIONS

LONG = "Write a long story about a dragon."


@pytest.fixture(scope="module")
def engine(model_path):
    with convoy.Engine(model_path, max_batch_size=16) as engine:
        yield engine


async def wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats.running == 0 and stats.waiting == 0 and stats.requests_held == 0:
            return stats
        assert time.monotonic() < deadline, f"engine not idle: {stats}"
        await asyncio.sleep(0.02)


def test_a_sync_stream_survives_the_dispatcher_start(engine):
    core = engine._core
    assert not core.dispatching, "this test must run first, on an engine without dispatcher"
    request = engine.stream(messages=PARIS_CHAT, max_tokens=16)
    first = next(request)  # polled directly (convoy_engine_poll)
    rest = []
    consumer = threading.Thread(target=lambda: rest.extend(request))
    consumer.start()  # keeps polling directly while the dispatcher starts

    async def other():
        return await engine.agenerate("The capital of France is", max_tokens=3)

    other_completion = asyncio.run(other())
    consumer.join(120)
    assert not consumer.is_alive()
    assert core.dispatching and core.dispatcher.is_alive()
    assert [first.token_id] + [t.token_id for t in rest if t.token_id is not None] == PARIS_ANSWER
    assert request.result.finish_reason == "stop"
    assert other_completion.tokens and other_completion.finish_reason == "length"
    # Sync requests now go through the dispatcher too.
    assert engine.generate(messages=PARIS_CHAT, max_tokens=16).tokens == PARIS_ANSWER
    asyncio.run(wait_idle(engine))


def test_concurrent_agenerate_equals_sequential_generate(engine):
    # Text prompts (shorter than chats: the CPU is slow); 8 distinct prompts, each twice.
    reference = {q: engine.generate(q, max_tokens=8) for q in QUESTIONS}
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(16)]

    async def main():
        return await asyncio.gather(*(engine.agenerate(q, max_tokens=8) for q in prompts))

    results = asyncio.run(main())
    assert len({r.id for r in results}) == 16
    for question, result in zip(prompts, results):
        assert result.tokens == reference[question].tokens, question
        assert result.text == reference[question].text
        assert result.finish_reason == reference[question].finish_reason
    asyncio.run(wait_idle(engine))


def test_astream_concatenation_equals_agenerate(engine):
    async def main():
        completion = await engine.agenerate("Once upon a time", max_tokens=6)
        async with engine.astream("Once upon a time", max_tokens=6) as request:
            pieces = [t async for t in request]
        return completion, request, pieces

    completion, request, pieces = asyncio.run(main())
    assert "".join(p.text for p in pieces) == completion.text == request.text
    assert [p.token_id for p in pieces if p.token_id is not None] == completion.tokens
    assert request.result.finish_reason == completion.finish_reason == "length"
    assert request.result.stats.generated_tokens == 6


def test_cancelling_the_task_ends_the_request(engine):
    async def main():
        got_two = asyncio.Event()
        received = []

        async def consume():
            async for token in engine.astream(LONG, max_tokens=300, ignore_eos=True):
                received.append(token)
                if len(received) == 2:
                    got_two.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_two.wait(), 120)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(received) < 300
        await wait_idle(engine)

        # The same for agenerate: cancel while it runs.
        task = asyncio.create_task(engine.agenerate(LONG, max_tokens=300, ignore_eos=True))
        deadline = time.monotonic() + 60
        while engine.stats().running == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await wait_idle(engine)

    stats = asyncio.run(main())
    assert stats.running == 0 and stats.requests_held == 0


def test_cancel_break_and_errors(engine):
    async def main():
        # cancel(): iteration runs to the FINISHED event.
        request = engine.astream(LONG, max_tokens=300, ignore_eos=True)
        async for _ in request:
            request.cancel()
        assert request.result.finish_reason == convoy.FinishReason.CANCELLED
        assert request.result.stats is not None
        # break: the abandoned request is released.
        async for _ in engine.astream(LONG, max_tokens=300, ignore_eos=True):
            break
        await wait_idle(engine)
        # Rejected submissions raise at once.
        with pytest.raises(convoy.InvalidArgumentError) as info:
            await engine.agenerate("Hi", max_tokens=0)
        assert info.value.status == convoy.Status.INVALID_ARGUMENT
        with pytest.raises(convoy.PromptTooLongError):
            engine.astream(tokens=[1] * 9000)

    asyncio.run(main())


def test_close_stops_the_dispatcher_and_ends_open_requests(engine):
    """Runs last: closes the module's engine."""
    dispatcher = engine._core.dispatcher
    sync_request = engine.stream(LONG, max_tokens=300, ignore_eos=True)
    next(sync_request)

    async def main():
        request = engine.astream(LONG, max_tokens=300, ignore_eos=True)
        await request.__anext__()
        await engine.aclose()
        assert not dispatcher.is_alive()
        async for _ in request:
            pass
        return request

    request = asyncio.run(main())
    assert request.result.finish_reason == "cancelled" and request.result.stats is None
    for _ in sync_request:  # events queued before close, then the end
        pass
    assert sync_request.result.finish_reason == "cancelled"
    assert engine.closed
    engine.close()  # idempotent
    with pytest.raises(convoy.ShutDownError) as info:
        engine.generate("Hi")
    assert info.value.status == convoy.Status.SHUT_DOWN
    with pytest.raises(convoy.ShutDownError):
        engine.stats()
