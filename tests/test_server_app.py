"""The server app in process (FastAPI's TestClient) over a scripted model whose output is chosen by the test:
reasoning split, tool calls, template kwargs, loading and busy answers."""

import json

import pytest
from fastapi.testclient import TestClient

from krasis.server import create_app
from krasis.synthetic import write_tokenizer
from krasis.tokenizer import Tokenizer

MODEL = "scripted"
USER = [{"role": "user", "content": "Hi"}]


class ScriptedLLM:
    """Stands in for krasis.LLM: yields the tokens of ``output`` (then EOS) whatever the prompt."""

    def __init__(self, directory):
        self.model_path = directory
        self.tokenizer = Tokenizer(directory)
        self.eos_token_ids = {self.tokenizer.token_to_id("<|im_end|>")}
        self.max_context = 512
        self.last_cached_tokens = 0
        self.output = ""
        self.calls = []

    def stream(self, token_ids, max_new_tokens, reuse_prefix=False, **sampling):
        self.calls.append({"prompt": list(token_ids), "max_new_tokens": max_new_tokens, **sampling})
        script = self.tokenizer.encode(self.output, add_special_tokens=False) + sorted(self.eos_token_ids)
        yield from script[:max_new_tokens]


@pytest.fixture
def llm(tmp_path):
    write_tokenizer(tmp_path, 320)
    return ScriptedLLM(tmp_path)


@pytest.fixture
def client(llm):
    with TestClient(create_app(llm, model_name=MODEL)) as c:
        yield c


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **body})


def stream_chunks(client, **body):
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": MODEL, "messages": USER, "stream": True, **body}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_think_block_goes_to_reasoning_content(client, llm):
    llm.output = "<think>\nplan it</think>\n\nThe answer."
    message = chat(client).json()["choices"][0]["message"]
    assert message["reasoning_content"] == "\nplan it"
    assert message["content"] == "The answer."


