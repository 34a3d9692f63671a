"""A real server process driven by the official ``openai`` client: chat and completions, streaming and not,
usage, prefix reuse, stop strings, seeds, several clients at once, a client that drops mid-stream."""

import concurrent.futures
import re
import time

import httpx
import openai
import pytest

import krasis

HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(krasis_server):
    with openai.OpenAI(base_url=f"{krasis_server.url}/v1", api_key="unused", timeout=60, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The same model in this process: what greedy decoding must give."""
    llm = krasis.LLM(tiny_checkpoint("qwen3_moe_mixed")[1], dtype="float32")
    keep = {llm.tokenizer.token_to_id(t) for t in ("<think>", "</think>", "<tool_call>", "</tool_call>")}
    drop = (llm.tokenizer.special_token_ids() | llm.eos_token_ids) - keep

    def greedy(messages, max_tokens):
        ids = llm.tokenizer.apply_chat_template(messages, tokenize=True)
        out = llm.generate(ids, max_new_tokens=max_tokens)
        assert not set(out) & keep, "the test prompt should not produce think or tool tags"
        return llm.tokenizer.decode([t for t in out if t not in drop], skip_special_tokens=False), ids, out

    greedy.eos_token_ids = llm.eos_token_ids
    return greedy


def chat(client, model, messages=HELLO, **kw):
    return client.chat.completions.create(model=model, messages=messages, **kw)


def test_models_lists_the_served_model(client, krasis_server):
    assert [m.id for m in client.models.list().data] == [krasis_server.model]


def test_health_says_ok_when_ready(krasis_server):
    r = httpx.get(f"{krasis_server.url}/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_chat_completion_gives_the_greedy_answer_and_usage(client, krasis_server, reference):
    text, ids, out = reference(HELLO, 8)
    r = chat(client, krasis_server.model, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.model == krasis_server.model
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out)
    assert r.usage.total_tokens == len(ids) + len(out)
    assert r.choices[0].finish_reason == ("stop" if out[-1] in reference.eos_token_ids else "length")


def test_max_tokens_reached_gives_finish_reason_length(client, krasis_server, reference):
    _, _, out = reference(HELLO, 3)
    r = chat(client, krasis_server.model, max_completion_tokens=3, temperature=0)
    assert len(out) == 3 and r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "length"


def test_streamed_chat_follows_openai_chunk_format(client, krasis_server, reference):
    text, ids, out = reference(HELLO, 8)
    chunks = list(chat(client, krasis_server.model, max_tokens=8, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    body, final, usage = chunks[:-2], chunks[-2], chunks[-1]
    assert "".join(c.choices[0].delta.content or "" for c in body) == text
    assert all(c.choices[0].finish_reason is None for c in body)
    assert final.choices[0].finish_reason == "length" and not final.choices[0].delta.content
    assert usage.choices == [] and usage.usage.completion_tokens == len(out)
    assert usage.usage.prompt_tokens == len(ids)


def test_stream_ends_with_done_and_has_no_usage_unless_asked(krasis_server):
    body = {"model": krasis_server.model, "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{krasis_server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert not any('"usage"' in e for e in events)


def test_resent_conversation_reports_cached_prompt_tokens(client, krasis_server):
    first = chat(client, krasis_server.model, max_tokens=4, temperature=0)
    turn2 = [*HELLO, {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And then?"}]
    second = chat(client, krasis_server.model, messages=turn2, max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


def test_stop_string_ends_the_answer_before_it(client, krasis_server, reference):
    text, _, _ = reference(HELLO, 12)
    visible = re.sub("\ufffd", "", text)
    stop = visible[2:4]
    assert len(stop) == 2
    r = chat(client, krasis_server.model, max_tokens=12, temperature=0, stop=stop)
    assert r.choices[0].message.content == text[:text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_stop_list_and_streaming_stop(client, krasis_server, reference):
    text, _, _ = reference(HELLO, 12)
    stops = ["never appears", text[3:5]]
    chunks = list(chat(client, krasis_server.model, max_tokens=12, temperature=0, stop=stops, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text[:text.find(stops[1])]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_same_seed_gives_the_same_sampled_answer(client, krasis_server):
    answers = [chat(client, krasis_server.model, max_tokens=10, temperature=1.5, seed=seed).choices[0].message.content
               for seed in (11, 11, 12)]
    assert answers[0] == answers[1]
    assert answers[0] != answers[2]


def test_text_completion_from_text_and_from_token_ids(client, krasis_server, tiny_checkpoint):
    tok = krasis.LLM(tiny_checkpoint("qwen3_moe_mixed")[1]).tokenizer
    a = client.completions.create(model=krasis_server.model, prompt="Once upon", max_tokens=6, temperature=0)
    b = client.completions.create(model=krasis_server.model, prompt=tok.encode("Once upon"), max_tokens=6,
                                  temperature=0)
    assert a.object == "text_completion" and a.choices[0].text and a.choices[0].text == b.choices[0].text
    assert a.usage.prompt_tokens == len(tok.encode("Once upon")) and a.usage.completion_tokens <= 6


def test_streamed_text_completion_matches_the_whole_one(client, krasis_server):
    whole = client.completions.create(model=krasis_server.model, prompt="Once upon", max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model=krasis_server.model, prompt="Once upon", max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_echo_puts_the_prompt_before_the_completion(client, krasis_server, tiny_checkpoint):
    tok = krasis.LLM(tiny_checkpoint("qwen3_moe_mixed")[1]).tokenizer
    plain = client.completions.create(model=krasis_server.model, prompt="Once upon", max_tokens=5, temperature=0)
    echoed = client.completions.create(model=krasis_server.model, prompt="Once upon", max_tokens=5, temperature=0,
                                       echo=True)
    from_ids = client.completions.create(model=krasis_server.model, prompt=tok.encode("Once upon"), max_tokens=5,
                                         temperature=0, echo=True, stream=True)
    assert echoed.choices[0].text == "Once upon" + plain.choices[0].text
    assert "".join(c.choices[0].text for c in from_ids) == echoed.choices[0].text


def test_twenty_concurrent_streaming_clients_all_get_complete_answers(client, krasis_server):
    prompts = [[{"role": "user", "content": f"Question {i}"}] for i in range(20)]
    expected = [chat(client, krasis_server.model, messages=p, max_tokens=6, temperature=0).choices[0].message.content
                for p in prompts]

    def streamed(p):
        chunks = chat(client, krasis_server.model, messages=p, max_tokens=6, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(streamed, prompts, timeout=240))
    assert answers == expected


def test_client_dropped_mid_stream_stops_its_generation(client, krasis_server):
    def generated_tokens():
        metrics = httpx.get(f"{krasis_server.url}/metrics", timeout=10).text
        return int(re.search(r"^krasis_generated_tokens_total (\d+)", metrics, re.M).group(1))

    before = generated_tokens()
    body = {"model": krasis_server.model, "messages": HELLO, "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{krasis_server.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    r = chat(client, krasis_server.model, max_tokens=2, temperature=0)  # queued behind the dropped one
    assert r.usage.completion_tokens == 2
    assert generated_tokens() - before < 200  # the dropped request did not run to its 400 tokens


def test_non_streaming_client_that_leaves_while_queued_stops_its_generation(krasis_server):
    url = krasis_server.url
    assert httpx.post(f"{url}/v1/timing", json={"enabled": True}, timeout=10).json()["enabled"]
    try:
        body = {"model": krasis_server.model, "messages": HELLO, "max_tokens": 480, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)  # the first request is generating
            with pytest.raises(httpx.TimeoutException):  # the second waits behind it; its client gives up
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.3)
            time.sleep(0.6)  # the server notices within 0.25 s, normally while the first request still runs
        for _ in range(300):  # bounded wait until the queue is empty
            if re.search(r"^krasis_queue_depth 0$", httpx.get(f"{url}/metrics", timeout=10).text, re.M):
                break
            time.sleep(0.05)
        last = httpx.get(f"{url}/v1/timing", timeout=10).json()["last"]
        assert last["cancelled"] and last["generated_tokens"] < 400  # 0 when noticed while still queued
    finally:
        httpx.post(f"{url}/v1/timing", json={"enabled": False}, timeout=10)
