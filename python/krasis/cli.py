"""The ``krasis`` command: with no arguments the TUI launcher; ``--non-interactive`` runs a prompt through a model
and prints the completion; ``--serve``, ``--benchmark``, ``--benchmark-suite`` and ``--perplexity`` run those modes.
Options left off the command line come from the saved config (``~/.krasis/config``) or its defaults."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import KrasisError
from .gpu_options import add_gpu_arguments, after_load, gpu_kwargs
from .launcher.config import ConfigError, defaults, load_config
from .launcher.options import add_launcher_arguments, apply_config, check_args, given_options, settings

DEMO_NOTE = ("No --model-path given: using the demo model {path}.\n"
             "Its weights are RANDOM, so the text below is gibberish; it shows the whole pipeline runs.\n"
             "Point Krasis at a real model with --model-path /path/to/hf-model-dir "
             "(a folder with config.json, *.safetensors and tokenizer.json).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="krasis", description="Run huge Mixture-of-Experts LLMs on a GPU plus system RAM.")
    p.add_argument("--non-interactive", action="store_true",
                   help="run without the TUI, with the saved config and these flags: generate a completion for "
                        "--prompt and print it")
    p.add_argument("--model-path", help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json); "
                                        "default: a small random-weight demo model")
    p.add_argument("--prompt", default="Hello! Tell me about Mixture-of-Experts models.",
                   help="user message to answer (rendered with the model's chat template when it has one)")
    p.add_argument("--raw-prompt", action="store_true", help="send --prompt as plain text, without the chat template")
    p.add_argument("--max-tokens", type=int, default=32, help="most new tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="compute dtype (default bfloat16)")
    p.add_argument("--cpu-expert-bits", type=int, choices=(16, 8, 4), default=16,
                   help="routed experts on the CPU: 16 = unquantised, 8 or 4 = INT8/INT4 Rust kernels "
                        "(which also run dense MLPs, shared experts and lm_head in INT8); default 16")
    q = p.add_argument_group("weight cache (used with --cpu-expert-bits 8 or 4)")
    q.add_argument("--gpu-expert-bits", type=int, choices=(4, 8), default=4,
                   help="routed experts for the GPU engine's kernels (prefill streaming, hot-expert cache); a width "
                        "other than --cpu-expert-bits adds GPU expert files to the cache; default 4")
    for part, default in (("shared-expert", "int8"), ("dense-mlp", "int8"), ("lm-head", "int8"), ("attention", "bf16")):
        q.add_argument(f"--{part}-quant", choices=("int8", "bf16"), default=default,
                       help=f"{part.replace('-', ' ')} weights: int8 (Rust kernels) or bf16 (default {default})")
    q.add_argument("--group-size", type=int, choices=(32, 64, 128), default=128,
                   help="quantisation group size along the input dimension (default 128)")
    q.add_argument("--verify-cache", action="store_true",
                   help="check every cache file's sha256, not only its size, before using it")
    add_gpu_arguments(p)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU expert kernel threads (default: physical cores; env KRASIS_THREADS)")
    s = p.add_argument_group("OpenAI-compatible server (with --serve)")
    s.add_argument("--serve", action="store_true",
                   help="after loading, serve the model over the OpenAI API instead of answering --prompt")
    from .server.__main__ import add_server_arguments

    add_server_arguments(s)
    add_launcher_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log what the runtime decides")
    return p


TUI_NEEDS_TERMINAL = ("krasis: the interactive launcher needs a terminal (standard output is not one).\n"
                      "Run `krasis --non-interactive` (saved config plus command-line flags), or "
                      "`krasis --serve`; see `krasis --help`.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="krasis: %(message)s")
    headless = args.non_interactive or args.serve or args.benchmark or args.benchmark_suite or args.perplexity
    try:
        if args.benchmark_suite:
            return _run_suite(args)
        if not headless:
            if not sys.stdout.isatty():
                print(TUI_NEEDS_TERMINAL, file=sys.stderr)
                return 2
            if not _run_tui(args):
                return 0
        else:
            apply_config(args, defaults() if args.ignore_config else load_config())
        check_args(args)
        return _run_modes(args)
    except KrasisError as e:
        print(f"krasis: error: {e}", file=sys.stderr)
        return 1


def _run_tui(args: argparse.Namespace) -> bool:
    """The launcher's screens; False when the user quit. Fills ``args`` from what was chosen (and saved)."""
    from .launcher.tui import LauncherApp

    problem = None
    try:
        config = defaults() if args.ignore_config else load_config()
    except ConfigError as e:
        config, problem = defaults(), f"{e}. Starting from the defaults."
    config.update(given_options(args))
    result = LauncherApp(config, problem=problem).run()
    if result is None:
        return False
    action, chosen = result
    apply_config(args, chosen)
    args.serve, args.benchmark = True, action == "benchmark"
    return True


