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


def test_echo_with_logprobs_scores_the_prompt(client, server):
    # how evaluation harnesses score a text: echo, logprobs, no new tokens
    prompt = "The capital of France is Paris"
    r = client.completions.create(model="m", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    c = r.choices[0]
    assert c.text == prompt and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert "".join(lp.tokens) == prompt and len(lp.tokens) == r.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    # the same numbers as the native API's prompt logprobs
    _, _, native = server.post("/generate", {"text": prompt, "return_logprob": True, "logprob_start_len": 0,
                                             "sampling_params": {"max_new_tokens": 0}})
    assert [t[0] for t in native["meta_info"]["input_token_logprobs"]] == pytest.approx(
        [None] + lp.token_logprobs[1:], abs=1e-6)
    # with new tokens: prompt entries, then generated ones offset past the echoed prompt
    g = client.completions.create(model="m", prompt=prompt, max_tokens=3, echo=True, logprobs=2, temperature=0)
    glp = g.choices[0].logprobs
    n = len(lp.tokens)
    assert glp.tokens[:n] == lp.tokens and len(glp.tokens) == n + 3
    assert glp.text_offset[n] == len(prompt)
    assert g.choices[0].text.startswith(prompt)
    # streaming: the first chunk carries the echoed prompt's logprobs
    chunks = list(client.completions.create(model="m", prompt=prompt, max_tokens=2, echo=True, logprobs=0,
                                            temperature=0, stream=True))
    first = chunks[0].choices[0].logprobs
    assert first.tokens[:n] == lp.tokens
    assert first.token_logprobs[1:n] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)


def test_errors_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], top_p=1.5)
    assert e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="x", max_tokens=5, n=0)
    assert "n" == e.value.body["param"]
