"""Bad requests get OpenAI's error shape and the right status, and the server keeps serving."""

import httpx
import openai
import pytest

HELLO = [{"role": "user", "content": "Hi"}]


def post(server, path, **kw):
    return httpx.post(f"{server.url}{path}", timeout=60, **kw)


def assert_openai_error(r, status, param=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_malformed_json_is_400(krasis_server):
    r = post(krasis_server, "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert "JSON" in assert_openai_error(r, 400)["message"]


def test_body_that_is_not_an_object_is_400(krasis_server):
    assert_openai_error(post(krasis_server, "/v1/chat/completions", json=[1, 2]), 400)


def test_missing_messages_is_400_naming_the_field(krasis_server):
    assert_openai_error(post(krasis_server, "/v1/chat/completions", json={"model": krasis_server.model}), 400,
                        param="messages")


@pytest.mark.parametrize("field,value", [("messages", "hello"), ("temperature", "hot"), ("max_tokens", "many"),
                                         ("stream", {"yes": 1}), ("stop", 5), ("temperature", 7.0),
                                         ("max_tokens", 0)])
def test_wrong_typed_or_out_of_range_field_is_400(krasis_server, field, value):
    body = {"model": krasis_server.model, "messages": HELLO, field: value}
    assert_openai_error(post(krasis_server, "/v1/chat/completions", json=body), 400, param=field)


def test_message_with_an_unknown_role_is_400(krasis_server):
    body = {"model": krasis_server.model, "messages": [{"role": "wizard", "content": "hi"}]}
    assert_openai_error(post(krasis_server, "/v1/chat/completions", json=body), 400)


def test_unknown_model_is_404_through_the_openai_client(krasis_server):
    client = openai.OpenAI(base_url=f"{krasis_server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert e.value.status_code == 404 and "no-such-model" in str(e.value)


def test_empty_messages_is_400(krasis_server):
    body = {"model": krasis_server.model, "messages": []}
    assert_openai_error(post(krasis_server, "/v1/chat/completions", json=body), 400, param="messages")


def test_prompt_plus_max_tokens_beyond_context_is_400_naming_both_numbers(krasis_server):
    body = {"model": krasis_server.model, "messages": HELLO, "max_tokens": 100000}
    error = assert_openai_error(post(krasis_server, "/v1/chat/completions", json=body), 400)
    assert "100000" in error["message"] and "512" in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_prompt_longer_than_context_is_400(krasis_server):
    body = {"model": krasis_server.model, "messages": [{"role": "user", "content": "word " * 600}]}
    error = assert_openai_error(post(krasis_server, "/v1/chat/completions", json=body), 400)
    assert "512" in error["message"]


def test_n_other_than_one_is_400(krasis_server):
    body = {"model": krasis_server.model, "messages": HELLO, "n": 3}
    assert "n = 1" in assert_openai_error(post(krasis_server, "/v1/chat/completions", json=body), 400, "n")["message"]


def test_completion_with_token_ids_outside_the_vocabulary_is_400(krasis_server):
    body = {"model": krasis_server.model, "prompt": [1, 2, 99999], "max_tokens": 2}
    assert "vocabulary" in assert_openai_error(post(krasis_server, "/v1/completions", json=body), 400)["message"]


def test_streaming_request_with_a_bad_prompt_is_400_not_a_broken_stream(krasis_server):
    body = {"model": krasis_server.model, "prompt": [99999], "max_tokens": 2, "stream": True}
    assert_openai_error(post(krasis_server, "/v1/completions", json=body), 400)


def test_unknown_endpoint_is_404_in_openai_shape(krasis_server):
    assert_openai_error(httpx.get(f"{krasis_server.url}/v1/nothing", timeout=10), 404)


def test_server_still_answers_after_bad_requests(krasis_server):
    for _ in range(3):
        post(krasis_server, "/v1/chat/completions", content=b"\xff\xfe", headers={"content-type": "application/json"})
    r = post(krasis_server, "/v1/chat/completions", json={"model": krasis_server.model, "messages": HELLO,
                                                          "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
