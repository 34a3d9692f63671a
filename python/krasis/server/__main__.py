"""``python -m krasis.server --model-path DIR``: serve a model over the OpenAI API.

The port opens at once (``/health`` answers 503 while the model loads, 200 when it is ready); the discovery
file ``~/.krasis/servers/<pid>.json`` is written when serving starts and removed on exit, SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

from ..errors import KrasisError
from ..gguf_experts import add_gguf_arguments
from ..gpu_options import add_gpu_arguments, after_load, gpu_kwargs

log = logging.getLogger("krasis.server")


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The flags the server adds (shared with ``krasis --serve``)."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8012, help="port to listen on (default 8012)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the model directory's name)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting or running at once; more get 503 with Retry-After (default 64)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="answer at once after loading, without the short unused generation that captures the GPU "
                        "engine's first decode graphs and tries --decode-mode auto's shares before the first request "
                        "(default: warm up; nothing to warm on the CPU path)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m krasis.server", description="OpenAI-compatible Krasis server.")
    p.add_argument("--model-path", help="Hugging Face model directory; default: the random-weight demo model")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="compute dtype")
    p.add_argument("--cpu-expert-bits", type=int, choices=(16, 8, 4), default=16,
                   help="routed experts on the CPU: 16 = unquantised, 8 or 4 = INT8/INT4 (default 16)")
    p.add_argument("--threads", type=int, default=None, help="CPU expert kernel threads (default: physical cores)")
    add_gguf_arguments(p)
    add_gpu_arguments(p)
    add_server_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log what the runtime decides and every request")
    # test-only (see krasis/server/scripted.py): every answer is the text of this file
    p.add_argument("--test-scripted-output", default=None, help=argparse.SUPPRESS)
    return p


def warm_up(llm) -> None:
    """``llm.warm_up()``, said on stderr; a failure is reported and the server starts all the same (the first
    request then does what the warm-up did, and meets the same error if it is not a passing one)."""
    try:
        seconds = llm.warm_up()
    except Exception as e:
        log.warning("warm-up failed (%s: %s); serving without it", type(e).__name__, e)
        print(f"krasis: warning: the warm-up generation failed ({type(e).__name__}: {e}); serving without it",
              file=sys.stderr, flush=True)
        return
    if seconds:
        print(f"krasis: warmed up in {seconds:.1f} s (decode graphs captured, the decode mode's first trials run)",
              file=sys.stderr, flush=True)


def serve(args: argparse.Namespace, load_llm) -> int:
    """Open the port, load the model with ``load_llm()`` on a thread, serve until SIGTERM/SIGINT.
    Returns the exit status (1 when the model could not be loaded)."""
    import uvicorn

    from .app import create_app
    from .discovery import remove_server_file, write_server_file

    app = create_app(model_name=args.served_model_name, max_queue=args.max_queue)
    state = app.state.krasis
    # open streams get 5 s after SIGTERM/SIGINT before they are cut, so a long answer cannot hold up the exit
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=5,
                                           log_level="info" if args.verbose else "warning"))
    failure: list[str] = []

    def load() -> None:
        try:
            llm = load_llm()
            if args.warmup:
                warm_up(llm)
            state.attach(llm, args.served_model_name)
        except (KrasisError, ValueError, NotImplementedError, OSError) as e:
            failure.append(str(e))
            server.should_exit = True
            return
        except Exception as e:  # anything else must stop the server too, not leave it answering 503 forever
            log.exception("loading the model failed")
            failure.append(f"{type(e).__name__}: {e}")
            server.should_exit = True
            return
        print(f"krasis: serving {state.model_name} at {url}/v1", file=sys.stderr, flush=True)

    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}"
    print(f"krasis: loading the model; {url}/health answers 503 until it is ready", file=sys.stderr, flush=True)
    threading.Thread(target=load, name="krasis-load", daemon=True).start()
    write_server_file(url, args.served_model_name or "")
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the file goes in the app's shutdown step
    state.on_shutdown.append(remove_server_file)
    try:
        server.run()
    finally:
        remove_server_file()
    if failure:
        print(f"krasis: error: {failure[0]}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="krasis: %(message)s")
    from ..launcher.options import gguf_problem

    problem = gguf_problem(args.gguf_path, args.cpu_expert_bits)
    if problem:  # refused before the port opens, as `krasis` refuses it
        print(f"krasis: error: {problem}", file=sys.stderr)
        return 1
    if args.served_model_name is None:
        from ..demo import DEMO_NAME

        args.served_model_name = Path(args.model_path).resolve().name if args.model_path else DEMO_NAME

    def load_llm():
        from ..demo import ensure_demo_model
        from ..llm import LLM

        path = args.model_path or ensure_demo_model()
        if args.threads is not None:
            from .. import _core

            _core.set_num_threads(args.threads)
        llm = LLM(path, device=args.device, dtype=args.dtype, expert_bits=args.cpu_expert_bits, progress=False,
                  gguf_path=args.gguf_path, **gpu_kwargs(args))
        after_load(llm, args)
        if args.test_scripted_output:
            from .scripted import ScriptedOutput

            llm = ScriptedOutput(llm, Path(args.test_scripted_output))
        return llm

    return serve(args, load_llm)


if __name__ == "__main__":
    sys.exit(main())