def _run_suite(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .launcher.suite import run_suite

    rows, summary = run_suite(Path(args.benchmark_suite))
    print(summary.read_text())
    print(f"summary written to {summary}; logs in {summary.parent}")
    return 0 if all(r.ok for r in rows) else 1


def _run_modes(args: argparse.Namespace) -> int:
    if args.perplexity:
        from .launcher.perplexity import dataset_texts, perplexity

        if not args.dataset:
            raise ConfigError("--perplexity needs --dataset FILE.txt (or a folder of .txt files)")
        texts = dataset_texts(args.dataset)
        result = perplexity(_load_llm(args), texts, args.window, args.stride)
        print(result.summary())
        return 0
    if args.benchmark:
        from .launcher.benchmark import run_benchmark, table, write_record

        llm = _load_llm(args)
        record = run_benchmark(llm, args.benchmark_lengths, args.benchmark_ttft_tokens, args.benchmark_decode_tokens,
                               args.benchmark_decode_prompts, settings(args))
        json_path, md_path = write_record(record, args.results_dir)
        print(table(record))
        print(f"record written to {json_path} and {md_path}")
        if not args.serve:
            return 0
        return _serve(args, lambda: llm)
    if args.serve:
        return _serve(args, lambda: _load_llm(args))
    return _run_prompt(args, _load_llm(args))


def _load_llm(args: argparse.Namespace):
    from .cache import QuantConfig
    from .demo import ensure_demo_model
    from .llm import LLM

    if args.model_path is None:
        args.model_path = str(ensure_demo_model())
        print(DEMO_NOTE.format(path=args.model_path), file=sys.stderr)
    if args.threads is not None:
        from . import _core

        _core.set_num_threads(args.threads)
    quant = QuantConfig(gpu_expert_bits=args.gpu_expert_bits, shared_expert_quant=args.shared_expert_quant,
                        dense_mlp_quant=args.dense_mlp_quant, lm_head_quant=args.lm_head_quant,
                        attention_quant=args.attention_quant, group_size=args.group_size)
    llm = LLM(args.model_path, device=args.device, dtype=args.dtype, expert_bits=args.cpu_expert_bits, quant=quant,
              verify_cache=args.verify_cache, gguf_path=args.gguf_path or None, **gpu_kwargs(args))
    after_load(llm, args)
    return llm


def _serve(args: argparse.Namespace, load_llm) -> int:
    from pathlib import Path

    from .demo import ensure_demo_model
    from .server.__main__ import serve

    if args.model_path is None:
        args.model_path = str(ensure_demo_model())
        print(DEMO_NOTE.format(path=args.model_path), file=sys.stderr)
    args.served_model_name = args.served_model_name or Path(args.model_path).resolve().name
    return serve(args, load_llm)


def _run_prompt(args: argparse.Namespace, llm) -> int:
    tok = llm.tokenizer
    if tok.has_chat_template and not args.raw_prompt:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      tokenize=True)
    else:
        ids = tok.encode(args.prompt)
    out: list[int] = []
    shown = ""
    for token in llm.stream(ids, max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed):
        out.append(token)
        text = tok.decode(out)
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
