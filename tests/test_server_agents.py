"""Agent sessions end to end: tiny checkpoints whose chat templates teach each tool-call format, served by a real
server whose answers are forced (the test-only ``--test-scripted-output``), driven by the official ``openai`` and
``anthropic`` clients: text, one call, two calls, a malformed call, forced calls, reasoning then a call, tool
results and reasoning sent back; streamed == whole; cached prompt tokens."""

import json
import shutil

import anthropic
import openai
import pytest
from server_process import start_server

from krasis.server.tool_calls import DS_CALL_BEGIN, DS_CALL_END, DS_CALLS_BEGIN, DS_CALLS_END, DS_SEP, detect_format

_TOOLS_BLOCK = ("{% if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
                "</tools><|im_end|>\n{% endif %}")
_CHATML_TURNS = (
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% elif m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% if m.get('reasoning_content') %}<think>\n{{ m['reasoning_content'] }}\n</think>\n\n{% endif %}"
    "{{ m['content'] }}{% for tc in m.get('tool_calls', []) %}CALL{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking %}<think>\n{% endif %}{% endif %}")  # thinking on: the template opens the think block
_CALLS = {
    "qwen3_json": "\n<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
                  "{{ tc.function.arguments | tojson }}}\n</tool_call>",
    "qwen3_xml": "\n<tool_call>\n<function={{ tc.function.name }}>\n{% for k, v in tc.function.arguments.items() %}"
                 "<parameter={{ k }}>\n{{ v if v is string else v | tojson }}\n</parameter>\n{% endfor %}"
                 "</function>\n</tool_call>",
    "glm": "\n<tool_call>{{ tc.function.name }}\n{% for k, v in tc.function.arguments.items() %}<arg_key>{{ k }}"
           "</arg_key>\n<arg_value>{{ v if v is string else v | tojson }}</arg_value>\n{% endfor %}</tool_call>",
    "deepseek": DS_CALLS_BEGIN + DS_CALL_BEGIN + "function" + DS_SEP + "{{ tc.function.name }}\n```json\n"
                "{{ tc.function.arguments }}\n```" + DS_CALL_END + DS_CALLS_END,
}
TEMPLATES = {name: _TOOLS_BLOCK + _CHATML_TURNS.replace("CALL", call) for name, call in _CALLS.items()}

WEATHER = {"name": "get_weather", "description": "weather forecast", "parameters": {
    "type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "opts": {"type": "object", "properties": {"hours": {"type": "array", "items": {"type": "integer"}},
                                                   "unit": {"type": "string"}}}}}}
