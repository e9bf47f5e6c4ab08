"""Structured output and tool calling through the real server with the official OpenAI client:
json_schema outputs validate (the `jsonschema` package), regex outputs fullmatch, forced tool
calls carry arguments that validate, streamed and non-streamed give the same calls for a seed,
a Hermes-style call is parsed from the model's own text, bad constraints and tools are 400s
naming the field, and constrained and plain requests batched together give what each gives
alone."""

import json
import re
import threading

import jsonschema
import openai
import pytest


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused")


def chat(client, content, **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], **kw)


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "email": {"type": "string", "maxLength": 40}},
    "required": ["name", "age"], "additionalProperties": False}
BOOK = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "year": {"type": "integer", "minimum": 1400, "maximum": 2030},
    "genres": {"type": "array", "minItems": 1, "maxItems": 3,
               "items": {"enum": ["fiction", "science", "history", "poetry"]}},
    "author": {"type": "object", "properties": {"first": {"type": "string", "maxLength": 20},
                                                "last": {"type": "string", "maxLength": 20}},
               "required": ["first", "last"], "additionalProperties": False}},
    "required": ["title", "year", "genres", "author"], "additionalProperties": False}
RECIPE = {"type": "object", "properties": {
    "dish": {"type": "string", "maxLength": 30},
    "servings": {"type": "integer", "minimum": 1, "maximum": 12},
    "vegetarian": {"type": "boolean"},
    "steps": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "string", "maxLength": 40}}},
    "required": ["dish", "servings", "vegetarian", "steps"], "additionalProperties": False}
CITY = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30},
    "population_millions": {"type": "integer", "minimum": 0, "maximum": 40},
    "continent": {"enum": ["Africa", "Asia", "Europe", "America", "Oceania"]},
    "landmarks": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 30}}},
    "required": ["city", "continent", "landmarks"], "additionalProperties": False}
SCHEMAS = [
    ("Invent a person and describe them as JSON.", PERSON),
    ("Describe a famous book as JSON.", BOOK),
    ("Give me a simple recipe as JSON.", RECIPE),
    ("Describe a big city as JSON.", CITY),
    ("Tell me about yourself in JSON.", PERSON),
]


def test_fifty_json_schema_generations_validate(client):
    for i in range(50):
        prompt, schema = SCHEMAS[i % len(SCHEMAS)]
        r = chat(client, prompt, temperature=0.7, seed=i, max_tokens=200,
                 response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", (i, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_and_completions_response_format(client):
    r = chat(client, "List two colors as a JSON object.", temperature=0, max_tokens=60,
             response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # the client has no response_format for completions: it goes as an extra field
    r = client.completions.create(model="m", prompt="A person as JSON:", max_tokens=80, temperature=0.5, seed=3,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "p", "schema": PERSON}}})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


@pytest.mark.parametrize("pattern", [
    r"[0-9]{4}-(0[1-9]|1[0-2])-[0-3][0-9]",
    r"(yes|no|maybe)",
    r"[A-Z][a-z]{2,8} [A-Z][a-z]{2,8}",
    r"\(\d{3}\) \d{3}-\d{4}",
])
def test_regex_outputs_fullmatch(server, client, pattern):
    for seed in range(3):
        status, _, r = server.post("/generate", {"text": "Answer:", "sampling_params": {
            "max_new_tokens": 30, "temperature": 0.9, "seed": seed, "regex": pattern}})
        assert status == 200, r
        assert re.fullmatch(pattern, r["text"]), (pattern, r["text"])
        assert r["meta_info"]["finish_reason"]["type"] == "stop"
    # SGLang's extension field on the OpenAI route
    r = chat(client, "Answer with a regex-shaped string.", max_tokens=30, temperature=0.9, seed=7,
             extra_body={"regex": pattern})
    assert re.fullmatch(pattern, r.choices[0].message.content)


def test_a_lark_grammar(server):
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]?/'
    status, _, r = server.post("/generate", {"text": "What is 6 times 7?", "sampling_params": {
        "max_new_tokens": 20, "temperature": 0, "ebnf": grammar}})
    assert status == 200, r
    assert re.fullmatch(r"The answer is [1-9][0-9]?\.", r["text"]), r["text"]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def check_calls(calls, names=None):
    assert calls, "no tool calls"
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        assert c.function.name in (names or SCHEMA_OF)
        jsonschema.validate(json.loads(c.function.arguments), SCHEMA_OF[c.function.name])


