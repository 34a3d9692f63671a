"""One chat turn, shared by the OpenAI and Anthropic endpoints: render the prompt (tools, tool_choice), then
turn the generated text into events: reasoning deltas, content deltas and whole tool calls."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import jinja2

from ..errors import InvalidInputError
from .api_errors import APIError
from .pipeline import TextRun
from .reasoning import CLOSE_TAG, ReasoningSplitter, prompt_opens_reasoning
from .tool_calls import DeepSeek, ToolCallParser, ToolFormat, detect_format, tools_by_name


@dataclass
class ToolPolicy:
    """What the request asked about tools. ``choice``: "none", "auto", "required", or a function name."""

    tools: list[dict]
    choice: str = "auto"
    parallel: bool = True

    @property
    def offered(self) -> bool:
        return bool(self.tools) and self.choice != "none"


def openai_tool_policy(tools: list[dict] | None, tool_choice, parallel: bool | None) -> ToolPolicy:
    choice = "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise APIError(400, f"'tool_choice' is {tool_choice!r}; use none, auto, required or "
                                '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        choice = tool_choice
    elif isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise APIError(400, "'tool_choice' names no function; send "
                                '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        choice = name
    return check_policy(ToolPolicy(list(tools or []), choice, True if parallel is None else parallel))


def check_policy(policy: ToolPolicy) -> ToolPolicy:
    if policy.choice not in ("none", "auto") and not policy.tools:
        raise APIError(400, f"'tool_choice' asks for {policy.choice!r} but the request has no tools",
                       param="tool_choice")
    if policy.choice not in ("none", "auto", "required") and policy.choice not in tools_by_name(policy.tools):
        raise APIError(400, f"'tool_choice' names {policy.choice!r}, which is not one of the request's tools",
                       param="tool_choice")
    return policy


def template_text(tokenizer) -> str:
    """All of the model's chat template text (the tool-call format is read from it)."""
    return getattr(tokenizer, "chat_template_text", "")


def _arguments_for_template(messages: list[dict], fmt: ToolFormat) -> list[dict]:
    """Assistant tool calls as templates want them: most templates iterate the arguments as a mapping, the
    DeepSeek ones paste them in as JSON text."""
    out = []
    for msg in messages:
        calls = msg.get("tool_calls")
        if calls:
            msg = dict(msg)
            fixed = []
            for call in calls:
                call = json.loads(json.dumps(call))
                fn = call.get("function", call)
                args = fn.get("arguments")
                if isinstance(args, str) and not isinstance(fmt, DeepSeek):
                    try:
                        fn["arguments"] = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        pass
                elif isinstance(args, dict) and isinstance(fmt, DeepSeek):
                    fn["arguments"] = json.dumps(args, ensure_ascii=False)
                fixed.append(call)
            msg["tool_calls"] = fixed
        out.append(msg)
    return out


@dataclass
class Prompt:
    text: str
    ids: list[int]
    thinking: bool  # the output starts inside a think block
    prefill: str  # the call opening put in the model's mouth (tool_choice required / named)
    fmt: ToolFormat


def render_prompt(llm, messages: list[dict], policy: ToolPolicy, template_kwargs: dict | None, param: str) -> Prompt:
    """Render ``messages`` (template dicts) with the tools the policy offers. For ``required`` / a named function
    the prompt ends with the format's call opening (and the name), so the answer starts as that call."""
    fmt = detect_format(template_text(llm.tokenizer))
    try:
        text = llm.tokenizer.apply_chat_template(
            _arguments_for_template(messages, fmt), add_generation_prompt=True, tokenize=False,
            tools=policy.tools if policy.offered else None, **(template_kwargs or {}))
    except InvalidInputError as e:
        raise APIError(400, str(e), param=param) from e
    except (jinja2.TemplateError, TypeError) as e:
        raise APIError(400, f"the chat template cannot render these messages: {e}", param=param) from e
    thinking = prompt_opens_reasoning(text)
    prefill = ""
    if policy.offered and policy.choice != "auto":
        prefill = fmt.opening(None if policy.choice == "required" else policy.choice)
        if thinking:  # the call is forced now: the think block is closed unwritten
            text += "\n" + CLOSE_TAG + "\n\n"
            thinking = False
        text += prefill
    return Prompt(text, llm.tokenizer.encode(text, add_special_tokens=False), thinking, prefill, fmt)


class TurnOutput:
    """Generated text -> ("reasoning", text), ("content", text) and ("call", ToolCall) events. After iteration
    ``finish_reason`` is "stop", "length" or "tool_calls" and ``calls`` holds the tool calls."""

    def __init__(self, run: TextRun, prompt: Prompt, policy: ToolPolicy):
        self.run = run
        self.splitter = ReasoningSplitter(prompt.thinking)
        self.parser = (ToolCallParser(prompt.fmt, policy.tools, prompt.prefill, policy.parallel)
                       if policy.offered else None)
        self.finish_reason = "stop"

    @property
    def calls(self):
        return self.parser.calls if self.parser is not None else []

    def _split(self, reasoning: str, content: str) -> list[tuple[str, object]]:
        events: list[tuple[str, object]] = [("reasoning", reasoning)] if reasoning else []
        if self.parser is not None:
            events += self.parser.feed(content) if content else []
        elif content:
            events.append(("content", content))
        return events

    async def events(self) -> AsyncIterator[tuple[str, object]]:
        async for piece in self.run.deltas():
            for event in self._split(*self.splitter.feed(piece)):
                yield event
        for event in self._split(*self.splitter.flush()):
            yield event
        if self.parser is not None:
            for event in self.parser.finish():
                yield event
        self.finish_reason = "tool_calls" if self.calls else self.run.finish_reason
