"""convoy-server through the official `openai` Python client (pinned in
scripts/test-server.sh), against the server at $CONVOY_SERVER_URL on the bundled model.
Greedy requests make the answers comparable: streamed, whole and concurrent answers to the
same request must be the same text."""
import asyncio
import os

import openai
import pytest

URL = os.environ["CONVOY_SERVER_URL"]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "Who wrote Hamlet?",
]


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=URL + "/v1", api_key="not-needed", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client):
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def messages(question):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def whole_chat(client, model, question, max_tokens=24):
    r = client.chat.completions.create(
        model=model, messages=messages(question), max_tokens=max_tokens, temperature=0
    )
    assert r.object == "chat.completion"
    assert len(r.choices) == 1
    return r


def test_chat_whole_answer_and_usage(client, model):
    r = whole_chat(client, model, QUESTIONS[0])
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 10 and 0 < u.completion_tokens <= 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0
    # Asked again: the prompt comes from the prefix cache, the answer is the same.
    again = whole_chat(client, model, QUESTIONS[0])
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_chat_stream_equals_whole_answer(client, model):
    whole = whole_chat(client, model, QUESTIONS[1])
    stream = client.chat.completions.create(
        model=model,
        messages=messages(QUESTIONS[1]),
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, reasons, usage, roles = "", [], None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            text += c.delta.content or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert roles == ["assistant"]
    assert text == whole.choices[0].message.content
    assert reasons == [whole.choices[0].finish_reason]
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_text_completions_whole_and_streamed(client, model):
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert r.object == "text_completion"
    text = r.choices[0].text
    assert text and r.usage.completion_tokens <= 12
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == text


def test_seeded_sampling_repeats(client, model):
    def sample():
        return client.chat.completions.create(
            model=model, messages=messages(QUESTIONS[2]), max_tokens=24,
            temperature=0.9, top_p=0.95, seed=1234,
        ).choices[0].message.content
    assert sample() == sample()


def test_stop_strings(client, model):
    whole = whole_chat(client, model, QUESTIONS[0]).choices[0].message.content
    word = whole.split()[1]
    r = client.chat.completions.create(
        model=model, messages=messages(QUESTIONS[0]), max_tokens=24, temperature=0, stop=[word]
    )
    assert r.choices[0].finish_reason == "stop"
    assert word not in r.choices[0].message.content
    assert whole.startswith(r.choices[0].message.content)


def test_bad_requests_raise_the_clients_errors(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=messages("hi"), n=2)
    assert e.value.status_code == 400 and "n = 1" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=messages("hi"), temperature=-3)
    assert "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=messages("word " * 9000))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": 5}])


def test_concurrent_streams_match_their_answers_alone(client, model):
    alone = {q: whole_chat(client, model, q).choices[0].message.content for q in QUESTIONS}

    async def main():
        aclient = openai.AsyncOpenAI(base_url=URL + "/v1", api_key="not-needed", max_retries=0, timeout=300)

        async def one(q):
            stream = await aclient.chat.completions.create(
                model=model, messages=messages(q), max_tokens=24, temperature=0, stream=True
            )
            text = ""
            async for chunk in stream:
                for c in chunk.choices:
                    text += c.delta.content or ""
            return q, text

        try:
            return await asyncio.gather(*(one(QUESTIONS[i % len(QUESTIONS)]) for i in range(16)))
        finally:
            await aclient.close()

    for q, text in asyncio.run(main()):
        assert text == alone[q], q