def streamed_calls(client, **kw):
    calls, finish = {}, None
    for ch in client.chat.completions.create(stream=True, **kw):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        for tc in d.tool_calls or []:
            e = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            e["id"] = tc.id or e["id"]
            if tc.function and tc.function.name:
                e["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                e["arguments"] += tc.function.arguments
        finish = ch.choices[0].finish_reason or finish
    return [calls[k] for k in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}},
                                         {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_validate_and_stream_the_same(client, tool_choice):
    # parallel calls are at most 8: room for all of them
    kw = dict(model="m", messages=[{"role": "user", "content": "What is the weather in Oslo, and what is 2 plus 3?"}],
              tools=TOOLS, tool_choice=tool_choice, max_tokens=240, temperature=0.8, seed=11,
              parallel_tool_calls=tool_choice == "required")
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    names = None if tool_choice == "required" else [tool_choice["function"]["name"]]
    check_calls(choice.message.tool_calls, names)
    assert len(choice.message.tool_calls) == 1 if names else 1 <= len(choice.message.tool_calls) <= 8
    streamed, finish = streamed_calls(client, **kw)
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert all(c["id"] and c["id"].startswith("call_") for c in streamed)


def test_auto_parses_a_hermes_call_from_the_models_own_text(client):
    # the model is made to write a Hermes-style call (a regex on its text), and "auto" reads it
    call = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,10}", "unit": "celsius"\}\}\n</tool_call>'
    kw = dict(model="m", messages=[{"role": "user", "content": "What's the weather like in Rome?"}],
              tools=TOOLS, max_tokens=60, temperature=0, extra_body={"regex": call})
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content is None
    check_calls(choice.message.tool_calls, ["get_weather"])
    streamed, finish = streamed_calls(client, **kw)
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    # without a call in the text, the answer stays content
    r = chat(client, "Say hello.", tools=TOOLS, max_tokens=16, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content


def test_tool_history_reaches_the_model(client):
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    r = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=30, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def bad(server, path, body):
    status, _, r = server.post(path, body)
    assert status == 400, r
    return r["error"]


@pytest.mark.parametrize("params, field", [
    ({"json_schema": '{"type": '}, "sampling_params.json_schema"),
    ({"json_schema": '{"type": "objekt"}'}, "json_schema"),
    ({"regex": "(unclosed"}, "regex"),
    ({"ebnf": "start: missing_rule"}, "ebnf"),
    ({"regex": "a", "ebnf": 'start: "a"'}, "ebnf"),
    ({"regex": "x" * (300 * 1024)}, "regex"),
    ({"structural_tag": "{}"}, "sampling_params.structural_tag"),
])
def test_bad_constraints_are_400_naming_the_field(server, params, field):
    err = bad(server, "/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 4, **params}})
    assert err["param"] in (field, field.split(".")[-1]), err
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "regex": "a"}, "regex"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "messages[0].tool_calls[0].function.name"),
])
def test_bad_chat_requests_are_400_naming_the_field(server, extra, field):
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}
    err = bad(server, "/v1/chat/completions", body)
    assert err["param"] == field, err


def test_a_constraint_built_to_explode_is_a_400_and_the_server_goes_on(server):
    # llguidance's lexer gives up on this regex (too many expressions): a clear 400, not a
    # stalled engine; the request's pages are freed and the next request is served
    status, _, r = server.post("/generate", {"text": "x", "sampling_params": {
        "max_new_tokens": 16, "regex": "(a|aa)*b{1000}{1000}"}})
    assert status == 400, r
    assert "too many" in r["error"]["message"] or "limit" in r["error"]["message"], r
    status, _, r = server.post("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
    assert status == 200


def test_mixed_constrained_and_plain_requests_batched_equal_alone(server):
    bodies = []
    for i in range(16):
        params = {"max_new_tokens": 40, "temperature": 0.8, "seed": i}
        if i % 3 == 0:
            params["json_schema"] = json.dumps(PERSON)
        elif i % 3 == 1:
            params["regex"] = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
        bodies.append({"text": f"Request {i}: write something.", "sampling_params": params})
    alone = [server.post("/generate", b)[2]["output_ids"] for b in bodies]
    together = [None] * len(bodies)

    def run(i):
        together[i] = server.post("/generate", bodies[i])[2]["output_ids"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
