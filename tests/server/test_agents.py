"""The agent APIs through the real server with the official, unmodified clients: OpenAI's
Responses API (`openai` `client.responses`) and Anthropic's Messages API (`anthropic`
`client.messages`). Each is checked against chat completions on the same conversation (greedy,
so the same prompt must give the same text and the same token counts), streamed against whole,
through a tool-call round trip, with structured output, with reasoning split off by
`--reasoning-parser`, and on bad input (a 400 in that protocol's error shape naming the field,
and the server still serving)."""

import json
import socket

import anthropic
import jsonschema
import openai
import pytest
from sglang_testing import Server

KEY = "agent-key"
GREEDY = {"temperature": 0}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
# forces a `<think>` block, so the reasoning split is exercised on a model that does not think
THINK = r"<think>\n[a-z ]{5,40}\n</think>\n\n[A-Z][a-z ]{5,40}\."


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused")


@pytest.fixture(scope="module")
def an(server):
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{server.port}", api_key="unused")


@pytest.fixture(scope="module")
def thinker():
    """A server that splits reasoning off (Qwen3's `<think>` markers) and wants a key."""
    s = Server("--reasoning-parser", "qwen3", "--api-key", KEY)
    yield s
    s.stop()


def chat(oa, messages, **kw):
    return oa.chat.completions.create(model="m", messages=messages, **kw)


def oa_tools():
    return [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
             "parameters": WEATHER}]


def an_tools():
    return [{"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER}]


# ---------------------------------------------------------------- Responses API


def test_responses_matches_chat_completions(oa):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"}]
    want = chat(oa, msgs, max_tokens=24, **GREEDY)
    r = oa.responses.create(model="m", instructions="You are terse.", input="What is the capital of France?",
                            max_output_tokens=24, **GREEDY)
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert r.output_text == want.choices[0].message.content
    assert r.usage.input_tokens == want.usage.prompt_tokens
    assert r.usage.output_tokens == want.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # the same conversation as a list of message items, with parts
    r2 = oa.responses.create(model="m", max_output_tokens=24, **GREEDY, input=[
        {"role": "developer", "content": "You are terse."},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "What is the capital of France?"}]}])
    assert r2.output_text == r.output_text