def test_streamed_think_block_arrives_as_reasoning_deltas(client, llm):
    llm.output = "<think>plan it</think>\n\nThe answer."
    chunks = stream_chunks(client)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "plan it"
    assert "".join(d.get("content", "") for d in deltas) == "The answer."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_template_kwargs_reach_the_template(client, llm):
    llm.output = "ok"
    chat(client, chat_template_kwargs={"enable_thinking": False})
    assert llm.tokenizer.decode(llm.calls[-1]["prompt"], skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tool_call_output_becomes_tool_calls_with_finish_reason_tool_calls(client, llm):
    llm.output = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    choice = chat(client, tools=tools).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


def test_streamed_tool_call_arrives_as_a_tool_calls_delta(client, llm):
    llm.output = 'Checking.<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    chunks = stream_chunks(client, tools=tools)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") or "" for d in deltas) == "Checking."
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["function"]["name"] == "now" and calls[0]["id"].startswith("call_")
    assert {c["index"] for c in calls} == {0}
    assert "".join(c["function"]["arguments"] for c in calls) == "{}"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_call_drafted_inside_the_think_block_stays_reasoning(client, llm):
    draft = '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    llm.output = f"<think>maybe {draft}</think>\n\nNo call needed."
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    choice = chat(client, tools=tools).json()["choices"][0]
    assert choice["message"]["reasoning_content"] == f"maybe {draft}"
    assert choice["message"]["content"] == "No call needed." and "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "stop"


def test_malformed_tool_call_stays_content_with_finish_reason_stop(client, llm):
    llm.output = '<tool_call>{"name": "now", "arguments": </tool_call>'
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    choice = chat(client, tools=tools).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == llm.output
    assert "tool_calls" not in choice["message"]


def test_tool_call_text_without_tools_in_the_request_is_plain_content(client, llm):
    llm.output = '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    choice = chat(client).json()["choices"][0]
    assert choice["message"]["content"] == llm.output and choice["finish_reason"] == "stop"


def test_sampling_fields_reach_the_model(client, llm):
    llm.output = "ok"
    chat(client, temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, presence_penalty=0.5, frequency_penalty=0.25,
         seed=3, max_completion_tokens=9)
    assert llm.calls[-1] == {**llm.calls[-1], "max_new_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": 7,
                             "min_p": 0.1, "presence_penalty": 0.5, "frequency_penalty": 0.25, "seed": 3}


def test_anthropic_sampling_fields_reach_the_model(client, llm):
    llm.output = "ok"
    r = client.post("/v1/messages", json={"model": MODEL, "messages": USER, "max_tokens": 9, "temperature": 0.5,
                                          "top_p": 0.9, "top_k": 7})
    assert r.status_code == 200 and r.json()["content"] == [{"type": "text", "text": "ok"}]
    assert llm.calls[-1] == {**llm.calls[-1], "max_new_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": 7}


def test_health_and_requests_answer_503_while_the_model_loads(llm):
    app = create_app(model_name=MODEL)
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.headers["retry-after"]
        r = chat(c)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        app.state.krasis.attach(llm)
        assert c.get("/health").json() == {"status": "ok"}


def test_full_queue_answers_503_with_retry_after(llm):
    with TestClient(create_app(llm, model_name=MODEL, max_queue=0)) as c:
        r = chat(c)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"


def test_metrics_count_requests_and_tokens(client, llm):
    llm.output = "abc"
    chat(client)
    text = client.get("/metrics").text
    assert "krasis_requests_total 1" in text
    assert "krasis_generated_tokens_total 4" in text  # three byte tokens and EOS
    assert "krasis_queue_depth 0" in text


class CountingLLM(ScriptedLLM):
    """A scripted model with the GPU engine's counters: each request makes 10 routed-expert calls in decode, 4 from
    the hot cache, and prefetches 6 experts, 3 of which its routing then picks."""

    def __init__(self, directory):
        super().__init__(directory)
        self.counters = dict.fromkeys(("routed_calls", "routed_calls_on_gpu", "routed_calls_streamed",
                                       "prefetched_experts", "routed_calls_prefetched"), 0)

    def engine_counters(self):
        return dict(self.counters)

    def stream(self, token_ids, max_new_tokens, reuse_prefix=False, **sampling):
        for key, n in (("routed_calls", 10), ("routed_calls_on_gpu", 4), ("prefetched_experts", 6),
                       ("routed_calls_prefetched", 3)):
            self.counters[key] += n
        yield from super().stream(token_ids, max_new_tokens, reuse_prefix, **sampling)


def test_metrics_count_the_engines_routed_calls_and_prefetch_hits(tmp_path):
    write_tokenizer(tmp_path, 320)
    llm = CountingLLM(tmp_path)
    llm.output = "ok"
    with TestClient(create_app(llm, model_name=MODEL)) as c:
        chat(c)
        chat(c)
        text = c.get("/metrics").text
    assert "krasis_routed_expert_calls_total 20\n" in text
    assert "krasis_routed_expert_calls_hot_cache_total 8\n" in text
    assert "krasis_prefetched_experts_total 12\n" in text
    assert "krasis_routed_expert_calls_prefetched_total 6\n" in text
    assert "krasis_last_request_hot_cache_share 0.4\n" in text


def test_null_sampling_fields_mean_their_defaults(client, llm):
    llm.output = "ok"
    r = chat(client, temperature=None, top_p=None, stop=None, max_tokens=None, seed=None)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
    assert llm.calls[-1]["temperature"] == 1.0 and llm.calls[-1]["top_p"] == 1.0


def test_tools_reach_the_chat_template(tmp_path):
    from krasis.synthetic import CHATML_TEMPLATE

    write_tokenizer(tmp_path, 320, chat_template="{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
                    + CHATML_TEMPLATE)
    llm = ScriptedLLM(tmp_path)
    llm.output = "ok"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with TestClient(create_app(llm, model_name=MODEL)) as c:
        chat(c, tools=tools)
        with_tools = llm.tokenizer.decode(llm.calls[-1]["prompt"], skip_special_tokens=False)
        chat(c, tools=tools, tool_choice="none")
        without = llm.tokenizer.decode(llm.calls[-1]["prompt"], skip_special_tokens=False)
    assert with_tools.startswith("TOOLS ") and '"get_weather"' in with_tools
    assert "TOOLS" not in without


def test_timing_is_off_until_turned_on_then_gives_the_last_requests_stages(client, llm):
    llm.output = "abc"
    chat(client)
    assert client.get("/v1/timing").json() == {"enabled": False, "last": None}
    assert client.post("/v1/timing", json={"enabled": True}).json()["enabled"] is True
    chat(client)
    last = client.get("/v1/timing").json()["last"]
    assert last["generated_tokens"] == 4 and last["prompt_tokens"] > 0 and not last["cancelled"]
    assert {"queue_seconds", "prefill_seconds", "decode_seconds", "decode_tokens_per_second"} <= set(last)
    assert client.post("/v1/timing", json={"enabled": "maybe"}).status_code == 400
    assert client.post("/v1/timing", json={"enabled": False}).json() == {"enabled": False, "last": None}
