"""``krasis-chat``: a terminal chat. With ``--url`` / ``--port``, or when a Krasis server is running (found
through ``~/.krasis/servers/``), it talks to that server (``chat_client``); with ``--model-path`` or no server it
runs the model in this process."""

from __future__ import annotations

import argparse
import sys

from .errors import KrasisError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="krasis-chat", description="Chat with a model in the terminal.")
    p.add_argument("--model-path", help="run this Hugging Face model directory in this process (default: talk to "
                                        "a running server, else run the random-weight demo model here)")
    p.add_argument("--url", help="base URL of a running Krasis (or any OpenAI-compatible) server")
    p.add_argument("--port", type=int, help="port of a Krasis server on 127.0.0.1")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens per answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = args.url or (f"http://127.0.0.1:{args.port}" if args.port else None)
    if url is None and args.model_path is None:
        from .server.discovery import running_servers

        servers = running_servers()
        if servers:
            from .chat_client import choose_server

            url = choose_server(servers)
    if url is not None:
        from .chat_client import run

        return run(url, args.system, args.temperature, args.max_tokens)
    from .cli import DEMO_NOTE
    from .demo import ensure_demo_model
    from .llm import LLM

    try:
        path = args.model_path
        if path is None:
            path = ensure_demo_model()
            print(DEMO_NOTE.format(path=path), file=sys.stderr)
        llm = LLM(path, device=args.device, dtype=args.dtype)
        tok = llm.tokenizer
        if not tok.has_chat_template:
            raise KrasisError(f"{path} has no chat template; use `krasis --non-interactive --raw-prompt` instead")
    except KrasisError as e:
        print(f"krasis-chat: error: {e}", file=sys.stderr)
        return 1
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Type a message and press Enter; /reset clears the conversation, /quit (or Ctrl-D) leaves.",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() == "/quit":
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            out: list[int] = []
            shown = ""
            for token in llm.stream(ids, max_new_tokens=args.max_tokens, temperature=args.temperature,
                                    top_p=args.top_p):
                if token in llm.eos_token_ids:
                    break
                out.append(token)
                text = tok.decode(out)
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        except KrasisError as e:
            print(f"\nkrasis-chat: error: {e}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": tok.decode(out)})


if __name__ == "__main__":
    sys.exit(main())