def test_responses_stored_retrieved_deleted(oa, server):
    r = oa.responses.create(model="m", input="Name a colour.", max_output_tokens=8, **GREEDY)
    got = oa.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    oa.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        oa.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        oa.responses.delete(r.id)
    # not stored when asked not to be
    r = oa.responses.create(model="m", input="Name a colour.", max_output_tokens=4, store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        oa.responses.retrieve(r.id)
    # the metrics label is the route's template, not each id
    _, _, text = server.request("GET", "/metrics")
    assert 'path="/v1/responses/{id}"' in text or 'endpoint="/v1/responses/{id}"' in text
    assert r.id not in text


def test_responses_stream_matches_whole(oa):
    kw = dict(model="m", input="Write one sentence about the sea.", max_output_tokens=200, **GREEDY)
    whole = oa.responses.create(**kw)
    assert whole.status == "completed"
    events = list(oa.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    done = [e for e in events if e.type == "response.output_text.done"]
    assert len(done) == 1 and done[0].text == whole.output_text
    final = events[-1].response
    assert final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens
    # the client's own stream helper accumulates the same response
    with oa.responses.stream(**kw) as s:
        text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
        assert s.get_final_response().output_text == whole.output_text == text
    # streamed responses are stored too
    assert oa.responses.retrieve(final.id).output_text == whole.output_text


def test_responses_incomplete_at_max_output_tokens(oa):
    r = oa.responses.create(model="m", input="Tell me a long story.", max_output_tokens=3, **GREEDY)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3
    events = list(oa.responses.create(model="m", input="Tell me a long story.", max_output_tokens=3,
                                      stream=True, **GREEDY))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == r.output_text


def test_responses_function_call_round_trip(oa):
    r = oa.responses.create(model="m", input="What is the weather in Paris?", tools=oa_tools(),
                            tool_choice="required", max_output_tokens=80, **GREEDY)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) >= 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    assert calls[0].call_id and calls[0].status == "completed"
    # the streamed call is the same call
    events = list(oa.responses.create(model="m", input="What is the weather in Paris?", tools=oa_tools(),
                                      tool_choice="required", max_output_tokens=80, stream=True, **GREEDY))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == calls[0].arguments
    item = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert item[0].arguments == calls[0].arguments and item[0].name == "get_weather"
    # continue from the stored response with the tool's output ...
    out = [{"type": "function_call_output", "call_id": c.call_id, "output": "18 degrees and sunny"} for c in calls]
    follow = oa.responses.create(model="m", previous_response_id=r.id, input=out,
                                 tools=oa_tools(), max_output_tokens=40, **GREEDY)
    assert follow.status in ("completed", "incomplete") and follow.previous_response_id == r.id
    # ... which is the same as sending the whole conversation by hand
    by_hand = oa.responses.create(model="m", tools=oa_tools(), max_output_tokens=40, **GREEDY, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        *[{"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments} for c in calls],
        *out])
    assert by_hand.output_text == follow.output_text
    assert by_hand.usage.input_tokens == follow.usage.input_tokens


def test_responses_named_tool_choice_and_none(oa):
    r = oa.responses.create(model="m", input="Hello", tools=oa_tools(),
                            tool_choice={"type": "function", "name": "get_weather"},
                            max_output_tokens=80, **GREEDY)
    calls = [o for o in r.output if o.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather"]
    r = oa.responses.create(model="m", input="What is the weather in Paris?", tools=oa_tools(),
                            tool_choice="none", max_output_tokens=20, **GREEDY)
    assert all(o.type == "message" for o in r.output)


def test_responses_json_schema_text_format(oa):
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    r = oa.responses.create(model="m", input="Invent a person.", text=fmt, max_output_tokens=80, **GREEDY)
    jsonschema.validate(json.loads(r.output_text), PERSON)
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize("extra,param", [
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"type": "image_generation_call"}]}, "input[0].type"),
    ({"input": []}, "input"),
    ({"previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"max_output_tokens": -1}, "max_output_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "wat"}}}}, "text.format"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_responses_bad_input_names_the_field(server, extra, param):
    body = {"model": "m", "input": "hi", "max_output_tokens": 4, **extra}
    status, _, err = server.post("/v1/responses", body)
    assert status == 400, err
    assert err["error"]["param"] == param, err
    assert err["error"]["type"] == "invalid_request_error"
    assert server.request("GET", "/health")[0] == 200


def test_responses_bad_input_through_the_client(oa):
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model="m", input="hi", tools=[{"type": "web_search"}])
    assert "tools[0].type" in str(e.value)


# ---------------------------------------------------------------- Messages API