NOW = {"name": "now", "description": "the time", "parameters": {"type": "object", "properties": {}}}
OPENAI_TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": NOW}]
ANTHROPIC_TOOLS = [{"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
                   for t in (WEATHER, NOW)]
ARGS = {"city": "Oslo", "days": 3, "metric": True, "opts": {"hours": [6, 18], "unit": "C"}}


def call_text(fmt: str, name: str, args: dict) -> str:
    """A call as a model of ``fmt`` writes it."""
    def value(v):
        return v if isinstance(v, str) else json.dumps(v)

    if fmt == "qwen3_json":
        return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"
    if fmt == "qwen3_xml":
        params = "".join(f"<parameter={k}>\n{value(v)}\n</parameter>\n" for k, v in args.items())
        return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"
    if fmt == "glm":
        params = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{value(v)}</arg_value>\n" for k, v in args.items())
        return f"<tool_call>{name}\n{params}</tool_call>"
    return DS_CALL_BEGIN + f"function{DS_SEP}{name}\n```json\n{json.dumps(args)}\n```" + DS_CALL_END


def calls_text(fmt, *calls):
    if fmt == "deepseek":
        return DS_CALLS_BEGIN + "".join(call_text(fmt, n, a) for n, a in calls) + DS_CALLS_END
    return "\n".join(call_text(fmt, n, a) for n, a in calls)


def after_opening(fmt, forced: str | None, name: str, args: dict) -> str:
    """What the model writes of a call when the server put the opening of a forced call (``forced``: a function's
    name, or None for tool_choice required) in the prompt: the rest of the call."""
    opening = detect_format(TEMPLATES[fmt]).opening(forced)
    full = calls_text(fmt, (name, args))
    assert full.startswith(opening)
    return full[len(opening):]


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


QUESTION = [{"role": "user", "content": "Weather in Oslo?"}]
THOUGHT = "Oslo: ask get_weather."
# where the think block opens: in the model's answer (it writes <think>), or in the prompt (thinking turned on:
# the template ends the prompt with <think>); either way the model's reasoning is THOUGHT
THINK_OPENS = {"in_the_answer": (False, f"<think>{THOUGHT}</think>\n\n"),
               "in_the_prompt": (True, f"{THOUGHT}</think>\n\n")}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def agent_server(request, tiny_checkpoint, tmp_path_factory):
    fmt = request.param
    _, base = tiny_checkpoint("qwen3_moe_mixed")
    path = tmp_path_factory.mktemp(f"agent-{fmt}") / "model"
    shutil.copytree(base, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATES[fmt]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    model_config = json.loads((path / "config.json").read_text())
    model_config["max_position_embeddings"] = 4096  # room for the tool definitions in byte-level tokens
    (path / "config.json").write_text(json.dumps(model_config))
    script = path.parent / "script.txt"
    server = start_server(path, tmp_path_factory.mktemp("home"), "--test-scripted-output", str(script))
    server.fmt, server.script = fmt, script
    yield server
    server.stop()


@pytest.fixture
def openai_client(agent_server):
    with openai.OpenAI(base_url=f"{agent_server.url}/v1", api_key="x", timeout=120, max_retries=0) as client:
        yield client


@pytest.fixture
def anthropic_client(agent_server):
    with anthropic.Anthropic(base_url=agent_server.url, api_key="x", timeout=120, max_retries=0) as client:
        yield client


def openai_turn(client, server, messages, script, **kw):
    """The same turn asked whole and streamed: (whole message, finish reason, usage), after checking the streamed
    deltas (content, reasoning, calls) add up to the whole answer and that call arguments came in several deltas."""
    server.script.write_text(script)
    args = dict(model=server.model, messages=messages, tools=OPENAI_TOOLS, max_tokens=400, temperature=0, **kw)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True))
    content, reasoning, calls, arg_deltas = "", "", {}, {}
    for c in chunks:
        d = c.choices[0].delta
        content += d.content or ""
        reasoning += getattr(d, "reasoning_content", None) or ""  # not in the SDK's types: an extra field
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
            arg_deltas[tc.index] = arg_deltas.get(tc.index, 0) + bool(tc.function and tc.function.arguments)
    msg = whole.choices[0].message
    assert content == (msg.content or "")
    assert reasoning == (getattr(msg, "reasoning_content", None) or "")
    assert [calls[i] for i in sorted(calls)] == [{"name": c.function.name, "arguments": c.function.arguments}
                                                 for c in msg.tool_calls or []]
    for i, call in calls.items():
        if json.loads(call["arguments"]):
            assert arg_deltas[i] > 1, "a call's arguments should stream in several deltas"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    return msg, whole.choices[0].finish_reason, whole.usage


def test_openai_agent_session(agent_server, openai_client):
    fmt, client = agent_server.fmt, openai_client
    messages = [{"role": "user", "content": "Weather?"}]
    msg, finish, usage1 = openai_turn(client, agent_server, messages, "Let me see.")
    assert msg.content == "Let me see." and not msg.tool_calls and finish == "stop"

    messages += [{"role": "assistant", "content": msg.content}, {"role": "user", "content": "In Oslo."}]
    msg, finish, usage2 = openai_turn(client, agent_server, messages, calls_text(fmt, ("get_weather", ARGS)))
    assert finish == "tool_calls" and msg.content is None
    (call,) = msg.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGS
    assert usage2.prompt_tokens_details.cached_tokens >= usage1.prompt_tokens

    messages += [msg.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    two = "Both:\n" + calls_text(fmt, ("now", {}), ("get_weather", {"city": "Bergen", "days": 1}))
    msg, finish, _ = openai_turn(client, agent_server, messages, two)
    assert finish == "tool_calls" and msg.content == "Both:"
    assert [c.function.name for c in msg.tool_calls] == ["now", "get_weather"]
    assert json.loads(msg.tool_calls[1].function.arguments) == {"city": "Bergen", "days": 1}

    messages += [msg.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "ok"} for c in msg.tool_calls]
    bad = "Oops " + calls_text(fmt, ("launch_rockets", {"n": 1}))  # unknown tool
    msg, finish, _ = openai_turn(client, agent_server, messages, bad)
    assert finish == "stop" and msg.content == bad and not msg.tool_calls

    msg, finish, _ = openai_turn(client, agent_server, messages, "only the first", tool_choice="none")
    assert msg.content == "only the first" and finish == "stop"
    one = calls_text(fmt, ("now", {}), ("now", {}))
    msg, finish, _ = openai_turn(client, agent_server, messages, one, parallel_tool_calls=False)
    assert finish == "tool_calls" and len(msg.tool_calls) == 1


