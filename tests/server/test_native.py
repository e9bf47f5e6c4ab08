"""SGLang's native API and the info routes."""

from sglang_testing import cli_generate


def test_generate_single_and_batch(server):
    want = cli_generate("The capital of France is", 12)
    status, _, r = server.post("/generate", {"text": "The capital of France is",
                                             "sampling_params": {"max_new_tokens": 12, "temperature": 0}})
    assert status == 200
    assert r["text"] == want["text"] and r["output_ids"] == want["output_ids"]
    assert r["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert r["meta_info"]["prompt_tokens"] == 5
    # batch of token ids, per-prompt sampling params
    status, _, rs = server.post("/generate", {"input_ids": [want["prompt_ids"], [504, 3575]],
                                              "sampling_params": [{"max_new_tokens": 12, "temperature": 0},
                                                                  {"max_new_tokens": 3, "temperature": 0}]})
    assert status == 200 and len(rs) == 2
    assert rs[0]["output_ids"] == want["output_ids"]
    assert len(rs[1]["output_ids"]) == 3


def test_generate_stream_and_logprobs(server):
    body = {"text": "Hello, my name is", "sampling_params": {"max_new_tokens": 10, "temperature": 0}, "stream": True,
            "return_logprob": True, "top_logprobs_num": 2, "return_text_in_logprobs": True}
    events = list(server.stream("/generate", body))
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["meta_info"]["finish_reason"]["type"] == "length"
    status, _, full = server.post("/generate", {k: v for k, v in body.items() if k != "stream"})
    assert last["text"] == full["text"]
    lps = full["meta_info"]["output_token_logprobs"]
    assert len(lps) == 10 and all(lp[0] <= 0 and isinstance(lp[2], str) for lp in lps)
    assert all(len(t) == 2 for t in full["meta_info"]["output_top_logprobs"])


def test_prompt_logprobs_score_what_generation_produced(server):
    # greedy continuation with its logprobs, then the prompt + continuation scored without
    # generating: the scores of the continuation's tokens are the logprobs they were sampled with
    prompt = "The history of the printing press"
    status, _, gen = server.post("/generate", {"text": prompt, "return_logprob": True,
                                               "sampling_params": {"max_new_tokens": 6, "temperature": 0}})
    assert status == 200
    ids = cli_generate(prompt, 1)["prompt_ids"]
    status, _, scored = server.post("/generate", {
        "input_ids": ids + gen["output_ids"], "return_logprob": True, "logprob_start_len": len(ids),
        "top_logprobs_num": 1, "return_text_in_logprobs": True, "sampling_params": {"max_new_tokens": 0}})
    assert status == 200, scored
    meta = scored["meta_info"]
    assert scored["output_ids"] == [] and meta["finish_reason"]["type"] == "length"
    inp = meta["input_token_logprobs"]
    assert [t[1] for t in inp] == gen["output_ids"]
    for got, want in zip(inp, gen["meta_info"]["output_token_logprobs"]):
        assert abs(got[0] - want[0]) < 1e-3, (got, want)
        assert isinstance(got[2], str)
    # greedy: each continuation token was the most likely one
    assert [t[0][1] for t in meta["input_top_logprobs"]] == gen["output_ids"]
    # from position 0 the first token has no logprob; streaming carries the same numbers
    body = {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0, "stream": True,
            "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    events = list(server.stream("/generate", body))
    assert events[-1] == "[DONE]"
    first = events[0]["meta_info"]["input_token_logprobs"]
    assert [t[1] for t in first] == ids and first[0][0] is None
    assert all(t[0] < 0 for t in first[1:])
    # the prompt's logprobs come once, in the first event; later events carry only new tokens
    assert all("input_token_logprobs" not in e["meta_info"] for e in events[1:-1])
    assert sum(len(e["meta_info"]["output_token_logprobs"]) for e in events[:-1]) == 3


def test_tokenize_detokenize_and_info(server):
    status, _, r = server.post("/tokenize", {"prompt": "Hello world"})
    assert status == 200 and r["tokens"] == [19556, 905] and r["count"] == 2
    status, _, r = server.post("/detokenize", {"tokens": [19556, 905]})
    assert r["prompt"] == "Hello world"
    status, _, r = server.request("GET", "/get_model_info")
    assert r["served_model_name"] == "SmolLM2-135M-Instruct" and r["is_generation"]
    # admin routes need the admin key
    assert server.request("GET", "/get_server_info")[0] == 401
    status, _, r = server.request("GET", "/get_server_info", headers={"Authorization": "Bearer admin-secret"})
    assert status == 200 and r["kv_cache"]["capacity_tokens"] > 0
    # the CPU backend runs each step to its end (no overlap scheduler, no graphs)
    assert r["disable_overlap_schedule"] is True and r["cuda_graph_bs"] == []
    assert "admin-secret" not in str(r) and r["admin_api_key"] == "set (redacted)"
    status, _, r = server.request("GET", "/config", headers={"Authorization": "Bearer admin-secret"})
    assert status == 200 and r["page_size"] == 16


def test_radix_cache_hits(server):
    prefix = "You are a meticulous assistant. " * 20
    h = {"Authorization": "Bearer admin-secret"}
    hits = server.metric("sglang_cache_hits_total")
    _, _, a = server.post("/generate", {"text": prefix + "What is 2+2?", "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    _, _, b = server.post("/generate", {"text": prefix + "Name a color.", "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    assert b["meta_info"]["cached_tokens"] >= 96, b["meta_info"]  # ~120 shared tokens, whole pages of 16
    assert server.metric("sglang_cache_hits_total") >= hits + b["meta_info"]["cached_tokens"]
    # same output with the cache flushed (recomputed from scratch)
    assert server.post("/flush_cache", {}, headers=h)[0] == 200
    _, _, c = server.post("/generate", {"text": prefix + "Name a color.", "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    assert c["meta_info"]["cached_tokens"] == 0
    assert c["output_ids"] == b["output_ids"]