def test_messages_matches_chat_completions(oa, an):
    want = chat(oa, [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "What is the capital of Italy?"}], max_tokens=24, **GREEDY)
    m = an.messages.create(model="m", max_tokens=24, system="You are terse.",
                           messages=[{"role": "user", "content": "What is the capital of Italy?"}],
                           extra_body=GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.model == "m"
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == want.choices[0].message.content
    u = m.usage
    assert u.input_tokens + u.cache_read_input_tokens == want.usage.prompt_tokens
    assert u.output_tokens == want.usage.completion_tokens
    assert m.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[want.choices[0].finish_reason]
    # system as text blocks, content as text blocks
    m2 = an.messages.create(model="m", max_tokens=24, system=[{"type": "text", "text": "You are terse."}],
                            messages=[{"role": "user", "content": [
                                {"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of Italy?"}]}],
                            extra_body=GREEDY)
    assert m2.content[0].text == m.content[0].text


def test_messages_count_tokens_matches_create(an):
    msgs = [{"role": "user", "content": "Count these tokens, please."}]
    n = an.messages.count_tokens(model="m", system="Be brief.", messages=msgs)
    m = an.messages.create(model="m", max_tokens=2, system="Be brief.", messages=msgs, extra_body=GREEDY)
    assert n.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens
    with_tools = an.messages.count_tokens(model="m", messages=msgs, tools=an_tools())
    assert with_tools.input_tokens > n.input_tokens


def test_messages_stream_matches_whole(an):
    kw = dict(model="m", max_tokens=200, messages=[{"role": "user", "content": "Write one sentence about rain."}],
              extra_body=GREEDY)
    whole = an.messages.create(**kw)
    with an.messages.stream(**kw) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    # the raw event sequence
    kinds = [e.type for e in an.messages.create(stream=True, **kw)]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_messages_max_tokens_and_stop_sequences(an):
    msgs = [{"role": "user", "content": "Describe the moon in two sentences."}]
    m = an.messages.create(model="m", max_tokens=3, messages=msgs, extra_body=GREEDY)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3
    full = an.messages.create(model="m", max_tokens=60, messages=msgs, extra_body=GREEDY).content[0].text
    words = full.split()
    assert len(words) >= 4, full
    stop = words[3]
    m = an.messages.create(model="m", max_tokens=60, messages=msgs, stop_sequences=[stop], extra_body=GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == full[:full.index(stop)]


def test_messages_tool_use_round_trip(an):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = an.messages.create(model="m", max_tokens=80, messages=msgs, tools=an_tools(),
                           tool_choice={"type": "any"}, extra_body=GREEDY)
    assert m.stop_reason == "tool_use"
    uses = [b for b in m.content if b.type == "tool_use"]
    assert uses and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, WEATHER)
    # streamed: the input arrives as input_json_delta and accumulates to the same input
    with an.messages.stream(model="m", max_tokens=80, messages=msgs, tools=an_tools(),
                            tool_choice={"type": "any"}, extra_body=GREEDY) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.input for b in final.content if b.type == "tool_use"] == [u.input for u in uses]
    # answer with the results: the model goes on to a text answer
    follow = an.messages.create(model="m", max_tokens=40, tools=an_tools(), extra_body=GREEDY, messages=[
        *msgs,
        {"role": "assistant", "content": [b.model_dump(include={"type", "id", "name", "input"}) for b in uses]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "18 degrees and sunny"}
                                     for u in uses]}])
    assert follow.stop_reason in ("end_turn", "max_tokens")
    assert follow.content[0].type == "text"


def test_messages_forced_tool_and_none(an):
    m = an.messages.create(model="m", max_tokens=80, messages=[{"role": "user", "content": "Hello"}],
                           tools=an_tools(), tool_choice={"type": "tool", "name": "get_weather"},
                           extra_body=GREEDY)
    assert [b.name for b in m.content if b.type == "tool_use"] == ["get_weather"]
    m = an.messages.create(model="m", max_tokens=20, messages=[{"role": "user", "content": "Weather in Paris?"}],
                           tools=an_tools(), tool_choice={"type": "none"}, extra_body=GREEDY)
    assert all(b.type == "text" for b in m.content) and m.stop_reason != "tool_use"


def test_messages_structured_output(an):
    m = an.messages.create(model="m", max_tokens=80, messages=[{"role": "user", "content": "Invent a person."}],
                           output_config={"format": {"type": "json_schema", "schema": PERSON}},
                           extra_body=GREEDY)
    jsonschema.validate(json.loads(m.content[0].text), PERSON)


@pytest.mark.parametrize("body,field", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"max_tokens": 4, "messages": []}, "messages"),
    ({"max_tokens": 4, "messages": [{"role": "system", "content": "hi"}]}, "messages[0].role"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, "messages[0].content[0].type"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "maybe"}},
     "tool_choice.type"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "container": "c"}, "container"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
      "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
      "output_config": {"format": {"type": "json_schema", "schema": {"type": "wat"}}}}, "output_config.format"),
])
def test_messages_bad_input_names_the_field(server, body, field):
    status, _, err = server.post("/v1/messages", {"model": "m", **body})
    assert status == 400, err
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error", err
    assert f"`{field}`" in err["error"]["message"], err
    assert server.request("GET", "/health")[0] == 200