@pytest.mark.parametrize("think_opens", sorted(THINK_OPENS))
def test_openai_reasoning_comes_back_as_reasoning_content_beside_the_tool_call(agent_server, openai_client,
                                                                               think_opens):
    thinking_on, reasoning = THINK_OPENS[think_opens]
    script = reasoning + calls_text(agent_server.fmt, ("get_weather", ARGS))
    msg, finish, _ = openai_turn(openai_client, agent_server, QUESTION, script,
                                 extra_body={"chat_template_kwargs": {"enable_thinking": thinking_on}})
    assert msg.reasoning_content == THOUGHT and msg.content is None
    assert calls_of(msg) == [("get_weather", ARGS)] and finish == "tool_calls"


def test_openai_tool_choice_required_makes_the_answer_a_call(agent_server, openai_client):
    script = after_opening(agent_server.fmt, None, "now", {})
    msg, finish, _ = openai_turn(openai_client, agent_server, QUESTION, script, tool_choice="required")
    assert calls_of(msg) == [("now", {})] and finish == "tool_calls"


def test_openai_named_tool_choice_makes_the_answer_a_call_of_that_function(agent_server, openai_client):
    script = after_opening(agent_server.fmt, "get_weather", "get_weather", ARGS)
    msg, finish, _ = openai_turn(openai_client, agent_server, QUESTION, script,
                                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert calls_of(msg) == [("get_weather", ARGS)] and finish == "tool_calls"


def test_openai_tool_results_go_back_through_the_template(agent_server, openai_client):
    def prompt_tokens(result: str) -> int:
        call = {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}
        messages = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": result}]
        return openai_turn(openai_client, agent_server, messages, "ok")[2].prompt_tokens

    assert prompt_tokens("sunny and warm") - prompt_tokens("sunny") == len(" and warm")  # a token a byte


def test_openai_reasoning_content_goes_back_through_the_template(agent_server, openai_client):
    def prompt_tokens(reasoning: str) -> int:
        messages = [*QUESTION, {"role": "assistant", "content": "Sunny.", "reasoning_content": reasoning},
                    {"role": "user", "content": "Thanks."}]
        return openai_turn(openai_client, agent_server, messages, "ok")[2].prompt_tokens

    assert prompt_tokens(THOUGHT + " Then answer.") - prompt_tokens(THOUGHT) == len(" Then answer.")


def anthropic_turn(client, server, script, **kw):
    server.script.write_text(script)
    args = dict(model=server.model, max_tokens=400, tools=ANTHROPIC_TOOLS, **kw)
    whole = client.messages.create(**args)
    with client.messages.stream(**args) as stream:
        kinds = [e.type for e in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    def blocks(message):
        return [{k: v for k, v in b.model_dump().items() if k != "id"} for b in message.content]

    assert blocks(streamed) == blocks(whole)
    assert streamed.stop_reason == whole.stop_reason
    return whole


def test_anthropic_agent_session(agent_server, anthropic_client):
    fmt, client = agent_server.fmt, anthropic_client
    messages = list(QUESTION)
    first = anthropic_turn(client, agent_server, "Checking.\n" + calls_text(fmt, ("get_weather", ARGS)),
                           system="Be brief.", messages=messages)
    assert first.stop_reason == "tool_use"
    text, use = first.content
    assert text.type == "text" and text.text == "Checking."
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == ARGS
    count = client.messages.count_tokens(model=agent_server.model, system="Be brief.", messages=messages,
                                         tools=ANTHROPIC_TOOLS)
    assert count.input_tokens == first.usage.input_tokens + first.usage.cache_read_input_tokens

    messages += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    second = anthropic_turn(client, agent_server, "It is sunny.", system="Be brief.", messages=messages,
                            stop_sequences=["sunny"])
    assert second.stop_reason == "stop_sequence" and second.stop_sequence == "sunny"
    assert [b.text for b in second.content] == ["It is "]
    assert second.usage.cache_read_input_tokens >= count.input_tokens

    # the server puts the call's opening in the prompt: the model goes on from there
    forced = anthropic_turn(client, agent_server, after_opening(fmt, "now", "now", {}), messages=messages,
                            tool_choice={"type": "tool", "name": "now"})
    assert [b.name for b in forced.content if b.type == "tool_use"] == ["now"]


def test_anthropic_two_calls_come_back_as_two_tool_use_blocks(agent_server, anthropic_client):
    two = "Both:\n" + calls_text(agent_server.fmt, ("now", {}), ("get_weather", {"city": "Bergen", "days": 1}))
    answer = anthropic_turn(anthropic_client, agent_server, two, messages=QUESTION)
    text, *uses = answer.content
    assert text.type == "text" and text.text == "Both:" and answer.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in uses] == [("tool_use", "now", {}),
                                                         ("tool_use", "get_weather", {"city": "Bergen", "days": 1})]


def test_anthropic_disable_parallel_tool_use_keeps_only_the_first_call(agent_server, anthropic_client):
    two = calls_text(agent_server.fmt, ("now", {}), ("get_weather", {"city": "Bergen"}))
    answer = anthropic_turn(anthropic_client, agent_server, two, messages=QUESTION,
                            tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [(b.type, b.name) for b in answer.content] == [("tool_use", "now")] and answer.stop_reason == "tool_use"


def test_anthropic_malformed_call_comes_back_as_text_with_stop_reason_end_turn(agent_server, anthropic_client):
    bad = "Oops " + calls_text(agent_server.fmt, ("launch_rockets", {"n": 1}))  # unknown tool
    answer = anthropic_turn(anthropic_client, agent_server, bad, messages=QUESTION)
    assert [(b.type, b.text) for b in answer.content] == [("text", bad)] and answer.stop_reason == "end_turn"


@pytest.mark.parametrize("think_opens", sorted(THINK_OPENS))
def test_anthropic_reasoning_comes_back_as_a_thinking_block_before_the_tool_use_block(agent_server, anthropic_client,
                                                                                      think_opens):
    thinking_on, reasoning = THINK_OPENS[think_opens]
    thinking = {"type": "enabled", "budget_tokens": 200} if thinking_on else {"type": "disabled"}
    answer = anthropic_turn(anthropic_client, agent_server, reasoning + calls_text(agent_server.fmt,
                                                                                   ("get_weather", ARGS)),
                            messages=QUESTION, thinking=thinking)
    assert [b.type for b in answer.content] == ["thinking", "tool_use"] and answer.stop_reason == "tool_use"
    assert answer.content[0].thinking == THOUGHT
    assert (answer.content[1].name, answer.content[1].input) == ("get_weather", ARGS)


def _outline(event) -> tuple:
    """A raw Anthropic stream event without its text: type, block index, block or delta type, stop reason."""
    if event.type == "content_block_start":
        return event.type, event.index, event.content_block.type
    if event.type == "content_block_delta":
        return event.type, event.index, event.delta.type
    if event.type == "content_block_stop":
        return event.type, event.index
    if event.type == "message_delta":
        return event.type, event.delta.stop_reason
    return (event.type,)


def test_anthropic_stream_sends_the_thinking_block_then_the_tool_use_block(agent_server, anthropic_client):
    agent_server.script.write_text(THINK_OPENS["in_the_answer"][1] + calls_text(agent_server.fmt, ("now", {})))
    events = anthropic_client.messages.create(model=agent_server.model, max_tokens=400, tools=ANTHROPIC_TOOLS,
                                              messages=QUESTION, stream=True)
    outline = []
    for step in map(_outline, events):
        if not outline or outline[-1] != step:  # a run of deltas of one block counts once
            outline.append(step)
    assert outline == [("message_start",),
                       ("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
                       ("content_block_stop", 0),
                       ("content_block_start", 1, "tool_use"), ("content_block_delta", 1, "input_json_delta"),
                       ("content_block_stop", 1),
                       ("message_delta", "tool_use"), ("message_stop",)]


def test_anthropic_tool_results_go_back_through_the_template(agent_server, anthropic_client):
    def input_tokens(result: str) -> int:
        use = {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}
        messages = [*QUESTION, {"role": "assistant", "content": [use]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                  "content": result}]}]
        return anthropic_client.messages.count_tokens(model=agent_server.model, messages=messages,
                                                      tools=ANTHROPIC_TOOLS).input_tokens

    assert input_tokens("sunny and warm") - input_tokens("sunny") == len(" and warm")  # a token a byte


def test_anthropic_thinking_blocks_go_back_through_the_template(agent_server, anthropic_client):
    def input_tokens(thought: str) -> int:
        blocks = [{"type": "thinking", "thinking": thought, "signature": ""}, {"type": "text", "text": "Sunny."}]
        messages = [*QUESTION, {"role": "assistant", "content": blocks}, {"role": "user", "content": "Thanks."}]
        return anthropic_client.messages.count_tokens(model=agent_server.model, messages=messages).input_tokens

    assert input_tokens(THOUGHT + " Then answer.") - input_tokens(THOUGHT) == len(" Then answer.")


def test_anthropic_errors_have_anthropic_shape(agent_server, anthropic_client):
    client = anthropic_client
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-none", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=agent_server.model, max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "invalid_request_error"
