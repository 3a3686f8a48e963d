"""The official `openai` client against a real gateway process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest

from tests.helpers import CLIENT_KEY


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base + "/v1", api_key=CLIENT_KEY, max_retries=0)


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert "tiny" in ids
    m = client.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model" and m.created > 0


def test_completion_shape_and_usage(client):
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 7


def test_seed_determinism_and_variation(client):
    kw = dict(model="tiny", prompt="def main():", max_tokens=12, temperature=1.0)
    a = client.completions.create(seed=123, **kw).choices[0].text
    b = client.completions.create(seed=123, **kw).choices[0].text
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1  # different seeds sample differently


def test_n_and_list_prompts(client):
    r = client.completions.create(model="tiny", prompt=["one", "two"], n=3, max_tokens=4, seed=5)
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert len({c.text for c in r.choices}) > 1


def test_stop_is_trimmed(client):
    base = client.completions.create(model="tiny", prompt="if x:", max_tokens=20, temperature=0).choices[0].text
    assert len(base) > 3
    stop = base[2:4]
    r = client.completions.create(model="tiny", prompt="if x:", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.find(stop)]
    assert stop not in r.choices[0].text


def test_logprobs_and_echo_agree(client):
    gen = client.completions.create(model="tiny", prompt="import os", max_tokens=5, temperature=0, logprobs=3)
    lp = gen.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == gen.usage.completion_tokens
    for val, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and len(top) == 3
        assert val == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the top token
    # Echo returns the prompt's tokens with logprobs, then the generated ones, and scoring the
    # prompt alone (max_tokens=0) gives exactly the same prompt logprobs.
    both = client.completions.create(model="tiny", prompt="import os", max_tokens=5, temperature=0, logprobs=1,
                                     echo=True)
    blp = both.choices[0].logprobs
    assert both.choices[0].text == "import os" + gen.choices[0].text
    assert blp.token_logprobs[0] is None
    assert blp.token_logprobs[-len(lp.token_logprobs):] == pytest.approx(lp.token_logprobs, abs=1e-5)
    score = client.completions.create(model="tiny", prompt="import os", max_tokens=0, echo=True, logprobs=0)
    slp = score.choices[0].logprobs
    assert score.choices[0].text == "import os" and "".join(slp.tokens) == "import os"
    assert slp.token_logprobs[1:] == pytest.approx(blp.token_logprobs[1:len(slp.tokens)], abs=1e-5)
    assert slp.text_offset == blp.text_offset[:len(slp.tokens)]


def test_streaming_completion_matches_non_streaming(client):
    kw = dict(model="tiny", prompt="class A:", max_tokens=10, seed=9)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason in ("stop", "length")


def test_chat_and_chat_stream(client):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, seed=3, logprobs=True,
                                       top_logprobs=2)
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert len(c.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in c.logprobs.content)
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, seed=3, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c.message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_max_completion_tokens(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3


def test_async_client_concurrent(gateway):
    async def main() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=gateway.base + "/v1", api_key=CLIENT_KEY, max_retries=0)
        rs = await asyncio.gather(*[ac.completions.create(model="tiny", prompt="x = ", max_tokens=5, seed=i)
                                    for i in range(6)])
        await ac.close()
        return [r.choices[0].text for r in rs]

    texts = asyncio.run(main())
    assert len(texts) == 6


def test_errors_raise_typed_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="missing", prompt="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=10_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", temperature=5)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_temperature_zero_is_greedy(client):
    r = client.completions.create(model="tiny", prompt="for i in", max_tokens=4, temperature=0, logprobs=1)
    lp = r.choices[0].logprobs
    assert all(math.isclose(v, max(t.values()), abs_tol=1e-5) for v, t in zip(lp.token_logprobs, lp.top_logprobs))
