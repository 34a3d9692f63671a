"""Tool-call formats on their own: detection from the template text, schema-typed argument conversion (nested
objects and arrays), each family's syntax, several calls, malformed calls."""

import json
import logging

import pytest

from krasis.server.tool_calls import (
    DS_CALL_BEGIN,
    DS_CALL_END,
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    DS_SEP,
    DeepSeek,
    Glm,
    Qwen3Json,
    Qwen3Xml,
    convert_arguments,
    convert_value,
    detect_format,
    parse_tool_calls,
)

SCHEMA = {"type": "object", "properties": {
    "s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"}, "b": {"type": "boolean"},
    "o": {"type": "object", "properties": {"deep": {"type": "object", "properties": {"k": {"type": "integer"}}},
                                           "xs": {"type": "array", "items": {"type": "number"}}}},
    "a": {"type": "array", "items": {"type": "object", "properties": {"on": {"type": "boolean"}}}},
    "maybe": {"type": ["integer", "null"]}, "either": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "g"}}]


def test_values_become_the_declared_types_nested_included():
    raw = {"s": "42", "i": "7", "n": "2.5", "b": "False", "o": '{"deep": {"k": "3"}, "xs": [1, "2.5"]}',
           "a": "[{'on': 'true'}, {'on': False}]", "maybe": "null", "either": "x1", "extra": "5"}
    assert convert_arguments(raw, SCHEMA) == {
        "s": "42", "i": 7, "n": 2.5, "b": False, "o": {"deep": {"k": 3}, "xs": [1, 2.5]},
        "a": [{"on": True}, {"on": False}], "maybe": None, "either": "x1", "extra": "5"}


def test_text_that_fits_no_declared_type_stays_text():
    assert convert_value("seven", {"type": "integer"}) == "seven"
    assert convert_value("{not json", {"type": "object"}) == "{not json"
    assert convert_value("3", {"anyOf": [{"type": "integer"}, {"type": "string"}]}) == 3
    assert convert_value("4.0", {"type": "integer"}) == 4


@pytest.mark.parametrize("template, fmt", [
    ("{{ '<tool_call>' }}{{ tool_call.arguments | tojson }}", Qwen3Json),
    ("<tool_call>\n<function={{ name }}>\n<parameter=", Qwen3Xml),
    ("<tool_call>{{ name }}<arg_key>{{ k }}</arg_key>", Glm),
    ("'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'", DeepSeek),
    ("{{ messages }}", Qwen3Json),
])
def test_format_is_read_from_the_template_text(template, fmt):
    assert isinstance(detect_format(template), fmt)


def test_each_format_gives_the_same_typed_calls():
    outputs = {
        Qwen3Json(): 'Hi\n<tool_call>\n{"name": "f", "arguments": {"i": 1, "o": {"xs": [2]}}}\n</tool_call>\n'
                     '<tool_call>{"name": "g", "arguments": {}}</tool_call>',
        Qwen3Xml(): "Hi\n<tool_call>\n<function=f>\n<parameter=i>\n1\n</parameter>\n<parameter=o>\n"
                    '{"xs": [2]}\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=g>\n</function>\n'
                    "</tool_call>",
        Glm(): 'Hi\n<tool_call>f\n<arg_key>i</arg_key>\n<arg_value>1</arg_value>\n<arg_key>o</arg_key>\n'
               '<arg_value>{"xs": [2]}</arg_value>\n</tool_call><tool_call>g</tool_call>',
        DeepSeek(): f'Hi{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}f\n```json\n{{"i": 1, "o": {{"xs": [2]}}}}\n'
                    f'```{DS_CALL_END}{DS_CALL_BEGIN}g{DS_SEP}{{}}{DS_CALL_END}{DS_CALLS_END}',
    }
    for fmt, text in outputs.items():
        content, calls = parse_tool_calls(text, fmt, TOOLS)
        assert content == "Hi", fmt.name
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"i": 1, "o": {"xs": [2]}}), ("g", {})]
        assert "".join(calls[0].pieces) == calls[0].arguments and len(calls[0].pieces) > 1


@pytest.mark.parametrize("fmt, text", [
    (Qwen3Xml(), "<tool_call>\n<function=f>\n<parameter=i>1</parameter>\n"),  # unclosed
    (Qwen3Xml(), "<tool_call>\n<function=nope>\n</function>\n</tool_call>"),  # unknown tool
    (Glm(), "<tool_call><arg_key>i</arg_key><arg_value>1</arg_value></tool_call>"),  # no name
    (DeepSeek(), f"{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}f\n```json\n{{oops\n```{DS_CALL_END}"),
    (Qwen3Json(), '<tool_call>{"name": "f", "arguments": [1]}</tool_call>'),
])
def test_malformed_calls_are_plain_content(fmt, text):
    assert parse_tool_calls(text, fmt, TOOLS) == (text, [])


def test_malformed_call_is_logged_with_the_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="krasis.server"):
        parse_tool_calls("<tool_call>\n<function=nope>\n</function>\n</tool_call>", Qwen3Xml(), TOOLS)
    (record,) = caplog.records
    assert "malformed tool call" in record.getMessage() and "'nope'" in record.getMessage()


def test_parallel_false_keeps_the_first_call_and_prefill_is_parsed():
    text = '{}}\n</tool_call>\n<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    content, calls = parse_tool_calls(text, Qwen3Json(), TOOLS, prefill=Qwen3Json().opening("g"), parallel=False)
    assert content == "" and [c.name for c in calls] == ["g"]