def test_messages_errors_through_the_client(an, server):
    with pytest.raises(anthropic.BadRequestError) as e:
        an.messages.create(model="m", max_tokens=4, messages=[{"role": "system", "content": "hi"}])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].role" in e.value.body["error"]["message"]
    # other failures on these routes keep Anthropic's shape
    status, _, err = server.request("GET", "/v1/messages")
    assert status == 405 and err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    # too large: refused from the Content-Length, before the body is read
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 9437184\r\n\r\n{")
    reply = sock.recv(65536).decode()
    sock.close()
    assert reply.startswith("HTTP/1.1 413"), reply
    err = json.loads(reply.split("\r\n\r\n", 1)[1])
    assert err["type"] == "error" and err["error"]["type"] == "request_too_large"


# ---------------------------------------------------------------- keys and reasoning


def test_keys_bearer_or_x_api_key(thinker):
    good = anthropic.Anthropic(base_url=f"http://127.0.0.1:{thinker.port}", api_key=KEY)
    m = good.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert m.usage.output_tokens <= 2
    bad = anthropic.Anthropic(base_url=f"http://127.0.0.1:{thinker.port}", api_key="wrong")
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{thinker.port}/v1", api_key="wrong").responses.create(
            model="m", input="hi", max_output_tokens=2)
    ok = openai.OpenAI(base_url=f"http://127.0.0.1:{thinker.port}/v1", api_key=KEY)
    assert ok.responses.create(model="m", input="hi", max_output_tokens=2).usage.output_tokens <= 2


def test_reasoning_split_the_same_in_every_api(thinker):
    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{thinker.port}/v1", api_key=KEY)
    an = anthropic.Anthropic(base_url=f"http://127.0.0.1:{thinker.port}", api_key=KEY)
    q = "Is the sky blue?"
    c = chat(oa, [{"role": "user", "content": q}], max_tokens=80, **GREEDY, extra_body={"regex": THINK})
    msg = c.choices[0].message
    reasoning, content = msg.reasoning_content, msg.content
    assert reasoning and reasoning.strip() and "<think>" not in reasoning and "</think>" not in reasoning
    assert content and "</think>" not in content
    assert c.usage.completion_tokens_details.reasoning_tokens > 0
    # streamed: reasoning_content deltas first, then content deltas
    chunks = list(chat(oa, [{"role": "user", "content": q}], max_tokens=80, stream=True, **GREEDY,
                       extra_body={"regex": THINK}))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    streamed_r = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    streamed_c = "".join(d.content or "" for d in deltas)
    assert (streamed_r, streamed_c) == (reasoning, content)
    # Responses: a reasoning item, then the message
    r = oa.responses.create(model="m", input=q, max_output_tokens=80, extra_body={"regex": THINK, **GREEDY})
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == reasoning and r.output_text == content
    assert r.usage.output_tokens_details.reasoning_tokens == c.usage.completion_tokens_details.reasoning_tokens
    events = list(oa.responses.create(model="m", input=q, max_output_tokens=80, stream=True,
                                      extra_body={"regex": THINK, **GREEDY}))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == reasoning
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == content
    # Messages: a thinking block, then the text
    m = an.messages.create(model="m", max_tokens=80, messages=[{"role": "user", "content": q}],
                           thinking={"type": "enabled", "budget_tokens": 1024},
                           extra_body={"regex": THINK, **GREEDY})
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == reasoning and m.content[1].text == content
    with an.messages.stream(model="m", max_tokens=80, messages=[{"role": "user", "content": q}],
                            extra_body={"regex": THINK, **GREEDY}) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == reasoning and final.content[1].text == content
    # earlier thinking sent back is not shown to the model again: same prompt as without it
    n1 = an.messages.count_tokens(model="m", messages=[
        {"role": "user", "content": q}, {"role": "assistant", "content": [
            {"type": "thinking", "thinking": reasoning, "signature": ""}, {"type": "text", "text": content}]},
        {"role": "user", "content": "Why?"}])
    n2 = an.messages.count_tokens(model="m", messages=[
        {"role": "user", "content": q}, {"role": "assistant", "content": content},
        {"role": "user", "content": "Why?"}])
    assert n1.input_tokens == n2.input_tokens


def test_without_reasoning_parser_thinking_stays_in_the_answer(oa, an):
    q = [{"role": "user", "content": "Is the sky blue?"}]
    c = chat(oa, q, max_tokens=80, **GREEDY, extra_body={"regex": THINK})
    msg = c.choices[0].message
    assert msg.content.startswith("<think>") and getattr(msg, "reasoning_content", None) is None
    r = oa.responses.create(model="m", input=q[0]["content"], max_output_tokens=80,
                            extra_body={"regex": THINK, **GREEDY})
    assert [o.type for o in r.output] == ["message"] and r.output_text == msg.content
    m = an.messages.create(model="m", max_tokens=80, messages=q, extra_body={"regex": THINK, **GREEDY})
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == msg.content
