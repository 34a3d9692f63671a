"""``krasis-chat`` against a running Krasis server (found through ``~/.krasis/servers/`` or given by
``--url`` / ``--port``): streams answers over the OpenAI API, shows reasoning apart, prints tokens/s."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

HELP = "Type a message and press Enter; /new clears the conversation, /system PROMPT sets the system message, " \
       "/exit (or Ctrl-D) leaves."


class ServerGone(Exception):
    """The server cannot be reached or broke off."""


def choose_server(servers: list[dict]) -> str:
    """The URL of one of the running servers (asks which when there are several)."""
    if len(servers) == 1:
        return servers[0]["url"]
    for i, s in enumerate(servers, 1):
        print(f"  {i}. {s['url']}  {s.get('model', '')}  (pid {s['pid']})", file=sys.stderr)
    while True:
        answer = input(f"Which server (1-{len(servers)})? ").strip()
        if answer.isdigit() and 1 <= int(answer) <= len(servers):
            return servers[int(answer) - 1]["url"]


def _request(url: str, body: dict | None = None, timeout: float = 600):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = str(e)
        raise ServerGone(f"the server answered {e.code}: {message}") from e
    except (urllib.error.URLError, OSError) as e:
        raise ServerGone(f"cannot reach {url} ({e})") from e


def served_model(base_url: str) -> str:
    with _request(f"{base_url}/v1/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def stream_answer(base_url: str, model: str, messages: list[dict], temperature: float, max_tokens: int,
                  out=sys.stdout, notes=sys.stderr) -> str:
    """Stream one answer: content to ``out``, reasoning to ``notes``; then tokens/s to ``notes``. Returns the
    answer's content."""
    body = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    content, usage, thinking = [], {}, False
    try:
        with _request(f"{base_url}/v1/chat/completions", body) as r:
            for raw in r:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise ServerGone(chunk["error"]["message"])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("reasoning_content"):
                        first = first or time.perf_counter()
                        if not thinking:
                            notes.write("[thinking] ")
                            thinking = True
                        notes.write(delta["reasoning_content"])
                        notes.flush()
                    if delta.get("content"):
                        first = first or time.perf_counter()
                        if thinking:
                            notes.write("\n")
                            thinking = False
                        content.append(delta["content"])
                        out.write(delta["content"])
                        out.flush()
    except (OSError, ValueError) as e:  # connection dropped mid-answer, or a garbled event
        raise ServerGone(f"the connection to {base_url} broke off ({e})") from e
    out.write("\n")
    end = time.perf_counter()
    tokens = usage.get("completion_tokens", 0)
    rate = (tokens - 1) / (end - first) if first and tokens > 1 and end > first else 0.0
    notes.write(f"[{tokens} tokens, {rate:.1f} tok/s, first token after {((first or end) - start):.2f} s]\n")
    notes.flush()
    return "".join(content)


def run(base_url: str, system: str | None, temperature: float, max_tokens: int) -> int:
    base_url = base_url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[:-3]
    try:
        model = served_model(base_url)
    except ServerGone as e:
        print(f"krasis-chat: error: {e}; is `python -m krasis.server` running?", file=sys.stderr)
        return 1
    print(f"Chatting with {model} at {base_url}. {HELP}", file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text in ("/new", "/reset"):
            messages = []
            print("(new conversation)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            print(f"(system message {'set' if system else 'cleared'})", file=sys.stderr)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": line})
        prefix = [{"role": "system", "content": system}] if system else []
        try:
            answer = stream_answer(base_url, model, prefix + messages, temperature, max_tokens)
        except ServerGone as e:
            print(f"\nkrasis-chat: the server went away: {e}", file=sys.stderr)
            return 1
        messages.append({"role": "assistant", "content": answer})
