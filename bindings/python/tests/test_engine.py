"""The synchronous API on the real model: generate, stream, cancel, release, utilities,
errors. This module's engine never starts the asyncio dispatcher, so its requests are
polled directly (convoy_engine_poll)."""

from __future__ import annotations

import _thread
import signal
import threading
import time

import pytest

import convoy
from helpers import PARIS_ANSWER, PARIS_CHAT, PARIS_PROMPT_HEAD, PARIS_TEXT

LOG_LINES: list = []


@pytest.fixture(scope="module")
def engine(model_path):
    with convoy.Engine(model_path, max_batch_size=8, log_callback=LOG_LINES.append) as engine:
        yield engine
        assert not engine._core.dispatching, "a sync-only engine must not start the dispatcher"


def wait_idle(engine, timeout=10.0):
    """Waits until no request runs, waits or is held; returns the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats.running == 0 and stats.waiting == 0 and stats.requests_held == 0:
            return stats
        assert time.monotonic() < deadline, f"engine not idle: {stats}"
        time.sleep(0.02)


def test_generate_greedy_equals_the_stream(engine):
    prompt = "The capital of France is"
    completion = engine.generate(prompt, max_tokens=10)
    assert completion.finish_reason in ("length", "stop")
    assert completion.text and 1 <= len(completion.tokens) <= 10
    assert completion.stats.generated_tokens == len(completion.tokens)
    assert completion.stats.prompt_tokens == len(engine.tokenize(prompt))
    assert completion.stats.total_latency > 0

    request = engine.stream(prompt, max_tokens=10)
    pieces = list(request)
    assert all(isinstance(p, convoy.Token) for p in pieces)
    assert "".join(p.text for p in pieces) == completion.text == request.text
    assert [p.token_id for p in pieces if p.token_id is not None] == completion.tokens
    assert request.result.finish_reason == completion.finish_reason
    assert request.result.stats.generated_tokens == len(completion.tokens)
    assert list(request) == []  # exhausted
    wait_idle(engine)


def test_chat_generate_gives_the_known_answer(engine):
    completion = engine.generate(messages=PARIS_CHAT, max_tokens=16)
    assert completion.tokens == PARIS_ANSWER
    assert completion.text == PARIS_TEXT
    assert completion.finish_reason == convoy.FinishReason.STOP
    # The log callback saw one line for it (on the engine thread).
    # The log line is written on the engine thread, possibly just after FINISHED is delivered.
    deadline = time.monotonic() + 10
    while not any(f"request_id={completion.id}" in line for line in LOG_LINES):
        assert time.monotonic() < deadline, LOG_LINES
        time.sleep(0.05)


def test_token_prompt_equals_the_chat_prompt(engine):
    prompt = engine.tokenize(engine.render_chat(PARIS_CHAT))
    assert prompt[: len(PARIS_PROMPT_HEAD)] == PARIS_PROMPT_HEAD
    completion = engine.generate(tokens=prompt, max_tokens=16)
    assert completion.tokens == PARIS_ANSWER
    assert completion.stats.prompt_tokens == len(prompt)


def test_generate_batch_equals_single_requests(engine):
    prompts = [PARIS_TEXT, "Hi", "def fibonacci(n):"]
    completions = engine.generate_batch(prompts, max_tokens=8)
    assert [c.text for c in completions] == [
        engine.generate(p, max_tokens=8).text for p in prompts
    ]
    ids = [c.id for c in completions]
    assert ids == list(range(ids[0], ids[0] + 3))
    # All or none: a bad prompt is named by its index, and nothing is queued.
    with pytest.raises(convoy.InvalidArgumentError) as info:
        engine.generate_batch(["Hi", "a\0b"], max_tokens=4)
    assert "prompts[1]" in info.value.message
    for bad in ([], "Hi", None, 3):
        with pytest.raises(convoy.InvalidArgumentError):
            engine.stream_batch(bad)
    # Rejected by the library after the first prompt was checked: still nothing queued.
    with pytest.raises(convoy.PromptTooLongError):
        engine.stream_batch(["Hi", "word " * 9000], max_tokens=4)
    assert engine.stats().requests_held == 0  # a queued "Hi" would be held until polled
    wait_idle(engine)


def test_prefix_cache_reuse_save_and_load(model_path, tmp_path):
    # An engine of its own: a small cache holding only this test's entries (a small file).
    with convoy.Engine(model_path, prefix_cache_bytes=64 << 20) as cold:
        first = cold.generate(messages=PARIS_CHAT, max_tokens=16)
        assert first.tokens == PARIS_ANSWER and first.stats.cached_tokens == 0
        again = cold.generate(messages=PARIS_CHAT, max_tokens=16)
        assert again.tokens == first.tokens and again.text == PARIS_TEXT
        assert 0 < again.stats.cached_tokens < again.stats.prompt_tokens
        stats = cold.stats()
        assert stats.prefix_cache_hits >= 1
        assert stats.prefix_cache_hit_tokens >= again.stats.cached_tokens
        assert stats.prefix_cache_entries > 0 and 0 < stats.prefix_cache_bytes <= 64 << 20
        assert stats.prefix_cache_evictions == 0
        path = tmp_path / "cache.safetensors"
        entries = cold.save_prefix_cache(path)
        assert entries > 0 and path.is_file()
        assert cold.save_prefix_cache(str(path)) == entries  # replaced
        with pytest.raises(convoy.InvalidArgumentError):
            cold.save_prefix_cache(tmp_path / "x.bin")
        with pytest.raises(convoy.InvalidArgumentError):
            cold.save_prefix_cache("a\0b.safetensors")
    # A new engine starts with the saved entries and reuses them at once.
    with convoy.Engine(model_path, prefix_cache_path=path) as warm:
        assert warm.stats().prefix_cache_entries == entries
        warm_again = warm.generate(messages=PARIS_CHAT, max_tokens=16)
        assert warm_again.tokens == PARIS_ANSWER and warm_again.stats.cached_tokens > 0
    with pytest.raises(convoy.InvalidArgumentError):
        convoy.Engine(model_path, prefix_cache_path=str(tmp_path / "x.bin"))
    with pytest.raises(convoy.InvalidArgumentError):
        convoy.Engine(model_path, prefix_cache_bytes=-1)


def test_tokenize_detokenize_round_trip(engine):
    text = "Hello, world! Ünïcödé and 漢字 too."
    ids = engine.tokenize(text, add_special=False)
    assert ids and all(0 <= i < engine.model_info.vocab_size for i in ids)
    assert engine.detokenize(ids) == text
    long_text = "convoy " * 500
    assert engine.detokenize(engine.tokenize(long_text, add_special=False)) == long_text
    assert engine.tokenize("") == [] or engine.tokenize("") == [engine.model_info.bos_token_id]
    # Special tokens are kept or dropped on request.
    special = engine.tokenize("<|im_start|>user")
    assert special[0] == 1
    assert "<|im_start|>" in engine.detokenize(special, skip_special=False)
    assert "<|im_start|>" not in engine.detokenize(special, skip_special=True)


def test_render_chat_contains_the_messages(engine):
    text = engine.render_chat([{"role": "user", "content": "Tell me about llamas."}])
    assert "Tell me about llamas." in text
    assert text.endswith("<|im_start|>assistant\n")
    without = engine.render_chat([("user", "Tell me about llamas.")], add_generation_prompt=False)
    assert "Tell me about llamas." in without and not without.endswith("assistant\n")


def test_model_info(engine):
    info = engine.model_info
    assert info.vocab_size == 49152
    assert info.architecture == "llama"
    assert info.eos_token_ids and all(0 <= i < info.vocab_size for i in info.eos_token_ids)
    assert info.backend == "cpu" == convoy.backend()
    assert info.has_chat_template is True
    assert info.context_length == 8192 and info.max_context == engine.context_length == 8192
    assert info.name and info.weight_dtype
    assert info.num_layers == 30 and info.num_heads > 0 and info.num_kv_heads > 0
    assert info.bos_token_id == 1


def test_stop_strings_and_stop_tokens(engine):
    full = engine.generate("The capital of France is", max_tokens=8)
    assert "Paris" in full.text
    stopped = engine.generate("The capital of France is", max_tokens=8, stop=["Paris"])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index("Paris")]
    first = full.tokens[1]
    by_token = engine.generate("The capital of France is", max_tokens=8, stop_token_ids=[first])
    assert by_token.finish_reason == "stop"
    assert by_token.tokens[0] == full.tokens[0]
    assert len(by_token.tokens) <= 2


def test_seeded_sampling_is_reproducible(engine):
    kwargs = dict(max_tokens=6, temperature=0.9, top_p=0.95, top_k=40, seed=1234, ignore_eos=True)
    a = engine.generate("Once upon a time", **kwargs)
    b = engine.generate("Once upon a time", **kwargs)
    assert a.tokens == b.tokens and len(a.tokens) == 6
    assert a.finish_reason == "length"


def test_cancel_mid_stream(engine):
    request = engine.stream("Write a long story about a dragon.", max_tokens=200, ignore_eos=True)
    received = []
    for token in request:
        received.append(token)
        if len(received) == 2:
            request.cancel()
    assert request.result.finish_reason == convoy.FinishReason.CANCELLED
    assert 2 <= len(request.tokens) < 200
    assert request.result.stats is not None
    request.cancel()  # harmless after the end
    stats = wait_idle(engine)
    assert stats.running == 0


def test_release_mid_stream(engine):
    with engine.stream("Count to one hundred:", max_tokens=200, ignore_eos=True) as request:
        next(request)
    assert request.done and request.result.finish_reason == "cancelled"
    assert list(request) == []
    wait_idle(engine)
    # Garbage collection of an abandoned request releases it too.
    request = engine.stream("Count to one hundred:", max_tokens=200, ignore_eos=True)
    next(request)
    del request
    wait_idle(engine)


def test_ctrl_c_interrupts_a_blocking_generate(engine):
    # A handler that behaves like Python's default for the first interrupt and ignores the
    # rest, whatever earlier tests (asyncio.run) left installed.
    interrupted = []

    def on_sigint(signum, frame):
        if not interrupted:
            interrupted.append(signum)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    done = threading.Event()

    def interrupt():
        # Once generation is under way; again every second in case one lands while the main
        # thread is between bytecodes of cleanup code (seen once on a heavily loaded machine).
        while not done.wait(0.2) and engine.stats().tokens_generated == before:
            pass
        while not done.wait(0.5):
            _thread.interrupt_main()
            done.wait(0.5)

    before = engine.stats().tokens_generated
    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.generate("Write a long story about a dragon.", max_tokens=400, ignore_eos=True)
    finally:
        done.set()
        thread.join()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 300
    wait_idle(engine)  # the interrupted request was released


def test_bad_arguments_raise_invalid_argument(engine):
    with pytest.raises(convoy.ConvoyError) as info:
        engine.generate("Hi", max_tokens=0)
    assert info.value.status == convoy.Status.INVALID_ARGUMENT
    assert isinstance(info.value, convoy.InvalidArgumentError)
    assert info.value.message  # convoy_last_error_message explains it
    for bad in (
        dict(prompt="Hi", max_tokens=-1),
        dict(prompt="Hi", temperature=-1.0),
        dict(prompt="Hi", top_p=1.5),
        dict(prompt="Hi", temperature=float("nan")),
        dict(prompt="Hi", stop_token_ids=[-1]),
        dict(prompt="Hi", seed=-1),
        dict(tokens=[]),
        dict(tokens=[engine.model_info.vocab_size]),
        dict(messages=[]),
        dict(messages=[{"role": "user"}]),
        dict(prompt="a\0b"),
        dict(),
        dict(prompt="Hi", tokens=[1]),
    ):
        with pytest.raises(convoy.InvalidArgumentError) as info:
            engine.generate(**bad)
        assert info.value.status == convoy.Status.INVALID_ARGUMENT, bad
    with pytest.raises(convoy.InvalidArgumentError):
        engine.detokenize([engine.model_info.vocab_size + 5])
    with pytest.raises(convoy.InvalidUtf8Error) as info:
        engine.tokenize("\udc80")
    assert info.value.status == convoy.Status.INVALID_UTF8
    wait_idle(engine)


def test_too_long_prompt(engine):
    with pytest.raises(convoy.PromptTooLongError) as info:
        engine.generate("word " * 9000, max_tokens=4)
    assert info.value.status == convoy.Status.PROMPT_TOO_LONG
    wait_idle(engine)


def test_unknown_model_path():
    with pytest.raises(convoy.ConvoyError) as info:
        convoy.Engine("/nonexistent/model.gguf")
    assert info.value.status == convoy.Status.MODEL_NOT_FOUND
    assert isinstance(info.value, convoy.ModelNotFoundError)
    assert "/nonexistent/model.gguf" in str(info.value)
    with pytest.raises(convoy.InvalidArgumentError):
        convoy.Engine("/nonexistent/model.gguf", max_batch_size=-3)
    with pytest.raises(convoy.InvalidArgumentError):
        convoy.Engine("/nonexistent/model.gguf", mode="sideways")
