"""The official OpenAI Python client, unchanged, against the server: completions, chat and
streaming; greedy answers equal the CLI's greedy output."""

import openai
import pytest

from sglang_testing import cli_generate


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused")


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]


def test_chat_equals_cli_greedy(client):
    prompt = "Name three fruits that are red."
    want = cli_generate(prompt, 40, chat=True)
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": prompt}],
                                       max_tokens=40, temperature=0)
    assert r.choices[0].message.content == want["text"]
    assert r.choices[0].finish_reason == want["finish_reason"]
    assert r.usage.completion_tokens == len(want["output_ids"])
    assert r.usage.prompt_tokens == len(want["prompt_ids"])


def test_completion_equals_cli_greedy(client):
    prompt = "The three laws of thermodynamics are"
    want = cli_generate(prompt, 32)
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=32, temperature=0)
    assert r.choices[0].text == want["text"]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == r.usage.prompt_tokens + 32


def test_streaming_chat_matches_non_streaming(client):
    messages = [{"role": "user", "content": "Write one sentence about the moon."}]
    full = client.chat.completions.create(model="m", messages=messages, max_tokens=48, temperature=0)
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=48, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, reasons, usage = "", [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert text == full.choices[0].message.content
    assert reasons == [full.choices[0].finish_reason]
    assert usage.completion_tokens == full.usage.completion_tokens


def test_streaming_completion(client):
    full = client.completions.create(model="m", prompt="Once upon a time", max_tokens=24, temperature=0)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt="Once upon a time", max_tokens=24, temperature=0, stream=True) if c.choices)
    assert text == full.choices[0].text


def test_n_seed_stop_and_logprobs(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me a story."}],
                                       max_tokens=20, temperature=1.0, n=3, seed=11)
    assert len(r.choices) == 3
    assert len({c.message.content for c in r.choices}) > 1, "seeded choices differ"
    again = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me a story."}],
                                           max_tokens=20, temperature=1.0, n=3, seed=11)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    # stop: the text ends right before the stop string
    base = client.completions.create(model="m", prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0).choices[0].text
    stop = base[len(base) // 2:len(base) // 2 + 2]
    cut = client.completions.create(model="m", prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[:base.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # logprobs
    lp = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                        temperature=0, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 3
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
    lp = client.completions.create(model="m", prompt="Hi", max_tokens=4, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.tokens) == 4
    assert all(len(t) == 2 for t in lp.choices[0].logprobs.top_logprobs)


def test_errors_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], top_p=1.5)
    assert e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="x", max_tokens=5, n=0)
    assert "n" == e.value.body["param"]
