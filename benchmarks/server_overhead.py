"""Server benchmark: what the HTTP server adds per generated token (streamed through the OpenAI API versus
``LLM.stream`` in process), and the time to first token of a resent conversation (prefix reused) versus a fresh
one of the same length.

    python benchmarks/server_overhead.py                          # the demo model (random weights)
    python benchmarks/server_overhead.py --model-path DIR --prompt-words 2000 --tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_chat(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed greedy chat request: time to first content, total time, tokens, text."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    text, usage = [], {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise SystemExit(f"the server answered {r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(choice["delta"]["content"])
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "total": end - start, "tokens": usage.get("completion_tokens", 0),
            "cached": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
            "prompt": usage.get("prompt_tokens", 0), "text": "".join(text)}


def direct_seconds_per_token(model_path: str, dtype: str, messages: list[dict], tokens: int, repeats: int) -> float:
    """Best of ``repeats``: seconds per token after the first, ``LLM.stream`` in this process."""
    from krasis import LLM

    llm = LLM(model_path, dtype=dtype, progress=False)
    llm.eos_token_ids = set()
    ids = llm.tokenizer.apply_chat_template(messages, tokenize=True)
    best = float("inf")
    for _ in range(repeats):
        stream = llm.stream(ids, max_new_tokens=tokens)
        next(stream)
        start = time.perf_counter()
        n = sum(1 for _ in stream)
        best = min(best, (time.perf_counter() - start) / max(n, 1))
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default=None, help="model directory (default: the demo model)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    p.add_argument("--prompt-words", type=int, default=400, help="length of the long conversation, in words")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.model_path is None:
        from krasis.demo import ensure_demo_model

        args.model_path = str(ensure_demo_model())
    short = [{"role": "user", "content": "Tell me a story."}]
    direct = direct_seconds_per_token(args.model_path, args.dtype, short, args.tokens, args.repeats)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "krasis.server", "--model-path", args.model_path, "--port",
                             str(port), "--dtype", args.dtype], env=dict(os.environ))
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        else:
            raise SystemExit("the server did not become ready")
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        stream_chat(url, model, short, 4)  # warm up
        runs = [stream_chat(url, model, short, args.tokens) for _ in range(args.repeats)]
        served = min((r["total"] - r["ttft"]) / max(r["tokens"] - 1, 1) for r in runs)
        ttft_fresh, ttft_resent, cached = [], [], 0
        for i in range(args.repeats):
            words = " ".join(f"w{(i * 7919 + j) % 997}" for j in range(args.prompt_words))
            turn1 = [{"role": "user", "content": f"{i} {words}"}]
            first = stream_chat(url, model, turn1, 8)
            ttft_fresh.append(first["ttft"])
            turn2 = [*turn1, {"role": "assistant", "content": first["text"]}, {"role": "user", "content": "More."}]
            resent = stream_chat(url, model, turn2, 8)
            ttft_resent.append(resent["ttft"])
            cached = resent["cached"]
            prompt = resent["prompt"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"model: {args.model_path} ({args.dtype}), {args.tokens} tokens per answer, best of {args.repeats}")
    print("| measure | value |")
    print("|---|---|")
    print(f"| decode through the server, ms/token | {served * 1e3:.2f} |")
    print(f"| decode in process (LLM.stream), ms/token | {direct * 1e3:.2f} |")
    print(f"| server overhead, ms/token | {(served - direct) * 1e3:.2f} |")
    print(f"| time to first token, fresh {prompt}-token conversation, ms | {min(ttft_fresh) * 1e3:.1f} |")
    print(f"| time to first token, same conversation resent ({cached} tokens cached), ms | "
          f"{min(ttft_resent) * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
